"""``python -m serve --artifacts ART_DIR``: the HTTP query service (uvicorn, one process).

Binds to 127.0.0.1 unless ``--host`` says otherwise. Every limit and timeout is a flag
of the serve config (``serve.limits``). A start-up refusal (damaged artifacts or index,
a tampered checkpoint) is one line naming the file and what is wrong, exit code 2.
See docs/serving.md.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import sys

from export.artifacts import ArtifactError
from export.engines import TensorRTUnavailable
from export.runtime import BACKENDS, PRECISIONS, precision_options
from pipeline.checkpoint import CheckpointError
from serve.batching import CPU_BATCHING, GPU_BATCHING
from serve.engine import DEFAULT_RERANK_TOP
from serve.gallery import GalleryIndexError
from serve.layouts import LAYOUTS
from serve.limits import add_limit_flags, limits_from_args
from serve.search import DEFAULT_MARGIN

STARTUP_ERRORS = (ArtifactError, CheckpointError, GalleryIndexError)

log = logging.getLogger("serve")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m serve",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--artifacts",
        required=True,
        help="artifact directory written by python -m export.onnx (with index/)",
    )
    parser.add_argument("--index", default=None, help="gallery index dir (default ART_DIR/index)")
    parser.add_argument("--backend", choices=BACKENDS, default="torch")
    parser.add_argument(
        "--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if present)"
    )
    parser.add_argument(
        "--precision",
        choices=sorted({p for ps in PRECISIONS.values() for p in ps}),
        default=None,
        help="tensorrt: fp32 or fp16, which engines of export.trt to serve (default: fp16 "
        "when ART_DIR/engines lists fp16 engines for every graph, else fp32); "
        "onnxruntime: fp32 (default) or int8, the image encoder of export.int8",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument(
        "--max-batch",
        type=int,
        default=None,
        help=f"queries per engine call (default {GPU_BATCHING[0]} on GPU, {CPU_BATCHING[0]} on CPU)",
    )
    parser.add_argument(
        "--batch-wait-ms",
        type=float,
        default=None,
        help=f"how long a batch waits for more queries (default {GPU_BATCHING[1]:g} on GPU, "
        f"{CPU_BATCHING[1]:g} on CPU)",
    )
    parser.add_argument(
        "--layout",
        choices=LAYOUTS,
        default="exact",
        help="gallery search: exact, or fp16 / int8 / faiss candidates re-scored exactly "
        "(faiss needs `export.index --faiss`); see docs/serving.md",
    )
    parser.add_argument(
        "--margin",
        type=int,
        default=DEFAULT_MARGIN,
        help="extra candidates the compressed layouts re-score",
    )
    parser.add_argument("--nprobe", type=int, default=None, help="faiss: cells probed per query")
    parser.add_argument(
        "--rerank-top",
        type=int,
        default=DEFAULT_RERANK_TOP,
        help="candidates the correction network re-scores (CCNet only)",
    )
    parser.add_argument(
        "--no-warmup",
        action="store_true",
        help="skip capturing CUDA graphs for every batch bucket at start",
    )
    parser.add_argument("--log-level", default="info")
    add_limit_flags(parser)
    args = parser.parse_args(argv)
    if args.rerank_top < 1:
        parser.error(f"--rerank-top must be >= 1, got {args.rerank_top}")
    try:
        args.limits = limits_from_args(args)
    except ValueError as err:
        parser.error(str(err))
    if not 0 < args.port < 65536:
        parser.error(f"--port must be in 1..65535, got {args.port}")
    try:
        args.backend_options = precision_options(args.backend, args.precision)
    except ValueError as err:
        parser.error(f"--precision: {err}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    import uvicorn

    from serve.app import create_app
    from serve.engine import QueryEngine
    from serve.http_server import uvicorn_config

    if not _is_loopback(args.host):
        log.warning("binding to %s: the service is reachable from other machines", args.host)
    limits = args.limits
    try:
        engine = QueryEngine(
            args.artifacts,
            backend=args.backend,
            device=args.device,
            index_dir=args.index,
            rerank_top=args.rerank_top,
            max_image_pixels=limits.max_image_pixels,
            max_image_side=limits.max_image_side,
            max_aspect_ratio=limits.max_aspect_ratio,
            backend_options=args.backend_options,
            layout=args.layout,
            margin=args.margin,
            nprobe=args.nprobe,
        )
    except (*STARTUP_ERRORS, TensorRTUnavailable, FileNotFoundError, ImportError) as err:
        print(f"serve: error: {err}", file=sys.stderr)
        return 2
    if not args.no_warmup:
        engine.warmup()
    app = create_app(engine, limits, max_batch=args.max_batch, max_wait_ms=args.batch_wait_ms)
    log.info(
        "serving %s (%s) on http://%s:%d",
        engine.model_name,
        engine.backend.describe,
        args.host,
        args.port,
    )
    config = uvicorn_config(
        app, limits, args.host, args.port, log_level=args.log_level.lower(), workers=1
    )
    uvicorn.Server(config).run()
    engine.close()
    return 0


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


if __name__ == "__main__":
    sys.exit(main())

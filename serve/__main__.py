"""``python -m serve --artifacts ART_DIR``: the HTTP query service (uvicorn, one process).

Binds to 127.0.0.1 unless ``--host`` says otherwise. See docs/serving.md.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import sys

from serve.backends import BACKENDS

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
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--max-image-bytes", type=int, default=10 * 1024 * 1024)
    parser.add_argument("--max-image-pixels", type=int, default=40_000_000)
    parser.add_argument("--max-text-chars", type=int, default=500)
    parser.add_argument("--max-k", type=int, default=100)
    parser.add_argument(
        "--max-batch",
        type=int,
        default=None,
        help="queries per engine call (default 64 on GPU, 16 on CPU)",
    )
    parser.add_argument(
        "--batch-wait-ms",
        type=float,
        default=None,
        help="how long a batch waits for more queries (default 2 on GPU, 0 on CPU)",
    )
    parser.add_argument(
        "--rerank-top",
        type=int,
        default=50,
        help="candidates the correction network re-scores (CCNet only)",
    )
    parser.add_argument(
        "--no-warmup",
        action="store_true",
        help="skip capturing CUDA graphs for every batch bucket at start",
    )
    parser.add_argument("--log-level", default="info")
    args = parser.parse_args(argv)
    for flag in ("max_image_bytes", "max_image_pixels", "max_text_chars", "max_k", "rerank_top"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if not 0 < args.port < 65536:
        parser.error(f"--port must be in 1..65535, got {args.port}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    import uvicorn

    from serve.app import ServiceLimits, create_app
    from serve.engine import QueryEngine

    if not _is_loopback(args.host):
        log.warning("binding to %s: the service is reachable from other machines", args.host)
    engine = QueryEngine(
        args.artifacts,
        backend=args.backend,
        device=args.device,
        index_dir=args.index,
        rerank_top=args.rerank_top,
        max_image_pixels=args.max_image_pixels,
    )
    if not args.no_warmup:
        engine.warmup()
    limits = ServiceLimits(
        max_image_bytes=args.max_image_bytes, max_text_chars=args.max_text_chars, max_k=args.max_k
    )
    app = create_app(engine, limits, max_batch=args.max_batch, max_wait_ms=args.batch_wait_ms)
    log.info(
        "serving %s (%s) on http://%s:%d",
        engine.model_name,
        engine.backend.describe,
        args.host,
        args.port,
    )
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level.lower(), workers=1)
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

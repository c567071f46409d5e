"""Latency of the exported model: torch eager vs ONNX Runtime (float32, and with the int8
image encoder of export.int8) vs TensorRT (where installed).

    python -m bench.export_latency --artifacts ART_DIR [--batches 1 64] [--iters 30]
        [--text-len 12] [--device cpu|cuda] [--threads N] [--json out.json]
    python -m bench.export_latency --random-model tirg --image-size 64 [--embed-dim 512] ...

Per backend and batch size: p50/p99/mean milliseconds of every graph (image encoder, text
encoder, composer, target head, correction) and of the whole query path (encode image +
encode text + compose). Every backend is timed through the one runtime
(``export.runtime``, torch tensors on the device: no host copies on a GPU), torch eager
without CUDA graphs. The last lines give the query path's speed-up of each backend over
torch eager at each batch size. ``--random-model`` exports a random-weight checkpoint
first (a temporary ART_DIR), for machines without a trained run, and on a CPU quantizes
its image encoder on random images for the ``onnxruntime-int8`` row; with
``--artifacts`` that row needs ``ART_DIR/int8`` (``python -m export.int8``). Imports
neither Ray nor anything that needs it.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.random_model import random_artifacts
from export.runtime import BACKENDS, GraphRuntime, open_runtime

INT8_BACKEND = "onnxruntime-int8"


def time_call(
    fn: Callable[[], Any], iters: int, warmup: int, sync: Callable[[], None] = lambda: None
) -> dict[str, float]:
    """p50/p99/mean wall milliseconds of ``fn`` over ``iters`` calls after ``warmup``."""
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - start) * 1e3)
    arr = np.asarray(times)
    return {
        "p50_ms": float(np.percentile(arr, 50)),
        "p99_ms": float(np.percentile(arr, 99)),
        "mean_ms": float(arr.mean()),
        "iters": iters,
    }


def bench_backend(
    model: GraphRuntime, batch: int, text_len: int, iters: int, warmup: int, seed: int = 0
) -> dict[str, dict[str, float]]:
    """Timings of each graph and of the query path at one batch size (torch tensors on
    the runtime's device; on a GPU each call is synchronised before its time is taken)."""
    generator = torch.Generator().manual_seed(seed)
    side = model.artifacts.image_size
    device = model.device
    images = torch.randn((batch, 3, side, side), generator=generator).to(device)
    vocab_size = max(len(model.artifacts.vocab), 3)
    tokens = torch.randint(2, vocab_size, (batch, text_len), generator=generator).to(device)
    lengths = torch.randint(1, text_len + 1, (batch,), generator=generator)
    lengths[0] = text_len
    lengths = lengths.to(device)
    image_repr = model.encode_image(images)
    text_repr = model.encode_text(tokens, lengths)
    steps = {
        "image_encoder": lambda: model.encode_image(images),
        "composer": lambda: model.compose(image_repr, text_repr),
        "target_head": lambda: model.embed_target(image_repr),
    }
    if model.text_repr_names:
        steps["text_encoder"] = lambda: model.encode_text(tokens, lengths)
    if model.has_correction:
        cand = {k: v.flip(0).contiguous() for k, v in image_repr.items()}
        steps["correction"] = lambda: model.correct(image_repr, cand, text_repr)
    steps["query_path"] = lambda: model.query(images, tokens, lengths)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    return {name: time_call(fn, iters, warmup, sync) for name, fn in steps.items()}


# the runtime's backends, and ONNX Runtime with the int8 image encoder of export.int8
BENCH_BACKENDS = (*BACKENDS[:2], INT8_BACKEND, *BACKENDS[2:])


def random_int8(art_dir: Path, threads: int) -> None:
    """Int8 graphs for a random-weight export, calibrated on random images: their
    speed is that of any int8 image encoder; their accuracy says nothing."""
    from export.int8 import build_int8

    side = json.loads((art_dir / "artifacts.json").read_text())["preprocess"]["crop"]
    images = np.random.default_rng(0).standard_normal((40, 3, side, side), dtype=np.float32)
    build_int8(art_dir, images[:32], images[32:], threads=threads, overwrite=True)


def open_backend(
    name: str, art_dir: Path, device: str, threads: int
) -> tuple[GraphRuntime | None, str]:
    """The backend through ``export.runtime``, or ``(None, reason)`` when it cannot run."""
    options = {"threads": threads} if name in ("onnxruntime", INT8_BACKEND) else {}
    if name == "torch":
        options["cuda_graphs"] = False  # eager: the graphs are serve_latency's subject
    if name == INT8_BACKEND:
        name, options["precision"] = "onnxruntime", "int8"
    try:
        runtime = open_runtime(art_dir, name, device, **options)
    except Exception as err:  # no TensorRT, no GPU, no onnxruntime-gpu, or no engines built
        return None, f"skipped: {err}"
    return runtime, runtime.describe


def format_table(rows: list[dict[str, Any]]) -> str:
    lines = [f"{'backend':16s} {'batch':>5s} {'graph':14s} {'p50 ms':>9s} {'p99 ms':>9s}"]
    for r in rows:
        lines.append(
            f"{r['backend']:16s} {r['batch']:5d} {r['graph']:14s} "
            f"{r['p50_ms']:9.2f} {r['p99_ms']:9.2f}"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.export_latency", description=__doc__.split("\n")[0]
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--artifacts", metavar="ART_DIR", help="written by export.onnx")
    source.add_argument("--random-model", metavar="NAME", help="export random weights first")
    parser.add_argument("--image-size", type=int, default=64, help="with --random-model")
    parser.add_argument("--embed-dim", type=int, default=512, help="with --random-model")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--text-len", type=int, default=12)
    parser.add_argument("--iters", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument(
        "--backends",
        nargs="+",
        choices=BENCH_BACKENDS,
        default=list(BENCH_BACKENDS),
        help=f"{INT8_BACKEND}: ONNX Runtime with ART_DIR/int8 (export.int8; with "
        "--random-model it is quantized first, on random images)",
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch and ONNX Runtime intra-op threads (0: library default)",
    )
    parser.add_argument("--json", default=None, help="write the results as JSON here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        art_dir = (
            Path(args.artifacts)
            if args.artifacts
            else random_artifacts(
                Path(tmp), args.random_model, args.image_size, args.embed_dim, args.threads
            )
        )
        arts = json.loads((art_dir / "artifacts.json").read_text())
        if args.random_model and INT8_BACKEND in args.backends and args.device == "cpu":
            random_int8(art_dir, args.threads)
        rows, notes = [], {}
        for backend in args.backends:
            model, note = open_backend(backend, art_dir, args.device, args.threads)
            notes[backend] = note
            if model is None:
                print(f"{backend}: {note}", file=sys.stderr)
                continue
            for batch in args.batches:
                for graph, stats in bench_backend(
                    model, batch, args.text_len, args.iters, args.warmup
                ).items():
                    rows.append({"backend": backend, "batch": batch, "graph": graph, **stats})
    result = {
        "model": arts["model_name"],
        "embed_dim": arts["embed_dim"],
        "image_size": arts["preprocess"]["crop"],
        "text_len": args.text_len,
        "device": args.device,
        "threads": args.threads,
        "gpu": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else None,
        "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "backends": notes,
        "results": rows,
    }
    result["speedup_vs_torch"] = speedups(rows)
    print(format_table(rows))
    for line in result["speedup_vs_torch"]:
        print(
            f"query path, batch {line['batch']}: {line['backend']} is "
            f"{line['speedup']:.2f}x torch eager"
        )
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1))
        print(f"wrote {args.json}")
    return result


def speedups(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Torch eager's query-path p50 over each other backend's, per batch size."""
    query = {(r["backend"], r["batch"]): r["p50_ms"] for r in rows if r["graph"] == "query_path"}
    return [
        {"backend": backend, "batch": batch, "speedup": query[("torch", batch)] / p50}
        for (backend, batch), p50 in query.items()
        if backend != "torch" and ("torch", batch) in query
    ]


if __name__ == "__main__":
    main()

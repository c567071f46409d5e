"""Latency of the exported model: torch eager vs ONNX Runtime vs TensorRT (where installed).

    python -m bench.export_latency --artifacts ART_DIR [--batches 1 64] [--iters 30]
        [--text-len 12] [--device cpu|cuda] [--threads N] [--json out.json]
    python -m bench.export_latency --random-model tirg --image-size 64 [--embed-dim 512] ...

Per backend and batch size: p50/p99/mean milliseconds of every graph (image encoder, text
encoder, composer, target head, correction) and of the whole query path (encode image +
encode text + compose). Every backend is timed through the same numpy-in/numpy-out API
(``export.runtime``), so GPU figures include host<->device copies. ``--random-model``
exports a random-weight checkpoint first (a temporary ART_DIR), for machines without a
trained run. Imports neither Ray nor anything that needs it.
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

from export.runtime import ArtifactModel, OnnxRuntimeModel, TorchArtifactModel

BACKENDS = ("torch", "onnxruntime", "tensorrt")


def time_call(fn: Callable[[], Any], iters: int, warmup: int) -> dict[str, float]:
    """p50/p99/mean wall milliseconds of ``fn`` over ``iters`` calls after ``warmup``."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    arr = np.asarray(times)
    return {
        "p50_ms": float(np.percentile(arr, 50)),
        "p99_ms": float(np.percentile(arr, 99)),
        "mean_ms": float(arr.mean()),
        "iters": iters,
    }


def bench_backend(
    model: ArtifactModel, batch: int, text_len: int, iters: int, warmup: int, seed: int = 0
) -> dict[str, dict[str, float]]:
    """Timings of each graph and of the query path at one batch size."""
    rng = np.random.default_rng(seed)
    side = int(model.preprocess["crop"])
    images = rng.standard_normal((batch, 3, side, side)).astype(np.float32)
    tokens = rng.integers(2, max(len(model.vocab), 3), (batch, text_len)).astype(np.int64)
    lengths = rng.integers(1, text_len + 1, batch).astype(np.int64)
    lengths[0] = text_len
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
        cand = {k: v[::-1].copy() for k, v in image_repr.items()}
        steps["correction"] = lambda: model.correct(image_repr, cand, text_repr)
    steps["query_path"] = lambda: model.query(images, tokens, lengths)
    return {name: time_call(fn, iters, warmup) for name, fn in steps.items()}


def open_backend(
    name: str, art_dir: Path, device: str, threads: int
) -> tuple[ArtifactModel | None, str]:
    """The backend, or ``(None, reason)`` when it cannot run here."""
    if name == "torch":
        return TorchArtifactModel(art_dir, device=device), f"torch eager ({device})"
    if name == "onnxruntime":
        import onnxruntime as ort

        providers = ["CPUExecutionProvider"]
        if device.startswith("cuda"):
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                return None, "onnxruntime has no CUDA provider (pip install onnxruntime-gpu)"
            providers.insert(0, "CUDAExecutionProvider")
        return OnnxRuntimeModel(
            art_dir, providers=providers, threads=threads
        ), f"onnxruntime ({providers[0]})"
    try:
        from export.trt import TensorRTModel

        return TensorRTModel(art_dir), "tensorrt"
    except Exception as err:  # no TensorRT, no GPU, or no engines built
        return None, f"skipped: {err}"


def random_artifacts(
    model_name: str, image_size: int, embed_dim: int, out: Path, threads: int
) -> Path:
    """Export a random-weight ``model_name`` checkpoint to ``out``."""
    from export.onnx import export_artifacts
    from pipeline.checkpoint import save_checkpoint
    from pipeline.models import create_model
    from pipeline.vocab import Vocabulary

    vocab = Vocabulary([f"word{i}" for i in range(998)])
    torch.manual_seed(0)
    model = create_model(model_name, vocab_size=len(vocab), embed_dim=embed_dim)
    config = {
        "name": f"bench-{model_name}",
        "model": {"name": model_name},
        "image": {"size": image_size},
    }
    save_checkpoint(out / "checkpoint", model, vocab, config)
    export_artifacts(
        out / "checkpoint",
        out / "artifacts",
        threads=threads,
        parity_batches=(1, 2),
        parity_lengths=(1, 4),
    )
    return out / "artifacts"


def format_table(rows: list[dict[str, Any]]) -> str:
    lines = [f"{'backend':12s} {'batch':>5s} {'graph':14s} {'p50 ms':>9s} {'p99 ms':>9s}"]
    for r in rows:
        lines.append(
            f"{r['backend']:12s} {r['batch']:5d} {r['graph']:14s} "
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
    parser.add_argument("--backends", nargs="+", choices=BACKENDS, default=list(BACKENDS))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch and ONNX Runtime intra-op threads (0: library default)",
    )
    parser.add_argument("--json", default="export_latency.json", help="where to write results")
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
                args.random_model, args.image_size, args.embed_dim, Path(tmp), args.threads
            )
        )
        arts = json.loads((art_dir / "artifacts.json").read_text())
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
    print(format_table(rows))
    Path(args.json).write_text(json.dumps(result, indent=1))
    print(f"wrote {args.json}")
    return result


if __name__ == "__main__":
    main()

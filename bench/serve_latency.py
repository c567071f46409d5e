"""Query-serving latency: gallery search and the query network, per backend.

    python bench/serve_latency.py [--sizes 10000 100000 1000000] [--batches 1 64]
        [--device auto|cpu|cuda] [--backends torch onnxruntime tensorrt]
        [--artifacts ART_DIR | --model tirg --image-size 224] [--seconds 2]
        [--threads N] [--json-out results/serve_latency.json]

Two tables, p50/p99 milliseconds per call and queries per second:

* search: ``serve.search.GallerySearch`` over N random unit embeddings (D=512, stored
  float16 as export.index writes them): fp16 on the GPU, float32 on the CPU; next to
  faiss-cpu ``IndexFlatIP`` on the same data (skipped with a note when faiss is
  missing), with the share of top-k ids both agree on.
* query network: reference image + text -> query embedding (``encode_image`` +
  ``compose_query`` of ``export.runtime``) for torch eager, torch + CUDA graphs (GPU),
  onnxruntime (CUDA provider when onnxruntime-gpu is installed, else CPU) and tensorrt
  (when TensorRT is installed; engines built with ``export.trt.build_all``). Without
  ``--artifacts`` a random-weight model is exported to a temporary ART_DIR first.

Needs torch + onnxruntime only (no Ray, no faiss).
"""

from __future__ import annotations

import argparse
import json
import logging
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
from serve.search import GallerySearch

log = logging.getLogger("bench.serve_latency")


def unit_rows(count: int, dim: int, seed: int, dtype=np.float16, chunk: int = 65536) -> np.ndarray:
    """(count, dim) random unit vectors, generated in chunks (1M x 512 fits in 1 GiB fp16)."""
    rng = np.random.default_rng(seed)
    out = np.empty((count, dim), dtype=dtype)
    for start in range(0, count, chunk):
        rows = rng.standard_normal((min(chunk, count - start), dim), dtype=np.float32)
        out[start : start + len(rows)] = rows / np.linalg.norm(rows, axis=1, keepdims=True)
    return out


def time_calls(
    fn: Callable[[], Any],
    seconds: float,
    min_reps: int,
    warmup: int = 2,
    sync: Callable[[], None] = lambda: None,
) -> dict[str, float]:
    """Run ``fn`` ``warmup`` times, then until ``seconds`` passed and ``min_reps`` ran;
    p50/p99/mean milliseconds per call."""
    for _ in range(warmup):
        fn()
    sync()
    times: list[float] = []
    began = time.perf_counter()
    while len(times) < min_reps or time.perf_counter() - began < seconds:
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
        if len(times) >= 100_000:
            break
    ms = np.asarray(times) * 1e3
    return {
        "p50_ms": float(np.percentile(ms, 50)),
        "p99_ms": float(np.percentile(ms, 99)),
        "mean_ms": float(ms.mean()),
        "reps": len(times),
    }


def bench_search(
    sizes: list[int],
    dim: int,
    batches: list[int],
    k: int,
    device: torch.device,
    seconds: float,
    min_reps: int,
    use_faiss: bool,
) -> tuple[list[dict], list[str]]:
    rows, notes = [], []
    faiss = None
    if use_faiss:
        try:
            import faiss
        except ImportError:
            notes.append("faiss not installed: no IndexFlatIP reference (pip install faiss-cpu)")
    for size in sizes:
        gallery = unit_rows(size, dim, seed=size)
        search = GallerySearch(gallery, device)
        index = None
        if faiss is not None:
            index = faiss.IndexFlatIP(dim)
            for start in range(0, size, 65536):
                index.add(np.ascontiguousarray(gallery[start : start + 65536], dtype=np.float32))
        for batch in batches:
            queries = unit_rows(batch, dim, seed=7, dtype=np.float32)
            q = torch.from_numpy(queries)
            stats = time_calls(lambda s=search, q=q: s.search(q, k), seconds, min_reps)
            rows.append(_row("search", f"torch {search.layout}", str(device), size, batch, stats))
            if index is not None:
                stats = time_calls(lambda i=index, x=queries: i.search(x, k), seconds, min_reps)
                ours = search.search(q, k)[1].numpy()
                theirs = index.search(queries, k)[1]
                agree = float(np.mean([len(set(a) & set(b)) / k for a, b in zip(ours, theirs)]))
                rows.append(
                    {
                        **_row("search", "faiss IndexFlatIP fp32", "cpu", size, batch, stats),
                        "topk_agreement": agree,
                    }
                )
            log.info("search N=%d B=%d done", size, batch)
        search = index = gallery = None  # free this size's copies before the next
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows, notes


def query_backends(
    artifacts, device: torch.device, names: list[str], threads: int
) -> tuple[list[tuple[str, Any]], list[str]]:
    """(label, runtime) pairs to time, and notes on the ones that cannot run here."""
    from export.runtime import open_runtime

    backends, notes = [], []
    for name in names:
        if name == "torch":
            backends.append(
                ("torch eager", open_runtime(artifacts, "torch", device, cuda_graphs=False))
            )
            if device.type == "cuda":
                graphed = open_runtime(artifacts, "torch", device, cuda_graphs=True)
                backends.append(("torch CUDA graphs", graphed))
        elif name == "onnxruntime":
            import onnxruntime as ort

            ort_device = device
            if (
                device.type == "cuda"
                and "CUDAExecutionProvider" not in ort.get_available_providers()
            ):
                notes.append(
                    "onnxruntime has no CUDA provider (install onnxruntime-gpu): timed on the CPU"
                )
                ort_device = torch.device("cpu")
            backend = open_runtime(artifacts, "onnxruntime", ort_device, threads=threads)
            backends.append((backend.describe, backend))
        elif name == "tensorrt":
            if device.type != "cuda":
                notes.append("tensorrt: needs a CUDA device")
                continue
            try:
                from export.trt import build_all

                build_all(artifacts.dir, max_batch=64)
                backends.append(("tensorrt", open_runtime(artifacts, "tensorrt", device)))
            except Exception as err:  # TensorRT missing or a build failure: report, go on
                notes.append(f"tensorrt skipped: {type(err).__name__}: {err}")
    return backends, notes


def bench_query_network(
    art_dir: Path,
    device: torch.device,
    backend_names: list[str],
    batches: list[int],
    seconds: float,
    min_reps: int,
    threads: int,
    text_len: int = 8,
) -> tuple[list[dict], list[str]]:
    from export.artifacts import load_artifacts

    arts = load_artifacts(art_dir)
    side = arts.image_size
    vocab_size = len(arts.vocab)
    backends, notes = query_backends(arts, device, backend_names, threads)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    rows = []
    for label, backend in backends:
        for batch in batches:
            gen = torch.Generator().manual_seed(batch)
            images = torch.randn((batch, 3, side, side), generator=gen).to(device)
            tokens = torch.randint(2, vocab_size, (batch, text_len), generator=gen).to(device)
            lengths = torch.full((batch,), text_len, dtype=torch.long).to(device)

            def run(backend=backend, images=images, tokens=tokens, lengths=lengths):
                return backend.compose_query(backend.encode_image(images), tokens, lengths)[0]

            stats = time_calls(run, seconds, min_reps, warmup=3, sync=sync)
            rows.append(_row("query network", label, str(backend.device), None, batch, stats))
            log.info("query network %s B=%d done", label, batch)
    return rows, notes


def _row(
    part: str, method: str, device: str, size: int | None, batch: int, stats: dict[str, float]
) -> dict[str, Any]:
    return {
        "part": part,
        "method": method,
        "device": device,
        "gallery": size,
        "batch": batch,
        **stats,
        "queries_per_s": batch * 1e3 / stats["mean_ms"],
    }


def format_table(rows: list[dict]) -> str:
    head = (
        f"{'part':14s} {'method':34s} {'device':7s} {'gallery':>9s} {'batch':>5s} "
        f"{'p50 ms':>9s} {'p99 ms':>9s} {'queries/s':>10s} {'agree':>6s}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        agree = f"{r['topk_agreement']:.3f}" if "topk_agreement" in r else ""
        lines.append(
            f"{r['part']:14s} {r['method']:34s} {r['device']:7s} "
            f"{r['gallery'] or '':>9} {r['batch']:>5d} {r['p50_ms']:9.3f} "
            f"{r['p99_ms']:9.3f} {r['queries_per_s']:10.1f} {agree:>6s}"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--device", default="auto", help="auto (cuda if present), cpu, cuda")
    parser.add_argument(
        "--backends",
        nargs="+",
        default=["torch", "onnxruntime", "tensorrt"],
        choices=["torch", "onnxruntime", "tensorrt"],
    )
    parser.add_argument(
        "--artifacts",
        default=None,
        help="ART_DIR for the query network (default: export a random model)",
    )
    parser.add_argument("--model", default="tirg")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--seconds", type=float, default=2.0, help="timing budget per cell")
    parser.add_argument("--min-reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: all cores)")
    parser.add_argument("--skip-search", action="store_true")
    parser.add_argument("--skip-network", action="store_true")
    parser.add_argument("--no-faiss", action="store_true")
    parser.add_argument("--json-out", default="results/serve_latency.json")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    device = torch.device(
        ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    )
    if args.threads:
        torch.set_num_threads(args.threads)
        try:
            import faiss

            faiss.omp_set_num_threads(args.threads)
        except ImportError:
            pass
    rows, notes = [], []
    if not args.skip_search:
        found, why = bench_search(
            args.sizes,
            args.dim,
            args.batches,
            args.k,
            device,
            args.seconds,
            args.min_reps,
            not args.no_faiss,
        )
        rows += found
        notes += why
    if not args.skip_network:
        with tempfile.TemporaryDirectory(prefix="serve-bench-") as tmp:
            threads = torch.get_num_threads()
            art_dir = (
                Path(args.artifacts)
                if args.artifacts
                else random_artifacts(Path(tmp), args.model, args.image_size, args.dim)
            )
            torch.set_num_threads(threads)  # the export's parity check may change it
            found, why = bench_query_network(
                art_dir,
                device,
                args.backends,
                args.batches,
                args.seconds,
                args.min_reps,
                args.threads,
            )
            rows += found
            notes += why
    env = {
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "model": args.model if not args.artifacts else str(args.artifacts),
        "image_size": args.image_size,
        "dim": args.dim,
        "k": args.k,
    }
    print(format_table(rows))
    for note in notes:
        print("note:", note)
    out = Path(args.json_out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {"env": env, "rows": rows, "notes": notes, "command": " ".join(sys.argv)}, indent=1
        )
    )
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

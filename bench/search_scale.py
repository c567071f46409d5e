"""Gallery search at catalogue scale: exact fp32 against the fp16, int8 and faiss layouts.

    python -m bench.search_scale [--rows 1000000 10000000] [--dim 512] [--batches 1 64]
        [--queries 64] [--layouts exact fp16 int8 faiss] [--workdir /tmp/search-scale]
        [--threads 2] [--json-out docs/results/<machine>-<date>/search_scale.json]

Synthetic galleries of clustered unit vectors (as embeddings are; uniform noise has no
neighbours to find), stored float16 in a memory map as ``export.index`` stores them, are
searched with ``serve.search.GallerySearch`` in each layout. ``exact`` is today's CPU
search: float32 rows in memory where they fit ``--resident-gb``, else streamed from the
memory map in chunks. The others select ``k + margin`` candidates and re-score them in
float32 from the stored rows. Per layout, size and batch: p50/p99 milliseconds per call,
queries/s, resident memory of the layout, recall@10 against exact search, the share of
queries whose top-10 differs from exact, and the speed-up over exact. Every loop is
bounded by ``--queries`` and ``--max-seconds``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from serve.search import GallerySearch

log = logging.getLogger("bench.search_scale")


def clustered_gallery(path: Path, rows: int, dim: int, seed: int = 0, chunk: int = 262144):
    """(rows, dim) float16 unit vectors around rows / 1000 centres, in a .npy memory map
    (made once per size and seed, then reused)."""
    if path.is_file():
        array = np.load(path, mmap_mode="r")
        if array.shape == (rows, dim):
            return array
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((max(1, rows // 1000), dim), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=(rows, dim))
    spread = np.float32(0.6 / np.sqrt(dim))
    for start in range(0, rows, chunk):
        count = min(chunk, rows - start)
        block = centres[rng.integers(0, len(centres), count)]
        block += spread * rng.standard_normal((count, dim), dtype=np.float32)
        block /= np.linalg.norm(block, axis=1, keepdims=True)
        out[start : start + count] = block
    out.flush()
    return np.load(path, mmap_mode="r")


def query_set(gallery: np.ndarray, count: int, seed: int = 1) -> torch.Tensor:
    """Queries near gallery rows (the answer of a composed query is in the gallery)."""
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(len(gallery), count, replace=False))
    base = np.asarray(gallery[rows], dtype=np.float32)
    base += (0.3 / np.sqrt(base.shape[1])) * rng.standard_normal(base.shape, dtype=np.float32)
    return torch.from_numpy(base / np.linalg.norm(base, axis=1, keepdims=True))


def time_batches(search: GallerySearch, queries: torch.Tensor, batch: int, max_seconds: float):
    """Per-call wall times and the top-10 rows of every query searched (bounded)."""
    search.search(queries[:batch], 10)  # warm up
    times, found = [], []
    began = time.perf_counter()
    for start in range(0, len(queries) - batch + 1, batch):
        tick = time.perf_counter()
        _, rows = search.search(queries[start : start + batch], 10)
        times.append(time.perf_counter() - tick)
        found.append(rows)
        if time.perf_counter() - began > max_seconds:
            break
    return np.asarray(times), torch.cat(found)


def open_layout(layout: str, gallery: np.ndarray, index_dir: Path, resident_gb: float, margin: int):
    if layout == "faiss":
        from serve.faiss_build import build_faiss

        if not (index_dir / "gallery.faiss").is_file():
            started = time.perf_counter()
            info = build_faiss(gallery, index_dir, margin=margin)
            log.info("faiss built in %.0f s: %s", time.perf_counter() - started, info)
    return GallerySearch(
        gallery,
        "cpu",
        layout=layout,
        margin=margin,
        index_dir=index_dir,
        max_resident_bytes=int(resident_gb * (1 << 30)),
    )


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows_out = []
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    for size in args.rows:
        gallery = clustered_gallery(workdir / f"gallery-{size}x{args.dim}.npy", size, args.dim)
        queries = query_set(gallery, args.queries)
        index_dir = workdir / f"faiss-{size}"
        index_dir.mkdir(exist_ok=True)
        exact_rows: dict[int, torch.Tensor] = {}
        exact_p50: dict[int, float] = {}
        for layout in args.layouts:
            search = open_layout(layout, gallery, index_dir, args.resident_gb, args.margin)
            for batch in args.batches:
                times, found = time_batches(search, queries, batch, args.max_seconds)
                if layout == "exact":
                    exact_rows[batch], exact_p50[batch] = found, float(np.percentile(times, 50))
                reference = exact_rows.get(batch)
                recall = differ = None
                if reference is not None:
                    n = min(len(found), len(reference))
                    overlap = [
                        len(set(a.tolist()) & set(b.tolist())) / 10
                        for a, b in zip(found[:n], reference[:n])
                    ]
                    recall = float(np.mean(overlap))
                    differ = float(np.mean([o < 1.0 for o in overlap]))
                p50 = float(np.percentile(times, 50))
                row = {
                    "layout": layout,
                    "rows": size,
                    "batch": batch,
                    "calls": len(times),
                    "p50_ms": round(p50 * 1e3, 3),
                    "p99_ms": round(float(np.percentile(times, 99)) * 1e3, 3),
                    "queries_per_s": round(batch / p50, 1),
                    "resident_bytes": int(search.resident_bytes),
                    "recall_at_10": recall,
                    "topk_differs_share": differ,
                    "speedup_vs_exact": round(exact_p50[batch] / p50, 2)
                    if batch in exact_p50
                    else None,
                }
                rows_out.append(row)
                log.info("%s", row)
            del search
    return rows_out


def print_table(rows: list[dict[str, Any]], header: str) -> None:
    print(header)
    print(
        "| layout | rows | batch | p50 ms | p99 ms | queries/s | resident MB | recall@10 "
        "| top-10 differs | speed-up vs exact |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        recall = "-" if r["recall_at_10"] is None else f"{r['recall_at_10']:.4f}"
        differ = (
            "-" if r["topk_differs_share"] is None else f"{100 * r['topk_differs_share']:.1f} %"
        )
        speed = "-" if r["speedup_vs_exact"] is None else f"{r['speedup_vs_exact']:.1f}x"
        print(
            f"| {r['layout']} | {r['rows']:,} | {r['batch']} | {r['p50_ms']:.2f} | "
            f"{r['p99_ms']:.2f} | {r['queries_per_s']:.0f} | {r['resident_bytes'] / 2**20:.0f} "
            f"| {recall} | {differ} | {speed} |"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.search_scale",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--rows", type=int, nargs="+", default=[1_000_000, 10_000_000])
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--queries", type=int, default=64, help="queries per (size, batch)")
    parser.add_argument(
        "--layouts", nargs="+", default=["exact", "fp16", "int8", "faiss"], help="exact first"
    )
    parser.add_argument("--margin", type=int, default=32)
    parser.add_argument("--resident-gb", type=float, default=4.0, help="exact fp32 in memory up to")
    parser.add_argument("--max-seconds", type=float, default=60.0, help="per (layout, size, batch)")
    parser.add_argument("--workdir", default="/tmp/search-scale")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--json-out", default=None)
    args = parser.parse_args(argv)
    if args.queries < max(args.batches):
        parser.error(
            f"--queries ({args.queries}) must be >= the largest batch ({max(args.batches)})"
        )
    if args.layouts[0] != "exact":
        parser.error("--layouts must start with exact (the reference of recall and speed-up)")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = run(args)
    machine = f"{platform.node() or 'host'}, {os.cpu_count()} cores, {platform.machine()}"
    print_table(rows, f"gallery search on {machine}, torch {torch.__version__}, D={args.dim}")
    if args.json_out:
        Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_out).write_text(
            json.dumps({"machine": machine, "torch": torch.__version__, "rows": rows}, indent=1)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

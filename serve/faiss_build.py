"""Build the ``faiss`` gallery layout at index time: train an IVF-PQ index of the
gallery's rows, write it into the index directory, and measure its recall@k (with the
same float32 re-scoring serving does) against exact search. ``export.index --faiss``
calls ``build_faiss``."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from serve.layouts import FAISS_FILE, FAISS_INFO, import_faiss
from serve.search import GallerySearch

log = logging.getLogger(__name__)


def faiss_settings(count: int) -> dict[str, int]:
    """IVF-PQ sizes for ``count`` rows: about sqrt(N) cells (at most 2048, so that adding
    10M rows stays minutes on a few cores; at least 39 rows per cell to train),
    64 sub-quantisers of 8 bits (64 bytes a row), 1/32 of the cells probed."""
    nlist = int(max(1, min(np.sqrt(count), 2048, count // 39)))
    return {"nlist": nlist, "m": 64, "nbits": 8, "nprobe": max(1, nlist // 32)}


def build_faiss(
    source: np.ndarray,
    index_dir: Path,
    *,
    nlist: int | None = None,
    m: int = 64,
    nbits: int = 8,
    nprobe: int | None = None,
    train_rows: int = 200_000,
    check_queries: int = 200,
    k: int = 10,
    margin: int = 32,
    candidates: int = 800,
    chunk_rows: int = 65536,
    seed: int = 0,
) -> dict[str, Any]:
    """Train and fill an IVF-PQ index of ``source`` (N, D) unit rows into ``index_dir``;
    measure its recall@k (after float32 re-scoring of ``candidates`` candidates per query,
    as serving does: PQ codes rank near neighbours coarsely, so the re-scoring, not
    ``nprobe``, decides the recall) against exact search on ``check_queries`` rows of the gallery with a
    little noise added. Returns (and stores in ``faiss.json``) the settings and recall."""
    faiss = import_faiss()
    count, dim = source.shape
    defaults = faiss_settings(count)
    nlist = nlist or defaults["nlist"]
    nprobe = nprobe or defaults["nprobe"]
    if dim % m:
        raise ValueError(f"faiss PQ needs D ({dim}) divisible by m ({m})")
    nbits = int(min(nbits, max(1, np.floor(np.log2(count)))))  # PQ trains 2^nbits centroids
    rng = np.random.default_rng(seed)
    sample = np.sort(rng.choice(count, size=min(count, max(train_rows, nlist * 39)), replace=False))
    quantizer = faiss.IndexFlatIP(dim)
    index = faiss.IndexIVFPQ(quantizer, dim, nlist, m, nbits, faiss.METRIC_INNER_PRODUCT)
    index.train(np.ascontiguousarray(source[sample], dtype=np.float32))
    for start in range(0, count, chunk_rows):
        index.add(np.ascontiguousarray(source[start : start + chunk_rows], dtype=np.float32))
    index.nprobe = nprobe
    index_dir = Path(index_dir)
    faiss.write_index(index, str(index_dir / FAISS_FILE))
    info = {
        "nlist": nlist,
        "m": m,
        "nbits": nbits,
        "nprobe": nprobe,
        "k": k,
        "candidates": candidates,
    }
    (index_dir / FAISS_INFO).write_text(json.dumps(info))
    queries = check_queries_from(source, check_queries, rng)
    info["recall_at_k"] = measured_recall(source, index_dir, queries, k, margin, chunk_rows)
    (index_dir / FAISS_INFO).write_text(json.dumps(info, indent=1))
    log.info("faiss IVF%d,PQ%dx%d: recall@%d %.4f", nlist, m, nbits, k, info["recall_at_k"])
    return info


def check_queries_from(source: np.ndarray, count: int, rng) -> torch.Tensor:
    """Queries near gallery rows (a row plus noise, renormalised): like composed queries,
    whose answers lie in the gallery, unlike random directions."""
    rows = np.sort(rng.choice(len(source), size=min(count, len(source)), replace=False))
    base = torch.from_numpy(np.asarray(source[rows], dtype=np.float32))
    noisy = base + 0.5 * base.std() * torch.from_numpy(rng.standard_normal(base.shape, np.float32))
    return noisy / noisy.norm(dim=1, keepdim=True)


def measured_recall(
    source: np.ndarray, index_dir: Path, queries: torch.Tensor, k: int, margin: int, chunk_rows: int
) -> float:
    """Share of the exact top-k that the faiss layout returns, re-scoring included."""
    exact = GallerySearch(source, "cpu", chunk_rows=chunk_rows, max_resident_bytes=0)
    approx = GallerySearch(
        source, "cpu", layout="faiss", index_dir=index_dir, margin=margin, chunk_rows=chunk_rows
    )
    _, want = exact.search(queries, k)
    _, got = approx.search(queries, k)
    hits = sum(len(set(w.tolist()) & set(g.tolist())) for w, g in zip(want, got))
    return hits / (len(queries) * k)

"""Compressed and approximate gallery layouts: they *select* candidates, and
``serve.search.GallerySearch`` re-scores the candidates exactly (float64) from the stored rows.

* ``fp16``: the rows as float16 (half the memory of float32); candidate scores are one
  float16-stored matrix product.
* ``int8``: the rows quantised per row (``x ~ scale_row * int8_row``, scale = max |x| /
  127; a quarter of float32); queries are quantised per query the same way and the
  candidate scores are one int8 x int8 -> int32 matrix product (``torch._int_mm``: VNNI
  on x86 CPUs, tensor cores on a GPU), times both scales.
* ``faiss``: an inverted-file index with product-quantised codes (``faiss.IndexIVFPQ``,
  trained when the index is built; ``serve.faiss_build.build_faiss``): a query visits
  ``nprobe`` of ``nlist`` cells. For 10M+ rows, where exact search costs a pass over
  every row per query. Its recall@k against exact search is measured at build time and
  stored with it (``serve.faiss_build``).

A layout returns ``count`` candidate rows per query; re-scoring keeps the result exact
whenever the true top-k is among them (``fp16``, ``int8``: unless quantisation error
exceeds the margin; ``faiss``: its measured recall).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger(__name__)

LAYOUTS = ("exact", "fp16", "int8", "faiss")
FAISS_FILE = "gallery.faiss"
FAISS_INFO = "faiss.json"


class Fp16Rows:
    """(N, D) rows held as float16 on ``device``."""

    name = "fp16"

    def __init__(self, source: np.ndarray, device: torch.device, chunk_rows: int):
        self.rows = torch.empty(source.shape, dtype=torch.float16, device=device)
        for start in range(0, len(source), chunk_rows):
            block = np.asarray(source[start : start + chunk_rows], dtype=np.float32)
            self.rows[start : start + len(block)] = torch.from_numpy(block).to(device).half()
        self.nbytes = self.rows.numel() * 2

    def candidates(self, queries: torch.Tensor, count: int) -> torch.Tensor:
        """(B, D) float32 queries -> (B, count) candidate rows (int64, on the CPU)."""
        scores = queries.to(self.rows.device, torch.float16) @ self.rows.T
        return torch.topk(scores, count, dim=1, sorted=False).indices.cpu()


class Int8Rows:
    """(N, D) rows quantised per row to int8, with their (N,) float32 scales."""

    name = "int8"
    block_rows = 65536

    def __init__(self, source: np.ndarray, device: torch.device, chunk_rows: int):
        count, dim = source.shape
        self.rows = torch.empty((count, dim), dtype=torch.int8, device=device)
        self.scales = torch.empty(count, dtype=torch.float32, device=device)
        for start in range(0, count, chunk_rows):
            block = torch.from_numpy(np.asarray(source[start : start + chunk_rows], np.float32))
            codes, scale = quantize_rows(block.to(device))
            self.rows[start : start + len(block)] = codes
            self.scales[start : start + len(block)] = scale
        self.nbytes = self.rows.numel() + self.scales.numel() * 4

    def candidates(self, queries: torch.Tensor, count: int) -> torch.Tensor:
        codes, _ = quantize_rows(queries.to(self.rows.device, torch.float32))
        batch = len(codes)
        if self.rows.is_cuda and batch <= 16:  # CUDA's int8 product wants more than 16 rows
            codes = torch.cat([codes, codes[:1].expand(17 - batch, -1)])
        # Blocks of rows keep the (B, block) scores in cache instead of a (B, N) float
        # matrix in memory; each block's top ``count`` joins a running top ``count``.
        best_scores, best_rows = None, None
        for start in range(0, len(self.rows), self.block_rows):
            block = self.rows[start : start + self.block_rows]
            # int32 dot products times the row scales; the query's own scale is one
            # factor per query and does not change its order, so it is left out
            scores = torch._int_mm(codes, block.T)[:batch] * self.scales[start : start + len(block)]
            top, where = torch.topk(scores, min(count, len(block)), dim=1, sorted=False)
            where = where + start
            if best_scores is not None:
                top, where = torch.cat([best_scores, top], 1), torch.cat([best_rows, where], 1)
                keep = torch.topk(top, min(count, top.shape[1]), dim=1, sorted=False).indices
                top, where = torch.gather(top, 1, keep), torch.gather(where, 1, keep)
            best_scores, best_rows = top, where
        return best_rows.cpu()


def quantize_rows(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(R, D) float32 -> (int8 codes (R, D), scales (R,)) with rows ~ scale * codes."""
    scale = rows.abs().amax(dim=1).clamp(min=1e-12) / 127.0
    codes = torch.round(rows / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return codes, scale


class FaissRows:
    """A trained ``faiss`` IVF-PQ index of the rows (``build_faiss``), searched with
    ``nprobe`` cells per query (the GPU build where faiss has one)."""

    name = "faiss"

    def __init__(self, index_dir: Path, nprobe: int | None = None, device=None):
        faiss = import_faiss()
        path = Path(index_dir) / FAISS_FILE
        if not path.is_file():
            raise FileNotFoundError(
                f"{path}: missing (build it with `python -m export.index ... --faiss`)"
            )
        self.info = json.loads((Path(index_dir) / FAISS_INFO).read_text())
        self.index = faiss.read_index(str(path))
        self.nprobe = int(nprobe or self.info["nprobe"])
        self.min_candidates = int(self.info.get("candidates", 0))  # re-scored per query
        faiss.extract_index_ivf(self.index).nprobe = self.nprobe
        self.nbytes = path.stat().st_size
        device = torch.device(device or "cpu")
        if device.type == "cuda" and hasattr(faiss, "StandardGpuResources"):  # faiss-gpu
            self._resources = faiss.StandardGpuResources()
            self.index = faiss.index_cpu_to_gpu(self._resources, device.index or 0, self.index)
            self.index.nprobe = self.nprobe

    def candidates(self, queries: torch.Tensor, count: int) -> torch.Tensor:
        _, rows = self.index.search(np.ascontiguousarray(queries.float().cpu().numpy()), count)
        return torch.from_numpy(rows.astype(np.int64))


def import_faiss():
    try:
        import faiss
    except ImportError as err:
        raise ImportError(
            "the faiss layout needs faiss (pip install faiss-cpu, or faiss-gpu where CUDA is)"
        ) from err
    return faiss

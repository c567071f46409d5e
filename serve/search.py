"""Exact top-k inner-product search over a gallery's (N, D) unit embeddings.

Scores are dot products of unit vectors (``pipeline.models.base``), so the best match
is the largest score. Two layouts:

* GPU: the gallery is copied once into a preallocated fp16 (N, D) tensor on the device;
  a batch of queries is one fp16 matrix product + ``topk`` over (B, N). The fp16
  scores only *select* ``k + margin`` candidates; their scores are then recomputed in
  float32 from the same stored rows, so GPU and CPU report the same numbers.
* CPU: float32 matrix products. A gallery that fits ``max_resident_bytes`` as float32
  is held in memory; a larger one is streamed from the memory map in chunks of
  ``chunk_rows`` rows, keeping a running top-k.

Ties are broken by the lower row, so every backend returns the same order.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

log = logging.getLogger(__name__)

# Extra candidates the fp16 pass keeps before the float32 rescoring: fp16 scores of unit
# vectors are off by ~1e-3, enough to swap neighbours at the cut.
FP16_MARGIN = 16


class GallerySearch:
    """Top-k search of (B, D) float32 queries against ``embeddings`` (N, D)."""

    def __init__(
        self,
        embeddings: np.ndarray,
        device: str | torch.device = "cpu",
        *,
        chunk_rows: int = 65536,
        max_resident_bytes: int = 4 << 30,
    ):
        self.device = torch.device(device)
        self.count, self.dim = embeddings.shape
        self.source = embeddings
        self.chunk_rows = int(chunk_rows)
        if self.chunk_rows < 1:
            raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
        self.gallery: torch.Tensor | None = None
        if self.device.type == "cuda":
            self.gallery = torch.empty(
                (self.count, self.dim), dtype=torch.float16, device=self.device
            )
            for start in range(0, self.count, self.chunk_rows):
                rows = np.asarray(embeddings[start : start + self.chunk_rows])
                self.gallery[start : start + len(rows)].copy_(
                    torch.from_numpy(rows).to(torch.float16)
                )
            self.layout = "device-fp16"
        elif self.count * self.dim * 4 <= max_resident_bytes:
            self.gallery = torch.from_numpy(np.ascontiguousarray(embeddings, dtype=np.float32))
            self.layout = "resident-fp32"
        else:
            self.layout = "chunked-mmap-fp32"
        log.info(
            "gallery search: %d x %d, %s on %s", self.count, self.dim, self.layout, self.device
        )

    def search(
        self, queries: torch.Tensor, k: int, exclude_rows: list[int | None] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """queries (B, D) -> (scores (B, k) float32, rows (B, k) int64), both on the CPU.

        ``exclude_rows[b]`` (a row or None) is left out of query b's results (a gallery
        reference is not its own answer). ``k`` is capped at the gallery size; where
        exclusion leaves fewer than ``k`` rows, the last places hold score ``-inf``.
        """
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise ValueError(f"queries must be (B, {self.dim}), got {tuple(queries.shape)}")
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        excluded = exclude_rows if exclude_rows is not None else [None] * len(queries)
        if len(excluded) != len(queries):
            raise ValueError(f"{len(excluded)} exclude_rows for {len(queries)} queries")
        extra = 1 if any(r is not None for r in excluded) else 0
        wanted = min(self.count, k + extra)
        with torch.inference_mode():
            if self.layout == "device-fp16":
                scores, rows = self._search_device(queries, wanted)
            elif self.layout == "resident-fp32":
                scores, rows = _topk(queries.float().cpu() @ self.gallery.T, wanted)
            else:
                scores, rows = self._search_chunked(queries.float().cpu(), wanted)
            return _finish(scores.cpu(), rows.cpu(), excluded, min(k, self.count))

    def _search_device(
        self, queries: torch.Tensor, wanted: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        queries = queries.to(self.device, torch.float32)
        candidates = min(self.count, wanted + FP16_MARGIN)
        _, rows = torch.topk(queries.half() @ self.gallery.T, candidates, dim=1, sorted=False)
        exact = torch.einsum("bd,bcd->bc", queries, self.gallery[rows].float())
        return _topk_of(exact, rows, wanted)

    def _search_chunked(
        self, queries: torch.Tensor, wanted: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        best_scores = torch.empty((len(queries), 0))
        best_rows = torch.empty((len(queries), 0), dtype=torch.long)
        for start in range(0, self.count, self.chunk_rows):
            chunk = torch.from_numpy(
                np.asarray(self.source[start : start + self.chunk_rows], dtype=np.float32)
            )
            scores, rows = _topk(queries @ chunk.T, min(wanted, len(chunk)))
            best_scores = torch.cat([best_scores, scores], dim=1)
            best_rows = torch.cat([best_rows, rows + start], dim=1)
            best_scores, best_rows = _topk_of(
                best_scores, best_rows, min(wanted, best_rows.shape[1])
            )
        return best_scores, best_rows


def _topk(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.topk(scores, k, dim=1, sorted=False)


def _topk_of(scores: torch.Tensor, rows: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Best ``k`` of candidate (scores, rows) (B, C), each row kept with its score."""
    top, where = torch.topk(scores, k, dim=1, sorted=False)
    return top, torch.gather(rows, 1, where)


def _finish(
    scores: torch.Tensor, rows: torch.Tensor, excluded: list[int | None], k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop excluded rows, order by (score desc, row asc), keep ``k``: (B, k) each."""
    scores = scores.float().clone()
    for b, row in enumerate(excluded):
        if row is not None:
            scores[b][rows[b] == row] = -torch.inf
    by_row = torch.argsort(rows, dim=1)
    scores, rows = torch.gather(scores, 1, by_row), torch.gather(rows, 1, by_row)
    by_score = torch.sort(scores, dim=1, descending=True, stable=True).indices
    scores, rows = torch.gather(scores, 1, by_score), torch.gather(rows, 1, by_score)
    return scores[:, :k].contiguous(), rows[:, :k].contiguous()

"""Top-k inner-product search over a gallery's (N, D) unit embeddings.

Scores are dot products of unit vectors (``pipeline.models.base``), so the best match
is the largest score. ``layout="exact"`` (default) searches every row in float32 (or
selects with fp16 on the GPU, below); ``fp16``, ``int8`` and ``faiss``
(``serve.layouts``) select ``k + margin`` candidates from compressed or approximate rows,
which are then re-scored exactly (float64, rounded to float32) from the stored rows.
The exact layout:

* GPU: the gallery is copied once into a preallocated fp16 (N, D) tensor on the device;
  a batch of queries is one fp16 matrix product + ``topk`` over (B, N). The fp16
  scores only *select* ``k + margin`` candidates; their scores are then recomputed in
  float32 from the same stored rows, so GPU and CPU report the same numbers.
* CPU: float32 matrix products. A gallery that fits ``max_resident_bytes`` as float32
  is held in memory; a larger one is streamed from the memory map in chunks of
  ``chunk_rows`` rows, keeping a running top-k.

Ties are broken by the lower row, so every backend returns the same order, and the
scores returned are recomputed in float64 for the rows found (then float32), so one
(query, row) pair gets the same score in every layout, shard split and batch.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from serve.layouts import LAYOUTS, Fp16Rows

log = logging.getLogger(__name__)

# Extra candidates the fp16 pass keeps before the float32 rescoring: fp16 scores of unit
# vectors are off by ~1e-3, enough to swap neighbours at the cut.
FP16_MARGIN = 16
# ... and what the compressed layouts keep (int8 errors are ~1e-2 on 512-d unit rows)
DEFAULT_MARGIN = 32


class GallerySearch:
    """Top-k search of (B, D) float32 queries against ``embeddings`` (N, D)."""

    def __init__(
        self,
        embeddings: np.ndarray,
        device: str | torch.device = "cpu",
        *,
        chunk_rows: int = 65536,
        max_resident_bytes: int = 4 << 30,
        layout: str = "exact",
        margin: int = DEFAULT_MARGIN,
        index_dir: str | Path | None = None,
        nprobe: int | None = None,
    ):
        self.device = torch.device(device)
        self.count, self.dim = embeddings.shape
        self.source = embeddings
        self.chunk_rows = int(chunk_rows)
        if self.chunk_rows < 1:
            raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
        if layout not in LAYOUTS:
            raise ValueError(f"unknown gallery layout {layout!r}; expected one of {LAYOUTS}")
        if margin < 0:
            raise ValueError(f"margin must be >= 0, got {margin}")
        self.margin = int(margin)
        self.gallery: torch.Tensor | None = None
        self.selector = None
        if layout != "exact":
            self.selector = _selector(
                layout, embeddings, self.device, self.chunk_rows, index_dir, nprobe
            )
            self.layout = f"{layout}+rescore"
            self.resident_bytes = self.selector.nbytes
        elif self.device.type == "cuda":  # the fp16 layout's rows, re-scored on the device
            self.gallery = Fp16Rows(embeddings, self.device, self.chunk_rows).rows
            self.layout = "device-fp16"
        elif self.count * self.dim * 4 <= max_resident_bytes:
            self.gallery = torch.from_numpy(np.ascontiguousarray(embeddings, dtype=np.float32))
            self.layout = "resident-fp32"
        else:
            self.layout = "chunked-mmap-fp32"
        if self.gallery is not None:
            self.resident_bytes = self.gallery.numel() * self.gallery.element_size()
        elif self.selector is None:
            self.resident_bytes = 0  # chunked: read from the memory map per query
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
            # the compressed layouts and the GPU re-score in float64 themselves; the CPU
            # float32 layouts re-score the rows they found from the stored rows
            if self.selector is not None:
                scores, rows = self._search_selected(queries.float(), wanted)
            elif self.layout == "device-fp16":
                scores, rows = self._search_device(queries, wanted)
            else:
                if self.layout == "resident-fp32":
                    scores, rows = _topk(queries.float().cpu() @ self.gallery.T, wanted)
                else:
                    scores, rows = self._search_chunked(queries.float().cpu(), wanted)
                scores = self._exact_scores(queries, rows.cpu(), scores.cpu())
            return _finish(scores.cpu(), rows.cpu(), excluded, min(k, self.count))

    def _exact_scores(
        self, queries: torch.Tensor, rows: torch.Tensor, scores: torch.Tensor
    ) -> torch.Tensor:
        """The found rows' scores recomputed in float64 from the stored rows and rounded
        to float32: the same number for a (query, row) pair however the gallery is laid
        out, sharded or batched (a matrix product's rounding depends on its shape)."""
        exact = self._stored_scores(queries, rows.clamp(min=0))
        return torch.where(torch.isfinite(scores), exact, scores)

    def _stored_scores(self, queries: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """queries (B, D), rows (B, C) >= 0 -> float32 (B, C): each row's score in float64
        from the stored rows (each distinct row read once), rounded to float32."""
        unique, inverse = torch.unique(rows, return_inverse=True)
        stored = torch.from_numpy(np.asarray(self.source[unique.numpy()], dtype=np.float64))
        return torch.einsum("bd,bcd->bc", queries.cpu().double(), stored[inverse]).float()

    def _search_device(
        self, queries: torch.Tensor, wanted: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        queries = queries.to(self.device, torch.float32)
        candidates = min(self.count, wanted + FP16_MARGIN)
        _, rows = torch.topk(queries.half() @ self.gallery.T, candidates, dim=1, sorted=False)
        # re-scored on the device (no host round trip in the query path), in float64 like
        # every other layout, from the rows the index stores as float16
        exact = torch.einsum("bd,bcd->bc", queries.double(), self.gallery[rows].double())
        return _topk_of(exact.float(), rows, wanted)

    def _search_selected(
        self, queries: torch.Tensor, wanted: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Candidates from the compressed layout, re-scored from the stored rows in
        float64 and rounded to float32 (the scores ``_exact_scores`` gives)."""
        floor = getattr(self.selector, "min_candidates", 0)  # faiss: what its recall needs
        count = min(self.count, max(wanted + self.margin, floor))
        rows = self.selector.candidates(queries, count)
        rows = torch.where(rows < 0, rows.max(dim=1, keepdim=True).values, rows)  # faiss pads -1
        exact = _mask_repeats(self._stored_scores(queries, rows), rows)
        return _topk_of(exact, rows, min(wanted, rows.shape[1]))

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


def _selector(layout, embeddings, device, chunk_rows, index_dir, nprobe):
    from serve import layouts

    if layout == "fp16":
        return layouts.Fp16Rows(embeddings, device, chunk_rows)
    if layout == "int8":
        return layouts.Int8Rows(embeddings, device, chunk_rows)
    if index_dir is None:
        raise ValueError("the faiss layout needs index_dir (where export.index wrote it)")
    return layouts.FaissRows(Path(index_dir), nprobe, device)


def _mask_repeats(scores: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """-inf for a row repeated among a query's candidates (faiss pads short lists)."""
    order = torch.sort(rows, dim=1, stable=True)
    repeated = torch.zeros_like(rows, dtype=torch.bool)
    repeated[:, 1:] = order.values[:, 1:] == order.values[:, :-1]
    mask = torch.zeros_like(repeated).scatter_(1, order.indices, repeated)
    return scores.masked_fill(mask, -torch.inf)


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
    return finish_topk(scores, rows, k)


def finish_topk(
    scores: torch.Tensor, rows: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The best ``k`` of candidate (scores, rows) (B, C), ordered by score, ties by the
    lower row: the one order every search and the shard merge agree on."""
    scores = scores.float()
    by_row = torch.argsort(rows, dim=1)
    scores, rows = torch.gather(scores, 1, by_row), torch.gather(rows, 1, by_row)
    by_score = torch.sort(scores, dim=1, descending=True, stable=True).indices
    scores, rows = torch.gather(scores, 1, by_score), torch.gather(rows, 1, by_score)
    return scores[:, :k].contiguous(), rows[:, :k].contiguous()

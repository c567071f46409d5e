"""Galleries split into shards: contiguous row ranges, each searched on its own (one
searcher per shard), the per-shard top-k merged into the global one.

``export.index --shards N`` (or ``--reshard N`` on a built index) writes
``index/shards.json``: N row ranges over the same memory-mapped files, so a searcher
maps only the pages of its own rows. The merge orders candidates by score, ties by the
lower global row, exactly as one searcher over the whole gallery does, so the merged
top-k equals the single-shard one (``tests/test_serve_sharding.py``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from serve.search import GallerySearch, finish_topk

SHARDS_FILE = "shards.json"


def shard_ranges(count: int, shards: int) -> list[tuple[int, int]]:
    """``shards`` contiguous (start, end) row ranges covering 0..count, sizes within 1."""
    if shards < 1:
        raise ValueError(f"shards must be >= 1, got {shards}")
    if shards > count:
        raise ValueError(f"cannot split {count} rows into {shards} shards")
    bounds = np.linspace(0, count, shards + 1).round().astype(int)
    return [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]


def write_shards(index_dir: str | Path, count: int, shards: int) -> list[tuple[int, int]]:
    """Write ``index_dir/shards.json`` for ``shards`` shards of ``count`` rows."""
    ranges = shard_ranges(count, shards)
    Path(index_dir, SHARDS_FILE).write_text(
        json.dumps({"count": count, "shards": [list(r) for r in ranges]}, indent=1)
    )
    return ranges


def read_shards(index_dir: str | Path, count: int) -> list[tuple[int, int]] | None:
    """The row ranges of ``index_dir/shards.json`` (None when the index is unsharded);
    ``ValueError`` when they do not tile 0..count."""
    path = Path(index_dir, SHARDS_FILE)
    if not path.is_file():
        return None
    try:
        ranges = [tuple(int(v) for v in r) for r in json.loads(path.read_text())["shards"]]
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{path}: not a shard listing ({err})") from None
    expected = 0
    for start, end in ranges:
        if start != expected or end <= start:
            raise ValueError(f"{path}: ranges {ranges} do not tile rows 0..{count}")
        expected = end
    if expected != count:
        raise ValueError(f"{path}: ranges end at row {expected}, the index has {count}")
    return ranges


def index_shards(index_dir: str | Path, count: int) -> list[tuple[int, int]]:
    """``read_shards``, or one shard of all ``count`` rows for an unsharded index."""
    return read_shards(index_dir, count) or [(0, count)]


def shard_dir(index_dir: str | Path, shard: int, shards: int) -> Path:
    """Where shard ``shard`` of ``shards`` keeps its own files (the faiss layout): the
    index directory itself when there is one shard, else ``index_dir/shard-<shard>``.
    ``export.index --faiss`` writes there and every searcher reads there."""
    index_dir = Path(index_dir)
    return index_dir if shards == 1 else index_dir / f"shard-{shard}"


class ShardSearch:
    """One shard's searcher: ``GallerySearch`` over rows [start, end), answering with
    global rows. ``layout`` options as ``GallerySearch`` (a faiss layout is read from
    ``index_dir/shard-<i>``)."""

    def __init__(self, embeddings: np.ndarray, start: int, end: int, device="cpu", **options):
        self.start, self.end = int(start), int(end)
        self.search_rows = GallerySearch(embeddings[self.start : self.end], device, **options)
        self.layout = self.search_rows.layout
        self.resident_bytes = self.search_rows.resident_bytes

    def search(
        self, queries: torch.Tensor, k: int, exclude_rows: Sequence[int | None] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(scores (B, k'), global rows (B, k')) of this shard, k' = min(k, its rows)."""
        local = None
        if exclude_rows is not None:
            local = [
                r - self.start if r is not None and self.start <= r < self.end else None
                for r in exclude_rows
            ]
        scores, rows = self.search_rows.search(queries, k, local)
        return scores, torch.where(rows >= 0, rows + self.start, rows)


def merge_shard_results(
    parts: Sequence[tuple[torch.Tensor, torch.Tensor]], k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The global top-k of per-shard (scores, global rows) (B, k_i): by score, ties by row."""
    scores = torch.cat([p[0] for p in parts], dim=1)
    rows = torch.cat([p[1] for p in parts], dim=1)
    return finish_topk(scores, rows, min(k, rows.shape[1]))


class ShardedSearch:
    """All shards of a gallery in one process (what the searchers of a deployment do
    together): the same ``search`` as ``GallerySearch``."""

    def __init__(
        self, embeddings: np.ndarray, ranges: Sequence[tuple[int, int]], device="cpu", **options
    ):
        index_dir = options.pop("index_dir", None)
        self.shards = [
            ShardSearch(
                embeddings,
                start,
                end,
                device,
                index_dir=None if index_dir is None else shard_dir(index_dir, i, len(ranges)),
                **options,
            )
            for i, (start, end) in enumerate(ranges)
        ]
        self.count = int(ranges[-1][1])
        self.layout = f"{self.shards[0].layout} x {len(self.shards)} shards"
        self.resident_bytes = sum(s.resident_bytes for s in self.shards)

    def search(
        self, queries: torch.Tensor, k: int, exclude_rows: Sequence[int | None] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        parts = [shard.search(queries, k, exclude_rows) for shard in self.shards]
        return merge_shard_results(parts, k)

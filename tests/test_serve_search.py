"""Gallery search (serve.search) and micro-batching (serve.batching) on generated data."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest
import torch

from serve.batching import MicroBatcher, QueueFullError
from serve.search import GallerySearch


def unit_rows(count: int, dim: int, seed: int, dtype=np.float16) -> np.ndarray:
    rows = np.random.default_rng(seed).standard_normal((count, dim)).astype(np.float32)
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(dtype)


def brute_force(gallery: np.ndarray, queries: np.ndarray, k: int, exclude=None):
    scores = queries.astype(np.float32) @ gallery.astype(np.float32).T
    out_rows, out_scores = [], []
    for b, row_scores in enumerate(scores):
        order = sorted(range(len(row_scores)), key=lambda r: (-row_scores[r], r))
        if exclude is not None and exclude[b] is not None:
            order = [r for r in order if r != exclude[b]]
        out_rows.append(order[:k])
        out_scores.append(row_scores[order[:k]])
    return np.array(out_rows), np.array(out_scores)


@pytest.mark.parametrize("layout", ["resident", "chunked"])
@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_search_equals_brute_force(layout, dtype):
    gallery = unit_rows(300, 16, seed=0, dtype=dtype)
    queries = unit_rows(5, 16, seed=1, dtype=np.float32)
    search = GallerySearch(
        gallery, "cpu", chunk_rows=37, max_resident_bytes=0 if layout == "chunked" else 1 << 30
    )
    assert search.layout.startswith(layout)
    exclude = [None, 3, None, 299, 0]
    scores, rows = search.search(torch.from_numpy(queries), 10, exclude)
    want_rows, want_scores = brute_force(gallery, queries, 10, exclude)
    assert rows.shape == (5, 10) and scores.dtype == torch.float32
    np.testing.assert_array_equal(rows.numpy(), want_rows)
    np.testing.assert_allclose(scores.numpy(), want_scores, atol=1e-5)
    for b, row in enumerate(exclude):
        assert row is None or row not in rows[b].tolist()


def test_ties_break_by_lower_row_in_every_layout():
    gallery = unit_rows(40, 8, seed=2)
    gallery[[5, 17, 30]] = gallery[22]  # four identical rows
    query = torch.from_numpy(gallery[22:23].astype(np.float32))
    for budget in (0, 1 << 30):
        _, rows = GallerySearch(gallery, "cpu", chunk_rows=7, max_resident_bytes=budget).search(
            query, 4
        )
        assert rows[0].tolist() == [5, 17, 22, 30]


def test_k_larger_than_gallery_and_bad_arguments():
    gallery = unit_rows(6, 8, seed=3)
    search = GallerySearch(gallery, "cpu")
    scores, rows = search.search(torch.from_numpy(unit_rows(2, 8, 4, np.float32)), 50, [None, 2])
    assert rows.shape == (2, 6)
    assert sorted(rows[0].tolist()) == list(range(6)) and torch.isfinite(scores[0]).all()
    kept = rows[1][torch.isfinite(scores[1])].tolist()  # the excluded row is marked -inf
    assert sorted(kept) == [0, 1, 3, 4, 5]
    with pytest.raises(ValueError, match=r"queries must be \(B, 8\)"):
        search.search(torch.zeros(2, 9), 3)
    with pytest.raises(ValueError, match="k must be >= 1"):
        search.search(torch.zeros(1, 8), 0)


def test_micro_batcher_collects_concurrent_items_into_one_batch():
    seen: list[list[int]] = []

    def run_batch(items):
        seen.append(list(items))
        return [i * 10 for i in items], {"engine_ms": 1.0}

    async def main():
        batcher = MicroBatcher(run_batch, max_batch=8, max_wait_ms=50)
        await batcher.start()
        try:
            answers = await asyncio.gather(*(batcher.submit(i) for i in range(5)))
        finally:
            await batcher.stop()
        return answers

    answers = asyncio.run(main())
    assert [a for a, _ in answers] == [0, 10, 20, 30, 40]
    assert seen == [[0, 1, 2, 3, 4]]
    assert all(info["batch_size"] == 5 and info["engine_ms"] == 1.0 for _, info in answers)


def test_micro_batcher_caps_batches_and_survives_a_failing_batch():
    threads = set()

    def run_batch(items):
        threads.add(threading.current_thread().name)
        if "boom" in items:
            raise RuntimeError("engine failed")
        return list(items), {}

    async def main():
        batcher = MicroBatcher(run_batch, max_batch=3, max_wait_ms=0, max_queue=4)
        await batcher.start()
        try:
            with pytest.raises(RuntimeError, match="engine failed"):
                await batcher.submit("boom")
            results = await asyncio.gather(*(batcher.submit(i) for i in range(4)))
            with pytest.raises(QueueFullError):
                await asyncio.gather(*(batcher.submit(i) for i in range(6)))
        finally:
            await batcher.stop()
        return results, batcher

    results, batcher = asyncio.run(main())
    assert [r for r, _ in results] == [0, 1, 2, 3]
    assert max(info["batch_size"] for _, info in results) <= 3
    assert len(threads) == 1  # every batch on the one engine thread

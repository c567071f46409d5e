"""Compressed (fp16, int8) and approximate (faiss IVF-PQ) gallery layouts against exact
search: candidates re-scored in float32 give the exact answers and scores."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from serve.search import GallerySearch


def unit(rows: np.ndarray) -> np.ndarray:
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


def clustered(count: int, dim: int, clusters: int, seed: int = 0) -> np.ndarray:
    """Unit rows around ``clusters`` centres, as real embeddings are (not uniform noise)."""
    rng = np.random.default_rng(seed)
    centres = unit(rng.standard_normal((clusters, dim)))
    spread = 0.6 / np.sqrt(dim)  # a noise vector of norm ~0.6 around a unit centre
    rows = centres[rng.integers(0, clusters, count)] + spread * rng.standard_normal((count, dim))
    return unit(rows)


def near_queries(gallery: np.ndarray, count: int, seed: int = 1) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    base = gallery[rng.choice(len(gallery), count, replace=False)]
    noise = 0.3 / np.sqrt(base.shape[1]) * rng.standard_normal(base.shape)
    return torch.from_numpy(unit(base + noise))


@pytest.fixture(scope="module")
def gallery():
    return clustered(6000, 64, 40)


@pytest.mark.parametrize("layout", ["fp16", "int8"])
def test_compressed_layouts_return_the_exact_top_k(gallery, layout):
    queries = near_queries(gallery, 64)
    exact = GallerySearch(gallery, "cpu")
    compressed = GallerySearch(gallery, "cpu", layout=layout)
    excluded = [int(i) if i % 3 == 0 else None for i in range(64)]
    want_scores, want_rows = exact.search(queries, 10, excluded)
    got_scores, got_rows = compressed.search(queries, 10, excluded)
    assert torch.equal(got_rows, want_rows)
    torch.testing.assert_close(got_scores, want_scores, rtol=0, atol=1e-6)
    assert compressed.layout == f"{layout}+rescore"
    assert compressed.resident_bytes == gallery.size * (2 if layout == "fp16" else 1) + (
        len(gallery) * 4 if layout == "int8" else 0
    )


def test_int8_without_margin_can_miss_but_never_misreports(gallery):
    """Margin 0: candidates come from int8 scores alone; the scores reported are still
    the float32 ones of the rows returned."""
    queries = near_queries(gallery, 32, seed=7)
    scores, rows = GallerySearch(gallery, "cpu", layout="int8", margin=0).search(queries, 10)
    direct = torch.einsum("bd,bkd->bk", queries, torch.from_numpy(gallery)[rows])
    torch.testing.assert_close(scores, direct, rtol=0, atol=1e-6)


def test_faiss_layout_is_built_with_its_measured_recall_and_rescored(gallery, tmp_path):
    pytest.importorskip("faiss")
    from serve.faiss_build import build_faiss

    info = build_faiss(gallery, tmp_path, m=16, nprobe=8, check_queries=100, train_rows=6000)
    stored = json.loads((tmp_path / "faiss.json").read_text())
    assert stored["recall_at_k"] == info["recall_at_k"] >= 0.9
    assert stored["nlist"] == info["nlist"] > 1
    queries = near_queries(gallery, 20, seed=3)
    approx = GallerySearch(gallery, "cpu", layout="faiss", index_dir=tmp_path)
    scores, rows = approx.search(queries, 10)
    direct = torch.einsum("bd,bkd->bk", queries, torch.from_numpy(gallery)[rows])
    torch.testing.assert_close(scores, direct, rtol=0, atol=1e-6)
    _, exact_rows = GallerySearch(gallery, "cpu").search(queries, 10)
    overlap = np.mean(
        [len(set(a.tolist()) & set(b.tolist())) / 10 for a, b in zip(rows, exact_rows)]
    )
    assert overlap >= 0.9


def test_bad_layout_settings_are_errors(gallery, tmp_path):
    with pytest.raises(ValueError, match="unknown gallery layout 'pq'"):
        GallerySearch(gallery, "cpu", layout="pq")
    with pytest.raises(ValueError, match="needs index_dir"):
        GallerySearch(gallery, "cpu", layout="faiss")
    with pytest.raises(FileNotFoundError, match="gallery.faiss: missing"):
        GallerySearch(gallery, "cpu", layout="faiss", index_dir=tmp_path)
    with pytest.raises(ValueError, match="margin must be >= 0"):
        GallerySearch(gallery, "cpu", layout="int8", margin=-1)


def test_int8_blocks_give_the_answer_of_one_block(gallery, monkeypatch):
    """The int8 product runs over blocks of rows with a running top-k: block sizes that
    do not divide the gallery change nothing."""
    from serve.layouts import Int8Rows

    queries = near_queries(gallery, 16, seed=11)
    want = GallerySearch(gallery, "cpu", layout="int8").search(queries, 10)
    monkeypatch.setattr(Int8Rows, "block_rows", 777)
    got = GallerySearch(gallery, "cpu", layout="int8").search(queries, 10)
    assert torch.equal(got[1], want[1]) and torch.equal(got[0], want[0])

"""Sharded galleries: per-shard searches merged into exactly the single-shard answer, the
shard listing and faiss layout written by ``export.index``, and the engine over both."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from serve_fixtures import limit_threads, serving_artifacts

from export.index import main as index_main
from serve.engine import QueryEngine
from serve.search import GallerySearch
from serve.sharding import ShardedSearch, read_shards, shard_dir, shard_ranges


def unit_rows(count: int, dim: int, seed: int = 0) -> np.ndarray:
    rows = np.random.default_rng(seed).standard_normal((count, dim)).astype(np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def test_shard_ranges_tile_the_rows():
    assert shard_ranges(10, 3) == [(0, 3), (3, 7), (7, 10)]
    assert shard_ranges(5, 5) == [(i, i + 1) for i in range(5)]
    with pytest.raises(ValueError, match="into 6 shards"):
        shard_ranges(5, 6)
    with pytest.raises(ValueError, match="shards must be >= 1"):
        shard_ranges(5, 0)


def test_one_listed_shard_reads_its_faiss_layout_where_export_index_writes_it(tmp_path):
    """A shards.json of one shard keeps the faiss files in the index directory itself
    (``shard_dir``), and the one-process sharded search reads them there."""
    pytest.importorskip("faiss")
    from serve.faiss_build import build_faiss

    assert shard_dir(tmp_path, 0, 1) == tmp_path
    assert shard_dir(tmp_path, 2, 3) == tmp_path / "shard-2"
    gallery = unit_rows(4000, 32)
    build_faiss(gallery, shard_dir(tmp_path, 0, 1), m=8, nprobe=8, check_queries=20)
    sharded = ShardedSearch(gallery, [(0, len(gallery))], "cpu", layout="faiss", index_dir=tmp_path)
    single = GallerySearch(gallery, "cpu", layout="faiss", index_dir=tmp_path)
    queries = torch.from_numpy(gallery[:5])
    assert torch.equal(sharded.search(queries, 5)[1], single.search(queries, 5)[1])


@pytest.mark.parametrize("layout", ["exact", "int8"])
def test_three_shards_merge_to_the_single_shard_answer(layout):
    gallery = unit_rows(3001, 48)
    # duplicated rows across shard borders: ties must break by the lower global row
    gallery[1500] = gallery[10]
    gallery[2999] = gallery[10]
    queries = torch.from_numpy(np.concatenate([gallery[[10, 500, 2000]], unit_rows(13, 48, 1)]))
    excluded = [10, None, 2000] + [None] * 13
    one = GallerySearch(gallery, "cpu", layout=layout)
    three = ShardedSearch(gallery, shard_ranges(len(gallery), 3), "cpu", layout=layout)
    for k in (1, 10, 1200):  # k above a shard's size too
        want_scores, want_rows = one.search(queries, k, excluded)
        got_scores, got_rows = three.search(queries, k, excluded)
        assert torch.equal(got_rows, want_rows), k
        assert torch.equal(got_scores, want_scores), k
    assert three.layout.endswith("x 3 shards")


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    limit_threads()
    return serving_artifacts(tmp_path_factory.getbasetemp())[0]


def test_export_index_shards_and_faiss_and_the_engine_over_them(artifacts, tmp_path, capsys):
    pytest.importorskip("faiss")
    copy = tmp_path / "artifacts"
    shutil.copytree(artifacts, copy)
    reference = QueryEngine(artifacts, backend="torch", device="cpu")
    ids = reference.index.ids
    want = [reference.query("make it red", ref_id=ids[i], k=7) for i in range(6)]
    code = index_main(["--artifacts", str(copy), "--shards", "3", "--faiss", "--faiss-m", "8"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert read_shards(copy / "index", len(ids)) == shard_ranges(len(ids), 3)
    info = json.loads((copy / "index" / "index.json").read_text())
    assert len(info["faiss"]) == 3 and all(0 <= f["recall_at_k"] <= 1 for f in info["faiss"])
    assert "recall@10" in out and "3 shards" in out
    for layout in ("exact", "int8", "faiss"):
        sharded = QueryEngine(copy, backend="torch", device="cpu", layout=layout)
        got = [sharded.query("make it red", ref_id=ids[i], k=7) for i in range(6)]
        if layout != "faiss":  # the 40-image gallery's PQ cells are too coarse to promise it
            assert [[h.id for h in hits] for hits in got] == [[h.id for h in h2] for h2 in want]
        assert sharded.describe()["search_layout"].endswith("x 3 shards")
        sharded.close()
    reference.close()


def test_a_damaged_shard_listing_is_refused(artifacts, tmp_path):
    from export.artifacts import ArtifactError

    copy = tmp_path / "artifacts"
    shutil.copytree(artifacts, copy)
    (copy / "index" / "shards.json").write_text(json.dumps({"shards": [[0, 10], [12, 40]]}))
    with pytest.raises(ArtifactError, match="do not tile"):
        QueryEngine(copy, backend="torch", device="cpu")

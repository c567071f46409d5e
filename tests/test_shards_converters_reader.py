"""Converted datasets go through the real reader and evaluation plan (pipeline.data,
pipeline.protocols): triplets decode, texts tokenise, every query resolves."""

from __future__ import annotations

import pytest
import torch
from raw_datasets import make_cirr, make_css3d, make_fashion200k, make_fashioniq, make_mitstates

from pipeline.data import triplet_loader
from pipeline.gallery_data import gallery_loader
from pipeline.protocols import build_plan, resolve_protocol
from pipeline.shard_groups import build_vocabulary, count_triplets
from shards import cirr, css3d, fashion200k, fashioniq, mitstates
from shards.manifest import load_manifest, load_queries

CASES = {
    "css3d": (css3d, make_css3d, 4),  # 4 usable train pairs
    "fashion200k": (fashion200k, make_fashion200k, 6),  # one triplet per member
    "mitstates": (mitstates, make_mitstates, 6),
    "fashioniq": (fashioniq, make_fashioniq, 11),
    "cirr": (cirr, make_cirr, 4),
}


@pytest.mark.parametrize("name", list(CASES))
def test_reader_streams_converted_dataset(name, tmp_path):
    torch.set_num_threads(1)
    module, make, triplets = CASES[name]
    make(tmp_path / "raw")
    out = tmp_path / "out"
    module.main(["--src", str(tmp_path / "raw"), "--out", str(out), "--read-threads", "1"])
    assert count_triplets(out) == triplets

    vocab = build_vocabulary(out)
    loader = triplet_loader(
        out, vocab, batch_size=2, image_size=32, shuffle_buffer=4, batches_per_epoch=triplets // 2
    )
    batches = list(loader)
    assert len(batches) == triplets // 2
    for batch in batches:
        assert batch["ref_images"].shape == (2, 3, 32, 32)
        assert batch["target_images"].shape == (2, 3, 32, 32)
        assert torch.isfinite(batch["ref_images"]).all()
        assert (batch["tokens"] > 1).any()  # texts are in the training vocabulary

    manifest = load_manifest(out)
    for eval_name, ev in manifest["evals"].items():
        ids, metas = [], []
        for batch_ids, images, batch_metas in gallery_loader(
            out, ev["gallery"], batch_size=4, image_size=32
        ):
            assert images.shape[1:] == (3, 32, 32)
            ids += batch_ids
            metas += batch_metas
        queries = load_queries(out, manifest, eval_name)
        plan = build_plan(resolve_protocol(ev["protocol"]), queries, ids, metas)
        assert len(plan.ref_index) == len(queries) == ev["count"] > 0

"""The TIRG authors' CSS sampler (``train.triplets_per_group: 2``, the CSS default):
every batch of 32 is 16 references x 2 different modifications, seeded, and the ranks
of a DDP run draw disjoint references."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch
from train_fixtures import ROOT

from pipeline.config import load_config
from pipeline.data import triplet_loader
from pipeline.shard_groups import build_vocabulary
from shards import css

torch.set_num_threads(1)

# 5 modifications per scene: odd, so every scene's last run is completed by the sampler
SCENES = css.CssConfig(
    seed=1,
    train_scenes=48,
    test_scenes=4,
    mods_per_scene=5,
    mod_pool=200,
    image_size=16,
    shard_size=60,
)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("css-sampler") / "css"
    css.generate_css(out, SCENES, workers=1)
    return out


@pytest.fixture(scope="module")
def vocab(dataset):
    return build_vocabulary(dataset)


def batches(dataset, vocab, *, seed: int, rank: int = 0, world_size: int = 1, epoch: int = 0):
    train = load_config(ROOT / "configs" / "css_tirg.yaml")["train"]
    loader = triplet_loader(
        dataset,
        vocab,
        batch_size=32,
        image_size=16,
        seed=seed,
        rank=rank,
        world_size=world_size,
        batches_per_epoch=3,
        shuffle_buffer=64,
        triplets_per_group=train["triplets_per_group"],
        image_cache="device",
    )
    return list(loader.epoch_batches(epoch))


def test_css_configs_use_the_authors_sampler():
    config = load_config(ROOT / "configs" / "css_tirg.yaml")
    assert config["train"]["triplets_per_group"] == 2
    assert config["loss"]["name"] == "batch_classification"
    paper = load_config(ROOT / "configs" / "css_tirg.yaml", ["paper=true"])
    assert paper["train"]["triplets_per_group"] == 1
    assert paper["loss"]["name"] == "soft_triplet" and paper["optim"]["backbone_lr_mult"] == 0.1


def test_every_batch_is_16_references_with_2_different_modifications(dataset, vocab):
    for batch in batches(dataset, vocab, seed=0):
        refs = Counter(batch["ref_ids"])
        assert len(refs) == 16 and set(refs.values()) == {2}, refs
        for ref in refs:
            rows = [i for i, r in enumerate(batch["ref_ids"]) if r == ref]
            assert rows[1] == rows[0] + 1  # a run: the pair sits together
            texts = {batch["texts"][i] for i in rows}
            targets = {batch["target_ids"][i] for i in rows}
            assert len(texts) == 2 and len(targets) == 2  # two different modifications


def test_the_sampler_is_seeded(dataset, vocab):
    def draws(seed, epoch=0):
        return [
            tuple(b["ref_ids"] + b["texts"])
            for b in batches(dataset, vocab, seed=seed, epoch=epoch)
        ]

    assert draws(4) == draws(4)
    assert draws(4) != draws(5)
    assert draws(4, epoch=0) != draws(4, epoch=1)


def test_ddp_ranks_draw_disjoint_references(dataset, vocab):
    per_rank = [
        {
            ref
            for b in batches(dataset, vocab, seed=2, rank=rank, world_size=2)
            for ref in b["ref_ids"]
        }
        for rank in (0, 1)
    ]
    assert per_rank[0] and per_rank[1] and not per_rank[0] & per_rank[1]
    for rank in (0, 1):
        for batch in batches(dataset, vocab, seed=2, rank=rank, world_size=2):
            assert set(Counter(batch["ref_ids"]).values()) == {2}

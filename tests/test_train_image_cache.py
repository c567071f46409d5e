"""``train.image_cache``: the cached path draws what streaming draws, resumes to the
same weights, and ``auto`` streams (and says so) when the data is over the budget."""

from __future__ import annotations

import logging
from collections import Counter

import pytest
import torch
from shard_fixtures import write_dataset
from train_fixtures import tiny_config

from pipeline.checkpoint import load_checkpoint
from pipeline.data import triplet_loader
from pipeline.distributed import LocalContext
from pipeline.image_cache import cache_bytes, wants_cache
from pipeline.loop import train_loop
from pipeline.shard_groups import build_vocabulary

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    # 7 explicit + 2 derived groups over 5 uneven shards, one undecodable image
    return write_dataset(
        tmp_path_factory.mktemp("cache") / "ds", explicit_groups=7, corrupt_image=True
    )


@pytest.fixture(scope="module")
def vocab(dataset):
    return build_vocabulary(dataset)


def epoch_draws(dataset, vocab, cache: str, **kwargs) -> tuple[list, list]:
    settings = dict(batch_size=4, image_size=32, seed=7, batches_per_epoch=6, shuffle_buffer=10)
    loader = triplet_loader(dataset, vocab, image_cache=cache, **{**settings, **kwargs})
    triplets, images = [], []
    for epoch in (0, 1):
        for batch in loader.epoch_batches(epoch):
            triplets += [
                (epoch, r, t, x)
                for r, t, x in zip(batch["ref_ids"], batch["target_ids"], batch["texts"])
            ]
            images.append(torch.cat([batch["ref_images"], batch["target_images"]]))
    return triplets, images


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("per_group", [1, 2])
def test_cache_and_stream_draw_the_same_triplets(dataset, vocab, workers, per_group):
    """Same seed and epochs: the same (epoch, ref, target, text) multiset -- in fact the
    same sequence -- and the same preprocessed pixels (32 px images at 32 px)."""
    kwargs = dict(loader_workers=workers, triplets_per_group=per_group, rank=1, world_size=2)
    streamed, streamed_images = epoch_draws(dataset, vocab, "none", **kwargs)
    cached, cached_images = epoch_draws(dataset, vocab, "device", **kwargs)
    assert Counter(cached) == Counter(streamed) and len(streamed) == 2 * 6 * 4
    assert cached == streamed
    for a, b in zip(cached_images, streamed_images):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    # the undecodable image's triplets are dropped on both paths
    assert not any("bad" in ref or "bad" in tgt for _, ref, tgt, _ in cached)


def test_cached_augmentation_is_seeded_and_resumes_identically(dataset, vocab):
    settings = dict(batch_size=4, image_size=32, seed=3, batches_per_epoch=5, augment=True)
    full = list(triplet_loader(dataset, vocab, image_cache="device", **settings).epoch_batches(2))
    again = list(triplet_loader(dataset, vocab, image_cache="device", **settings).epoch_batches(2))
    resumed = list(
        triplet_loader(dataset, vocab, image_cache="device", **settings).epoch_batches(2, skip=3)
    )
    for a, b in zip(full, again):
        assert torch.equal(a["ref_images"], b["ref_images"])
    for a, b in zip(full[3:], resumed):
        assert a["ref_ids"] == b["ref_ids"] and torch.equal(a["ref_images"], b["ref_images"])
    plain = triplet_loader(dataset, vocab, image_cache="device", **{**settings, "augment": False})
    first = next(iter(plain.epoch_batches(2)))
    assert first["ref_ids"] == full[0]["ref_ids"]
    assert not torch.equal(first["ref_images"], full[0]["ref_images"])  # crops changed pixels


def test_auto_streams_over_the_budget_and_says_so(dataset, vocab, caplog):
    need = cache_bytes(100, 32)
    assert need == 100 * 3 * 32 * 32
    cpu = torch.device("cpu")
    with caplog.at_level(logging.INFO, logger="pipeline.image_cache"):
        assert not wants_cache("auto", 100, 32, cpu, budget_gb=need / 2 / 1e9)
        assert wants_cache("auto", 100, 32, cpu, budget_gb=need * 2 / 1e9)
        assert wants_cache("device", 100, 32, cpu, budget_gb=need / 2 / 1e9)  # forced
        assert not wants_cache("none", 100, 32, cpu)
    text = caplog.text
    assert "image_cache=auto" in text and "streaming from the shards" in text
    assert "caching anyway" in text
    with pytest.raises(ValueError, match="image_cache must be one of"):
        wants_cache("gpu", 1, 32, cpu)
    # and the loader follows it: over the budget it streams
    loader = triplet_loader(
        dataset, vocab, batch_size=4, image_size=32, image_cache="auto", image_cache_gb=1e-9
    )
    assert loader.stream.image_mode == "decode" and loader.stream.cache is None


def weights(directory) -> dict[str, torch.Tensor]:
    return load_checkpoint(directory)["model"]


def test_a_resumed_cached_run_ends_with_the_weights_of_an_uninterrupted_one(dataset, tmp_path):
    """4 steps, stop (mid-epoch: 5 batches per epoch), resume to 7 == 7 straight steps
    (same batches, and the text encoder's dropout draws from the restored generator)."""
    common = ("eval.at_end=false", "train.image_cache=device", "train.checkpoint_every=0")
    straight = tiny_config(dataset, tmp_path / "straight", "train.steps=7", *common)
    context = LocalContext(straight["train"]["storage_path"], straight["train"]["run_name"])
    train_loop(straight, context=context)
    expected = weights(context.checkpoints()[-1])

    first = tiny_config(dataset, tmp_path / "resumed", "train.steps=4", *common)
    train_loop(first)
    again = tiny_config(dataset, tmp_path / "resumed", "train.steps=7", *common)
    resumed = LocalContext(again["train"]["storage_path"], again["train"]["run_name"])
    train_loop(again, context=resumed)
    assert [r["step"] for r in resumed.reports] == [7]
    got = weights(resumed.checkpoints()[-1])
    assert got.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=1e-6, msg=name)

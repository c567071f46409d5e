"""``eval.image_cache``: the gallery decoded once holds what the streaming gallery reader
yields, evaluation on it reads no shard and gives the same recalls, and a training run
builds it once for all its evaluations."""

from __future__ import annotations

import io
import logging
import tarfile

import pytest
import torch
from shard_fixtures import write_dataset
from train_fixtures import tiny_config

import pipeline.evaluate as evaluate
import pipeline.gallery_cache as gallery_cache
from pipeline.checkpoint import load_model
from pipeline.config import ConfigError
from pipeline.distributed import LocalContext
from pipeline.gallery_cache import GalleryCache, maybe_gallery_cache
from pipeline.gallery_data import gallery_loader
from pipeline.images import IMAGENET_STD
from pipeline.loop import train_loop
from pipeline.models import create_model
from pipeline.shard_groups import build_vocabulary

torch.set_num_threads(1)
SIZE = 32


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("gallery") / "ds", gallery_size=11)


def test_the_cache_holds_what_the_gallery_reader_yields(dataset):
    cache = GalleryCache.build(dataset, "gallery", SIZE, "cpu")
    assert cache.images.shape == (11, 3, SIZE, SIZE) and cache.images.dtype == torch.uint8
    streamed = list(gallery_loader(dataset, "gallery", batch_size=4, image_size=SIZE))
    cached = list(cache.batches(4))
    assert [ids for ids, _, _ in cached] == [ids for ids, _, _ in streamed]
    assert [metas for _, _, metas in cached] == [metas for _, _, metas in streamed]
    for (_, cached_images, _), (_, streamed_images, _) in zip(cached, streamed):
        # the fixture's images are wider than SIZE: resized, then rounded to uint8 once
        torch.testing.assert_close(
            cached_images, streamed_images, rtol=0, atol=0.5 / 255 / min(IMAGENET_STD) + 1e-6
        )


def test_evaluation_on_the_cache_reads_no_shard_and_gives_the_same_recalls(dataset, monkeypatch):
    vocab = build_vocabulary(dataset)
    torch.manual_seed(0)
    model = create_model("tirg", vocab_size=len(vocab), embed_dim=16).eval()
    settings = {"image_size": SIZE, "batch_size": 4, "rerank_top": 0}
    streamed = evaluate.evaluate_model(model, vocab, dataset, **settings)
    cache = GalleryCache.build(dataset, "gallery", SIZE, "cpu")

    def no_shards(*args, **kwargs):
        raise AssertionError("the gallery shards were read")

    monkeypatch.setattr(evaluate, "gallery_loader", no_shards)
    cached = evaluate.evaluate_model(model, vocab, dataset, gallery_cache=cache, **settings)
    assert cached == streamed
    with pytest.raises(ValueError, match="at 32 px, not 'gallery' .* at 64 px"):
        evaluate.evaluate_model(
            model, vocab, dataset, **{**settings, "image_size": 64}, gallery_cache=cache
        )


def test_the_mode_decides_and_says_so(dataset, monkeypatch, caplog):
    assert maybe_gallery_cache("none", dataset, "gallery", SIZE, "cpu") is None
    with caplog.at_level(logging.INFO, logger="pipeline.image_cache"):
        assert maybe_gallery_cache("auto", dataset, "gallery", SIZE, "cpu") is not None
        monkeypatch.setattr(gallery_cache, "wants_cache", _over_budget)
        assert maybe_gallery_cache("auto", dataset, "gallery", SIZE, "cpu") is None
    text = caplog.text
    assert "eval.image_cache: 11 images x 3x32x32 uint8" in text
    assert "eval.image_cache=auto" in text and "decoding the gallery shards" in text
    with pytest.raises(ValueError, match="eval.image_cache must be one of"):
        maybe_gallery_cache("gpu", dataset, "gallery", SIZE, "cpu")
    with pytest.raises(ValueError, match="not a 'gallery' split"):
        maybe_gallery_cache("auto", dataset, "train", SIZE, "cpu")


def _over_budget(*args, **kwargs):
    """``wants_cache`` with a budget of one byte."""
    from pipeline.image_cache import wants_cache

    return wants_cache(*args, budget_gb=1e-9, **kwargs)


def test_a_corrupt_gallery_image_is_named(tmp_path):
    data = write_dataset(tmp_path / "bad", gallery_size=5)
    shard = next(
        p for p in data.glob("gallery-*.tar") if "s000002.json" in tarfile.open(p).getnames()
    )
    members = []
    with tarfile.open(shard) as tar:
        for member in tar.getmembers():
            content = tar.extractfile(member).read()
            if member.name == "s000002.img.png":
                content, member.size = b"not a png", 9
            members.append((member, content))
    with tarfile.open(shard, "w") as tar:
        for member, content in members:
            tar.addfile(member, io.BytesIO(content))
    with pytest.raises(ValueError, match="gallery image 'gal_0002'"):
        GalleryCache.build(data, "gallery", SIZE, "cpu")


def test_a_run_builds_the_cache_once_for_all_its_evaluations(dataset, tmp_path, monkeypatch):
    builds = []
    build = GalleryCache.build.__func__

    def counted(cls, *args, **kwargs):
        builds.append(args[:3])
        return build(cls, *args, **kwargs)

    monkeypatch.setattr(GalleryCache, "build", classmethod(counted))
    config = tiny_config(
        dataset, tmp_path / "run", "train.steps=4", "train.eval_every=2", "train.checkpoint_every=0"
    )
    context = LocalContext(config["train"]["storage_path"], config["train"]["run_name"])
    evaluations = []
    monkeypatch.setattr(
        evaluate, "gallery_loader", lambda *a, **k: pytest.fail("the gallery shards were read")
    )
    real_evaluate = evaluate.evaluate_model

    def recorded(*args, **kwargs):
        evaluations.append(kwargs["gallery_cache"])
        return real_evaluate(*args, **kwargs)

    monkeypatch.setattr(evaluate, "evaluate_model", recorded)
    final = train_loop(config, context=context)
    assert builds == [(str(dataset), "gallery", SIZE)]
    assert len(evaluations) == 2 and evaluations[0] is evaluations[1] is not None
    # the run's last recalls are its final weights' on that cache
    model, vocab, _ = load_model(context.checkpoints()[-1])
    again = real_evaluate(
        model, vocab, dataset, image_size=SIZE, batch_size=16, gallery_cache=evaluations[0]
    )
    assert {k: v for k, v in again.items() if k.startswith("R@")} == {
        k: v for k, v in final.items() if k.startswith("R@")
    }


def test_the_config_rejects_an_unknown_mode(dataset, tmp_path):
    with pytest.raises(ConfigError, match="eval.image_cache must be none, device or auto"):
        tiny_config(dataset, tmp_path / "run", "eval.image_cache=gpu")

"""The CSS-style generator: determinism, counts, held-out split, mod semantics, rendering."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from shards import css, css_scenes
from shards.manifest import load_manifest, load_queries, shard_paths
from shards.render import COLORS, RGB, SHAPES, SIZES, render_scene

TINY = css.CssConfig(
    seed=3,
    train_scenes=12,
    test_scenes=8,
    mods_per_scene=6,
    mod_pool=60,
    image_size=32,
    shard_size=30,
)
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("css") / "tiny"
    css.generate_css(out, TINY, workers=1)
    return out


def read_groups(out: Path) -> list[dict]:
    manifest = load_manifest(out)
    return [s for s in wds.WebDataset(shard_paths(out, manifest, "train"), shardshuffle=False)]


def read_gallery(out: Path) -> list[dict]:
    manifest = load_manifest(out)
    paths = shard_paths(out, manifest, "gallery")
    return [s for s in wds.WebDataset(paths, shardshuffle=False)]


def object_set(objects: list[dict]) -> frozenset:
    return frozenset((o["shape"], o["color"], o["size"], tuple(o["pos"])) for o in objects)


def expected_target(ref: frozenset, mod: dict) -> frozenset:
    """The mod semantics of docs/shards-css.md, written independently of shards.css."""
    if mod["type"] == "add":
        o = mod["object"]
        assert all(obj[3] != tuple(o["pos"]) for obj in ref), "add into an occupied cell"
        return ref | {(o["shape"], o["color"], o["size"], tuple(o["pos"]))}
    fields = {"shape": 0, "color": 1, "size": 2, "pos": 3}
    match = {k: tuple(v) if k == "pos" else v for k, v in mod["match"].items()}
    hits = [obj for obj in ref if all(obj[fields[k]] == v for k, v in match.items())]
    assert len(hits) == 1, f"description {match} matches {len(hits)} objects"
    if mod["type"] == "remove":
        return ref - {hits[0]}
    changed = list(hits[0])
    for key, value in mod["set"].items():
        assert changed[fields[key]] != value, "change to the value it already has"
        changed[fields[key]] = value
    return (ref - {hits[0]}) | {tuple(changed)}


def test_same_seed_gives_same_bytes_for_any_worker_count(tiny, tmp_path):
    again = tmp_path / "again"
    cmd = [
        sys.executable,
        "-m",
        "shards.css",
        "--out",
        str(again),
        "--seed",
        "3",
        "--train-scenes",
        "12",
        "--test-scenes",
        "8",
        "--mods-per-scene",
        "6",
        "--mod-pool",
        "60",
        "--image-size",
        "32",
        "--shard-size",
        "30",
        "--render-processes",
        "2",
    ]
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    subprocess.run(cmd, check=True, cwd=REPO, env=env, capture_output=True, timeout=120)
    names = sorted(p.name for p in tiny.iterdir())
    assert names == sorted(p.name for p in again.iterdir())
    for name in names:
        if name != "manifest.json":
            assert (tiny / name).read_bytes() == (again / name).read_bytes(), name
    first, second = load_manifest(tiny), load_manifest(again)
    first.pop("created_at"), second.pop("created_at")
    assert first == second


def test_another_seed_gives_other_scenes(tiny, tmp_path):
    other = css_scenes.plan_split("train", dataclasses.replace(TINY, seed=4))
    assert [p.scene for p in other] != [p.scene for p in css_scenes.plan_split("train", TINY)]


def test_counts_match_the_configuration_and_the_manifest(tiny):
    manifest = load_manifest(tiny)
    groups, gallery = read_groups(tiny), read_gallery(tiny)
    queries = load_queries(tiny, manifest, "test")
    assert len(groups) == TINY.train_scenes == manifest["splits"]["train"]["samples"]
    images = sum(len(json.loads(g["json"])["members"]) for g in groups)
    assert images == manifest["splits"]["train"]["images"]
    assert all(
        f"{i}.png" in g for g in groups for i in range(len(json.loads(g["json"])["members"]))
    )
    assert len(gallery) == manifest["splits"]["gallery"]["images"]
    assert len(queries) == manifest["evals"]["test"]["count"]
    assert len(gallery) == TINY.test_scenes + len(queries)
    # every source gets mods_per_scene queries here (the tiny pool has enough candidates)
    assert len(queries) == TINY.test_scenes * TINY.mods_per_scene
    assert manifest["evals"]["test"]["protocol"] == {
        "name": "css",
        "ks": [1, 5, 10, 50],
        "hit": "label",
        "exclude_reference": True,
    }
    ids = {json.loads(s["json"])["id"] for s in gallery}
    assert len(ids) == len(gallery)
    assert all(q["ref_id"] in ids and set(q["target_ids"]) <= ids for q in queries)
    assert all(s["__key__"].startswith("g") and "img.png" in s for s in gallery)
    size = Image.open(io.BytesIO(gallery[0]["img.png"])).size
    assert size == (TINY.image_size, TINY.image_size)


def test_held_out_combinations_never_appear_in_train(tiny):
    held_out_words = [f"{c} {s}" for s, c in css_scenes.HELD_OUT_SHAPE_COLOR] + [
        f"{z} {c}" for c, z in css_scenes.HELD_OUT_COLOR_SIZE
    ]
    for group in read_groups(tiny):
        meta = json.loads(group["json"])
        for member in meta["members"]:
            assert not any(css_scenes.is_held_out(o) for o in member["objects"]), member
        for pair in meta["pairs"]:
            for text in pair["texts"]:
                assert not any(w in text for w in held_out_words), text
    for sample in read_gallery(tiny):
        meta = json.loads(sample["json"])
        assert meta["objects"]
    queries = load_queries(tiny, load_manifest(tiny), "test")
    objects = {
        json.loads(s["json"])["id"]: json.loads(s["json"])["objects"] for s in read_gallery(tiny)
    }
    for ref_id in {q["ref_id"] for q in queries}:
        assert any(css_scenes.is_held_out(o) for o in objects[ref_id]), ref_id
    recorded = load_manifest(tiny)["extra"]["held_out"]
    assert recorded["shape_color"] == [list(p) for p in css_scenes.HELD_OUT_SHAPE_COLOR]


def test_every_pair_and_query_applies_its_mod(tiny):
    for group in read_groups(tiny):
        meta = json.loads(group["json"])
        sets = [object_set(m["objects"]) for m in meta["members"]]
        assert len(set(sets)) == len(sets), "a source's targets must all differ"
        for pair in meta["pairs"]:
            assert pair["ref"] == 0 and len(pair["texts"]) >= 2
            assert sets[pair["tgt"]] != sets[0]
            assert expected_target(sets[0], pair["mod"]) == sets[pair["tgt"]]
    objects = {
        json.loads(s["json"])["id"]: object_set(json.loads(s["json"])["objects"])
        for s in read_gallery(tiny)
    }
    queries = load_queries(tiny, load_manifest(tiny), "test")
    kinds = Counter(q["mod"]["type"] for q in queries)
    assert set(kinds) == {"add", "remove", "change"}, kinds
    for q in queries:
        (target,) = q["target_ids"]
        assert target != q["ref_id"]
        assert expected_target(objects[q["ref_id"]], q["mod"]) == objects[target]


def test_texts_name_what_the_mod_does():
    add = ("add", (("color", "red"), ("pos", (0, 0)), ("shape", "circle"), ("size", "large")), ())
    assert all("large red circle" in t and "top-left" in t for t in css_scenes.mod_texts(add))
    change = ("change", (("color", "blue"),), (("size", "small"),))
    texts = css_scenes.mod_texts(change)
    assert "make the blue object small" in texts and "shrink blue object" in texts
    remove = ("remove", (("pos", (1, 1)), ("shape", "triangle")), ())
    assert "remove the triangle at middle-center" in css_scenes.mod_texts(remove)


def test_mods_are_shared_by_many_sources_and_queries_are_not_text_identifiable():
    config = dataclasses.replace(css.CssConfig(), **css.SMALL)
    plans = css_scenes.plan_split("train", config)
    uses = Counter(m for p in plans for m in p.mods)
    assert sum(uses.values()) / len(uses) > 2.5
    assert max(uses.values()) >= 5
    # the same text leads to different targets from different sources
    targets_per_mod: dict = {}
    for p in plans:
        for mod, target in zip(p.mods, p.targets):
            targets_per_mod.setdefault(mod, set()).add(target)
    assert sum(len(t) > 1 for t in targets_per_mod.values()) > len(targets_per_mod) / 2


def test_labels_are_object_sets(tiny):
    by_label: dict[str, set] = {}
    for sample in read_gallery(tiny):
        meta = json.loads(sample["json"])
        by_label.setdefault(meta["label"], set()).add(object_set(meta["objects"]))
    assert all(len(sets) == 1 for sets in by_label.values())
    sets = [next(iter(s)) for s in by_label.values()]
    assert len(set(sets)) == len(sets), "equal object sets must share one label"
    scene = ((("circle", "red", "large", 0, 0)), ("rectangle", "blue", "small", 2, 1))
    assert (
        css_scenes.scene_label(tuple(sorted(scene)))
        == "large-red-circle@00 small-blue-rectangle@21"
    )
    queries = load_queries(tiny, load_manifest(tiny), "test")
    labels = {
        json.loads(s["json"])["id"]: json.loads(s["json"])["label"] for s in read_gallery(tiny)
    }
    assert all(labels[q["ref_id"]] != labels[q["target_ids"][0]] for q in queries)


@pytest.mark.parametrize("size", [32, 64, 128, 224])
def test_render_scene_draws_every_object_anti_aliased(size):
    objects = [
        {"shape": s, "color": c, "size": "large", "pos": (i // 3, i % 3)}
        for i, (s, c) in enumerate(zip(SHAPES * 3, COLORS))
    ]
    image = render_scene(objects, size)
    assert image.size == (size, size) and image.mode == "RGB"
    pixels = np.asarray(image)
    cell = size / 3
    for obj in objects:
        row, col = obj["pos"]
        centre = pixels[int((row + 0.5) * cell) + size // 20, int((col + 0.5) * cell)]
        assert np.abs(centre.astype(int) - RGB[obj["color"]]).max() < 40, obj
    assert (np.asarray(render_scene([], size)) == 250).all()
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 2 * len(objects)  # edge blends


def test_render_scene_jitter_and_continuous_positions():
    objects = [{"shape": "circle", "color": "red", "size": "small", "pos": (1, 1)}]
    still = np.asarray(render_scene(objects, 64))
    assert np.array_equal(still, np.asarray(render_scene(objects, 64)))
    moved = np.asarray(render_scene(objects, 64, random.Random(1)))
    assert not np.array_equal(still, moved)
    assert np.array_equal(moved, np.asarray(render_scene(objects, 64, random.Random(1))))
    assert np.asarray(render_scene(objects, 64, np.random.default_rng(0))).shape == (64, 64, 3)
    between = [{"shape": "rectangle", "color": "blue", "size": "small", "pos": (0.5, 1.5)}]
    pixels = np.asarray(render_scene(between, 60))
    # the centre of the continuous position is y=20, x=40
    assert np.abs(pixels[20, 40].astype(int) - RGB["blue"]).max() <= 3
    with pytest.raises(ValueError, match="color must be one of"):
        render_scene([{"shape": "circle", "color": "pink", "size": "small", "pos": (0, 0)}], 32)
    with pytest.raises(ValueError, match="pos must be"):
        render_scene([{"shape": "circle", "color": "red", "size": SIZES[0], "pos": (3, 0)}], 32)


def test_interrupted_generation_leaves_nothing(tmp_path, monkeypatch):
    calls = Counter()
    real = css.render_task

    def failing(task):
        calls["n"] += 1
        if calls["n"] == 30:
            raise RuntimeError("disk full")
        return real(task)

    monkeypatch.setattr(css, "render_task", failing)
    out = tmp_path / "broken"
    with pytest.raises(RuntimeError, match="disk full"):
        css.generate_css(out, TINY, workers=1)
    assert list(tmp_path.iterdir()) == []


def test_existing_output_is_kept_unless_overwrite(tiny, tmp_path):
    with pytest.raises(FileExistsError, match="--overwrite"):
        css.generate_css(tiny, TINY, workers=1)
    assert (tiny / "manifest.json").is_file()
    rc = css.main(["--out", str(tiny), "--train-scenes", "2"])
    assert rc == 2 and load_manifest(tiny)["splits"]["train"]["samples"] == TINY.train_scenes


def test_presets_and_their_flags(tmp_path, capsys):
    """``--preset medium`` writes the medium sizes (flags override them), ``--small`` is
    ``--preset small``, and contradicting the two is a usage error."""
    out = tmp_path / "medium"
    argv = ["--out", str(out), "--preset", "medium", "--train-scenes", "2", "--test-scenes", "2"]
    assert css.main([*argv, "--image-size", "16", "--render-processes", "1"]) == 0
    manifest = load_manifest(out)
    generator = manifest["extra"]["generator"]
    assert generator["preset"] == "medium"
    assert generator["mods_per_scene"] == css.MEDIUM["mods_per_scene"]
    assert generator["train_scenes"] == 2  # the flag wins
    assert manifest["evals"]["test"]["count"] == 2 * css.MEDIUM["mods_per_scene"]
    with pytest.raises(SystemExit) as exit_info:
        css.main(["--out", str(tmp_path / "x"), "--small", "--preset", "medium"])
    assert exit_info.value.code == 2 and "contradicts" in capsys.readouterr().err


def test_jpeg_output_is_the_same_dataset_in_jpeg(tiny, tmp_path, capsys):
    """``image_format="jpg"``: the same groups, texts and queries as the PNG dataset,
    every image a baseline JPEG of the same scene (what nvJPEG reads on a GPU), a dataset
    that ``shards.verify`` passes and the training reader decodes alike streamed and
    cached."""
    from pipeline.data import triplet_loader
    from pipeline.shard_groups import build_vocabulary
    from shards.verify import verify_dataset

    out = tmp_path / "jpg"
    css.generate_css(out, dataclasses.replace(TINY, image_format="jpg"), workers=1)
    assert verify_dataset(out) == []
    assert load_manifest(out)["extra"]["generator"]["image_format"] == "jpg"
    queries = load_queries(out, load_manifest(out), "test")
    assert queries == load_queries(tiny, load_manifest(tiny), "test")
    for jpg_sample, png_sample in zip(read_groups(out), read_groups(tiny), strict=True):
        assert json.loads(jpg_sample["json"]) == json.loads(png_sample["json"])
        members = len(json.loads(jpg_sample["json"])["members"])
        for i in range(members):
            data = jpg_sample[f"{i}.jpg"]
            assert data[:3] == b"\xff\xd8\xff" and f"{i}.png" not in jpg_sample
            jpg = np.asarray(Image.open(io.BytesIO(data)), dtype=np.float32)
            png = np.asarray(Image.open(io.BytesIO(png_sample[f"{i}.png"])).convert("RGB"))
            # q90 with 4:2:0 chroma at 32 px: about 6 grey levels off on average; a
            # swapped channel order or another scene is over 20 off
            assert jpg.shape == png.shape and np.abs(jpg - png).mean() < 10.0
    gallery = read_gallery(out)
    assert len(gallery) == len(read_gallery(tiny)) and all("img.jpg" in s for s in gallery)

    vocab = build_vocabulary(out)
    draws = {}
    for cache in ("none", "device"):
        loader = triplet_loader(
            out, vocab, batch_size=4, image_size=32, seed=1, batches_per_epoch=3,
            image_cache=cache,
        )  # fmt: skip
        draws[cache] = list(loader.epoch_batches(0))
    for streamed, cached in zip(draws["none"], draws["device"], strict=True):
        assert streamed["ref_ids"] == cached["ref_ids"]
        torch.testing.assert_close(streamed["ref_images"], cached["ref_images"])

    with pytest.raises(SystemExit) as exit_info:
        css.main(["--out", str(tmp_path / "bad"), "--small", "--image-format", "gif"])
    assert exit_info.value.code == 2 and "invalid choice" in capsys.readouterr().err
    argv = ["--out", str(tmp_path / "bad"), "--small", "--image-format", "jpg"]
    assert css.main([*argv, "--jpeg-quality", "0"]) == 2
    assert "jpeg_quality must be in [1, 100], got 0" in capsys.readouterr().err
    with pytest.raises(ValueError, match="image_format"):
        css.generate_css(tmp_path / "bad", dataclasses.replace(TINY, image_format="webp"))
    assert not (tmp_path / "bad").exists()

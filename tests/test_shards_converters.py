"""Converters of the TIRG datasets (CSS, Fashion200k, MIT-States) on tiny raw copies."""

from __future__ import annotations

import io

from PIL import Image
from raw_datasets import F200K_TEST, F200K_TRAIN, make_css3d, make_fashion200k, make_mitstates
from shard_reading import (
    check_dataset,
    member_images,
    read_split,
    sha256,
    skipped_reasons,
)

from pipeline.triplets import derive_pairs
from shards import css3d, fashion200k, mitstates
from shards.manifest import load_queries


def convert(module, src, out, *extra):
    return module.main(["--src", str(src), "--out", str(out), "--read-threads", "2", *extra])


# -- CSS -----------------------------------------------------------------------------------


def test_css3d_release_to_shards(tmp_path):
    broken = make_css3d(tmp_path / "raw")
    manifest = convert(css3d, tmp_path / "raw", tmp_path / "out")
    assert manifest == check_dataset(tmp_path / "out")

    assert manifest["evals"]["test"]["protocol"] == css3d.PROTOCOL
    assert css3d.PROTOCOL["ks"] == [1, 5, 10, 50] and css3d.PROTOCOL["hit"] == "label"
    skipped = skipped_reasons(manifest)
    assert skipped[broken["missing"][0]] == "missing image file"
    assert skipped[broken["truncated"][0]].startswith("truncated image")
    assert skipped["train mod 2 pair 0"] == "pair with unusable image: css_train_000005"
    assert skipped["test mod 1 pair 0"] == "pair with unusable image: css_test_000004"
    assert manifest["skipped_count"] == 4
    assert manifest["source"]["checksums"] == {
        css3d.DATA_FILE: sha256(tmp_path / "raw" / css3d.DATA_FILE)
    }

    gallery = {s["json"]["id"]: s["json"] for s in read_split(tmp_path / "out", "gallery")}
    assert sorted(gallery) == [f"css_test_{i:06d}" for i in (0, 1, 2, 3, 5)]
    # identical object sets share a label (scenes 0 and 3), others differ
    assert gallery["css_test_000000"]["label"] == gallery["css_test_000003"]["label"]
    assert len({m["label"] for m in gallery.values()}) == 4
    assert gallery["css_test_000002"]["attributes"][1]["shape"] == "triangle"

    queries = load_queries(tmp_path / "out", manifest, "test")
    assert [(q["ref_id"][-1], q["target_ids"][0][-1], q["text"]) for q in queries] == [
        ("0", "2", "add green triangle to bottom-right"),
        ("1", "5", "add green triangle to bottom-right"),
        ("5", "1", "remove green triangle"),
        ("1", "3", "remove green triangle"),
    ]

    # train: pairs (0,2) (1,3) (2,4) (3,4) form one component -> one group, images as on disk
    [group] = read_split(tmp_path / "out", "train")
    ids = [m["id"] for m in group["json"]["members"]]
    assert sorted(ids) == [f"css_train_{i:06d}" for i in range(5)]
    pairs = {(ids[r], ids[t], tuple(x)) for r, t, x in derive_pairs(group["json"])}
    assert ("css_train_000002", "css_train_000004", ("remove the other objects",)) in pairs
    assert len(pairs) == 4
    for member_id, data in zip(ids, member_images(group)):
        assert data == (tmp_path / "raw" / "images" / f"{member_id}.png").read_bytes()
    assert manifest["extra"]["groups"] == {"stored": 5, "unique": 5, "ratio": 1.0}


def test_css3d_render_2d_with_dataset_labels(tmp_path):
    make_css3d(tmp_path / "raw", with_labels=True)
    for png in (tmp_path / "raw" / "images").iterdir():
        png.unlink()  # --render-2d needs no image files
    (tmp_path / "raw" / "images").rmdir()
    manifest = convert(
        css3d, tmp_path / "raw", tmp_path / "out", "--render-2d", "--image-size", "32"
    )
    check_dataset(tmp_path / "out")
    assert manifest["skipped"] == [] and manifest["extra"]["render_2d"] is True
    gallery = read_split(tmp_path / "out", "gallery")
    assert [s["json"]["label"] for s in gallery] == ["0", "1", "2", "0", "4", "5"]
    image = Image.open(io.BytesIO(gallery[1]["images"]["img.png"])).convert("RGB")
    assert image.size == (32, 32)
    # scene 1 is a large blue square in the centre cell: blue centre, light corner
    r, g, b = image.getpixel((16, 16))
    assert b > 150 and r < 100
    assert min(image.getpixel((1, 1))) > 200
    assert len(load_queries(tmp_path / "out", manifest, "test")) == 5


def test_css3d_small_groups_keep_every_pair(tmp_path):
    make_css3d(tmp_path / "raw")
    manifest = convert(
        css3d, tmp_path / "raw", tmp_path / "out", "--group-size", "2", "--shard-size", "2"
    )
    groups = read_split(tmp_path / "out", "train")
    assert all(len(g["json"]["members"]) <= 2 for g in groups)
    pairs = set()
    for g in groups:
        ids = [m["id"][-1] for m in g["json"]["members"]]
        pairs |= {(ids[r], ids[t]) for r, t, _ in derive_pairs(g["json"])}
    assert pairs == {("0", "2"), ("1", "3"), ("2", "4"), ("3", "4")}
    assert manifest["extra"]["groups"]["ratio"] > 1.0
    assert len(manifest["splits"]["gallery"]["shards"]) == 3  # 5 images, 2 per shard


# -- Fashion200k ---------------------------------------------------------------------------


def test_fashion200k_to_shards(tmp_path):
    broken = make_fashion200k(tmp_path / "raw")
    manifest = convert(fashion200k, tmp_path / "raw", tmp_path / "out")
    check_dataset(tmp_path / "out")
    assert manifest["evals"]["test"]["protocol"] == {
        "name": "fashion200k",
        "ks": [1, 10, 50],
        "hit": "label",
        "exclude_reference": True,
        "per_category": False,
    }

    skipped = skipped_reasons(manifest)
    assert skipped["labels/dress_train_detect_all.txt:6"].startswith("bad caption line")
    assert skipped[broken["missing"][0]] == "missing image file"
    for path in broken["truncated"]:
        assert skipped[path].startswith("truncated image")
    assert skipped["test_queries.txt:3"].startswith("unusable image: women/skirts/mini/24")
    assert skipped["test_queries.txt:4"].startswith("unknown image: women/skirts/mini/99")
    assert skipped["test_queries.txt:5"].startswith("bad query line")
    assert manifest["skipped_count"] == 7
    assert set(manifest["source"]["checksums"]) == {
        "test_queries.txt",
        "labels/dress_train_detect_all.txt",
        "labels/dress_test_detect_all.txt",
        "labels/skirt_train_detect_all.txt",
        "labels/skirt_test_detect_all.txt",
    }

    gallery = {s["json"]["id"]: s["json"] for s in read_split(tmp_path / "out", "gallery")}
    assert sorted(gallery) == sorted(p for _, p, _ in F200K_TEST[:4])
    assert gallery[F200K_TEST[0][1]]["label"] == "white midi dress"  # trailing spaces dropped
    queries = load_queries(tmp_path / "out", manifest, "test")
    assert [(q["text"], q["target_ids"]) for q in queries] == [
        ("replace white with green", [F200K_TEST[1][1]]),
        ("replace green with white", [F200K_TEST[0][1]]),
    ]

    # "blue lace gown" has no sibling caption: not modifiable, left out of training
    assert manifest["extra"]["train_images_unmodifiable"] == 1
    groups = read_split(tmp_path / "out", "train")
    texts = set()
    for g in groups:
        assert g["json"]["derive"] == "replace_word"
        captions = {m["caption"] for m in g["json"]["members"]}
        assert len(captions) >= 2
        assert all(g["json"]["parent"] in fashion200k.parent_captions(c) for c in captions)
        texts |= {t for _, _, ts in derive_pairs(g["json"]) for t in ts}
    assert texts == {
        "replace midi with maxi",
        "replace maxi with midi",
        "replace black with red",
        "replace red with black",
        "replace leather with pleated",
        "replace pleated with leather",
    }
    stored = [m["id"] for g in groups for m in g["json"]["members"]]
    usable = {p for _, p, c in F200K_TRAIN[:7] if c != "blue lace gown"}
    assert set(stored) == usable and len(stored) == len(usable)  # every image once


def test_fashion200k_groups_spread_images_over_parents():
    captions = {
        f"img{i}": c
        for i, c in enumerate(
            ["black midi dress"] * 4
            + ["red midi dress"] * 3
            + ["black maxi dress"]
            + ["red mini skirt"]
        )
    }
    groups, unusable = fashion200k.train_groups(captions, group_size=4)
    assert unusable == 1
    stored = [p for _, members in groups for p in members]
    # "black maxi dress" (1 image, 1 usable parent) stays single; "black midi dress" has two
    # usable parents ("midi dress", "black dress") and 4 images: each stored once
    assert sorted(set(stored)) == [f"img{i}" for i in range(8)]
    assert len(stored) <= 8 + len(groups)  # at most one copy per group
    for parent, members in groups:
        assert len(members) <= 5
        assert all(parent in fashion200k.parent_captions(captions[p]) for p in members)
        assert len({captions[p] for p in members}) >= 2


# -- MIT-States ----------------------------------------------------------------------------


def test_mitstates_to_shards(tmp_path):
    broken = make_mitstates(tmp_path / "raw")
    manifest = convert(mitstates, tmp_path / "raw", tmp_path / "out", "--group-size", "3")
    check_dataset(tmp_path / "out")
    protocol = manifest["evals"]["test"]["protocol"]
    assert protocol["name"] == "mitstates" and protocol["ks"] == [1, 5, 10]
    assert protocol["hit"] == "label"
    assert len(mitstates.TEST_NOUNS) == 49 and {"fish", "sky"} <= mitstates.TEST_NOUNS
    skipped = skipped_reasons(manifest)
    assert skipped[broken["truncated"][0]].startswith("truncated image")
    assert skipped[broken["not_image"][0]].startswith("not an image file")
    assert manifest["skipped_count"] == 2
    assert manifest["extra"]["excluded"] == {
        "no_state_images": 2,
        "other_folders": 1,
        "single_state_train_images": 2,
    }

    gallery = {s["json"]["id"]: s["json"] for s in read_split(tmp_path / "out", "gallery")}
    assert sorted(gallery) == [
        "cloudy sky/img_0.jpg",
        "fresh fish/img_0.jpg",
        "fried fish/img_0.jpg",
        "raw fish/img_0.jpg",
        "sunny sky/img_0.jpg",
    ]
    assert gallery["fried fish/img_0.jpg"] == {
        "id": "fried fish/img_0.jpg",
        "label": "fried fish",
        "caption": "fried fish",
        "adj": "fried",
        "noun": "fish",
    }
    queries = load_queries(tmp_path / "out", manifest, "test")
    assert len(queries) == 8  # fish: 3 images x 2 other states, sky: 2 x 1
    for q in queries:
        ref, target = gallery[q["ref_id"]], gallery[q["target_ids"][0]]
        assert ref["noun"] == target["noun"] and target["adj"] == q["text"] != ref["adj"]

    groups = read_split(tmp_path / "out", "train")
    stored = []
    for g in groups:
        assert g["json"]["derive"] == "change_state" and g["json"]["noun"] == "building"
        assert 2 <= len(g["json"]["members"]) <= 4
        assert len({m["attributes"]["adj"] for m in g["json"]["members"]}) >= 2
        assert all(
            texts[0] in {"ancient", "modern", "ruined"} for _, _, texts in derive_pairs(g["json"])
        )
        stored += [m["id"] for m in g["json"]["members"]]
    assert sorted(set(stored)) == sorted(
        f"{adj} building/img_{k}.jpg"
        for adj, n in (("ancient", 2), ("modern", 3), ("ruined", 1))
        for k in range(n)
    )

"""Converters of the datasets with explicit pairs (Fashion-IQ, CIRR) on tiny raw copies."""

from __future__ import annotations

from raw_datasets import make_cirr, make_fashioniq
from shard_reading import check_dataset, member_images, read_split, skipped_reasons

from pipeline.triplets import derive_pairs
from shards import cirr, fashioniq
from shards.manifest import load_queries


def convert(module, src, out, *extra):
    return module.main(["--src", str(src), "--out", str(out), "--read-threads", "2", *extra])


def test_fashioniq_to_shards(tmp_path):
    broken = make_fashioniq(tmp_path / "raw")
    manifest = convert(fashioniq, tmp_path / "raw", tmp_path / "out")
    check_dataset(tmp_path / "out")
    assert list(manifest["evals"]) == ["val", "test"]
    val = manifest["evals"]["val"]
    assert val["gallery"] == "val-gallery" and val["count"] == 8
    assert val["protocol"] == {
        "name": "fashioniq",
        "ks": [10, 50],
        "hit": "id",
        "exclude_reference": True,
        "per_category": True,
        "categories": ["dress", "shirt", "toptee"],
    }

    skipped = skipped_reasons(manifest)
    assert skipped[broken["missing"][0]] == "missing image file"
    assert skipped[broken["truncated"][0]].startswith("truncated image")
    assert skipped["captions/cap.toptee.train.json[4]"].startswith("bad caption entry")
    assert skipped["captions/cap.dress.train.json[3]"] == (
        "triplet with unusable image: image dtr4 missing"
    )
    assert "sva3 unusable (truncated image" in skipped["captions/cap.shirt.val.json[1]"]
    assert "ttr0 is not in the split's image list" in skipped["captions/cap.toptee.val.json[3]"]
    assert manifest["skipped_count"] == 6
    assert "image_splits/split.dress.val.json" in manifest["source"]["checksums"]

    gallery = {s["json"]["id"]: s["json"] for s in read_split(tmp_path / "out", "val-gallery")}
    assert len(gallery) == 11 and "sva3" not in gallery
    assert gallery["tva2"] == {"id": "tva2", "category": "toptee"}
    queries = load_queries(tmp_path / "out", manifest, "val")
    first = queries[0]
    assert first == {
        "qid": "val-dress-000000",
        "ref_id": "dva0",
        "text": "is green and has buttons",
        "texts": ["is green", "has buttons"],
        "captions": ["is green", "has buttons"],
        "target_ids": ["dva1"],
        "category": "dress",
    }
    assert all(gallery[q["target_ids"][0]]["category"] == q["category"] for q in queries)

    test_queries = load_queries(tmp_path / "out", manifest, "test")
    assert [q["target_ids"] for q in test_queries] == [[], []]
    test_gallery = read_split(tmp_path / "out", "test-gallery")
    assert [s["images"].keys() for s in test_gallery][0] == {"img.png"}  # PNG kept as PNG

    # train: per category the triplets (0,1) (1,2) (0,2) share images -> one group of 3
    groups = read_split(tmp_path / "out", "train")
    assert manifest["extra"]["groups"] == {"stored": 13, "unique": 13, "ratio": 1.0}
    dress = next(g for g in groups if g["json"]["members"][0]["id"] == "dtr0")
    ids = [m["id"] for m in dress["json"]["members"]]
    assert ids == ["dtr0", "dtr1", "dtr2"]
    assert {(ids[r], ids[t]): x for r, t, x in derive_pairs(dress["json"])}[("dtr0", "dtr1")] == [
        "is red and has no sleeves",
        "has no sleeves and is red",
    ]
    assert member_images(dress)[0] == (tmp_path / "raw" / "images" / "dtr0.jpg").read_bytes()


def test_fashioniq_one_category_without_test(tmp_path):
    make_fashioniq(tmp_path / "raw", with_test=False)
    manifest = convert(fashioniq, tmp_path / "raw", tmp_path / "out", "--categories", "shirt")
    check_dataset(tmp_path / "out")
    assert list(manifest["evals"]) == ["val"]
    assert manifest["evals"]["val"]["protocol"]["categories"] == ["shirt"]
    assert {s["json"]["category"] for s in read_split(tmp_path / "out", "val-gallery")} == {"shirt"}


def test_cirr_to_shards(tmp_path):
    broken = make_cirr(tmp_path / "raw")
    manifest = convert(cirr, tmp_path / "raw", tmp_path / "out")
    check_dataset(tmp_path / "out")
    assert manifest["evals"]["val"]["protocol"] == {
        "name": "cirr",
        "ks": [1, 5, 10, 50],
        "subset_ks": [1, 2, 3],
        "hit": "id",
        "exclude_reference": True,
        "per_category": False,
    }

    skipped = skipped_reasons(manifest)
    assert skipped[broken["missing"][0]] == "missing image file"
    assert skipped[broken["truncated"][0]].startswith("truncated image")
    assert skipped["captions/cap.rc2.train.json[5]"].startswith("bad caption entry")
    assert skipped["captions/cap.rc2.train.json[4]"].startswith("pair with unusable image")
    assert skipped["captions/cap.rc2.val.json[1]"].startswith("query with unknown or unusable")
    assert "dev-77-0-img1 missing" in skipped["captions/cap.rc2.val.json[4]"]
    assert skipped["captions/cap.rc2.val.json[2] member dev-99-0-img0"].startswith(
        "set member not in the gallery"
    )
    assert set(manifest["source"]["checksums"]) == {
        f"{kind}/{prefix}.rc2.{s}.json"
        for kind, prefix in (("captions", "cap"), ("image_splits", "split"))
        for s in ("train", "val", "test1")
    }

    val = load_queries(tmp_path / "out", manifest, "val")
    assert [q["pairid"] for q in val] == [10, 12, 13]
    assert val[1] == {
        "qid": "val-12",
        "ref_id": "dev-4-1-img0",
        "text": "close up",
        "target_ids": ["dev-5-1-img1"],
        "pairid": 12,
        "members": ["dev-1-1-img1", "dev-2-1-img0", "dev-4-1-img0", "dev-5-1-img1"],
    }
    test = load_queries(tmp_path / "out", manifest, "test")
    assert [(q["qid"], q["target_ids"], len(q["members"])) for q in test] == [
        ("test-20", [], 4),
        ("test-21", [], 4),
    ]
    assert len(read_split(tmp_path / "out", "test-gallery")) == 4

    groups = read_split(tmp_path / "out", "train")
    members = sorted(len(g["json"]["members"]) for g in groups)
    assert members == [2, 4]  # the 4-image set with 3 pairs is one group
    texts = {x for g in groups for _, _, xs in derive_pairs(g["json"]) for x in xs}
    assert texts == {"add a dog", "remove the cat", "make it night", "zoom in"}


def test_cirr_images_next_to_annotations(tmp_path):
    make_cirr(tmp_path / "raw", img_raw=False)
    manifest = convert(cirr, tmp_path / "raw", tmp_path / "out", "--group-size", "2")
    check_dataset(tmp_path / "out")
    assert manifest["extra"]["image_root"] == str(tmp_path / "raw")
    groups = read_split(tmp_path / "out", "train")
    assert all(len(g["json"]["members"]) == 2 for g in groups) and len(groups) == 4
    # the 4-image chain 0-1-2-3 is cut in 3 groups of two: images 1 and 2 are stored twice
    assert manifest["extra"]["groups"] == {"stored": 8, "unique": 6, "ratio": 1.3333}

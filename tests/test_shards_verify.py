"""shards.verify: passes a sound dataset, names each kind of damage."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

import pytest

from shards import css, verify

TINY = css.CssConfig(
    seed=5,
    train_scenes=6,
    test_scenes=5,
    mods_per_scene=4,
    mod_pool=40,
    image_size=32,
    shard_size=10,
)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("verify") / "css"
    css.generate_css(out, TINY, workers=1)
    return out


@pytest.fixture
def dataset(pristine, tmp_path) -> Path:
    copy = tmp_path / "css"
    shutil.copytree(pristine, copy)
    return copy


def manifest_of(path: Path) -> dict:
    return json.loads((path / "manifest.json").read_text())


def rewrite_manifest(path: Path, manifest: dict) -> None:
    (path / "manifest.json").write_text(json.dumps(manifest))


def test_sound_dataset_passes(dataset, capsys):
    assert verify.verify_dataset(dataset) == []
    assert verify.main([str(dataset), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "OK" in out and "gallery" in out and f"{5 * 5:8d} images" in out


def test_truncated_tar_is_reported(dataset, capsys):
    shard = dataset / manifest_of(dataset)["splits"]["train"]["shards"][0]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    problems = verify.verify_dataset(dataset)
    assert any(shard.name in p and "unreadable tar" in p for p in problems), problems
    assert any("manifest says" in p and "samples" in p for p in problems), problems
    assert verify.main([str(dataset), "--no-progress"]) == 1
    assert shard.name in capsys.readouterr().err


def test_corrupt_image_is_reported(dataset):
    shard = dataset / manifest_of(dataset)["splits"]["gallery"]["shards"][0]
    members = []
    with tarfile.open(shard) as tar:
        for member in tar.getmembers():
            members.append((member, tar.extractfile(member).read()))
    victim = next(m.name for m, _ in members if m.name.endswith(".png"))
    with tarfile.open(shard, "w", format=tarfile.USTAR_FORMAT) as tar:
        for member, data in members:
            if member.name == victim:  # keep the PNG signature and header, garble the pixels
                data = data[:60] + bytes(255 - b for b in data[60:])
            tar.addfile(member, io.BytesIO(data))
    problems = verify.verify_dataset(dataset)
    assert any(victim.split(".")[0] in p and "does not decode" in p for p in problems), problems


def test_missing_and_unlisted_shards_are_reported(dataset):
    manifest = manifest_of(dataset)
    missing = manifest["splits"]["gallery"]["shards"][-1]
    (dataset / missing).rename(dataset / "gallery-000099.tar")
    problems = verify.verify_dataset(dataset)
    assert any(missing in p and "listed but missing" in p for p in problems), problems
    assert any("gallery-000099.tar" in p and "not listed" in p for p in problems), problems
    # the queries whose images lived in the missing shard now point at nothing
    assert any("is not in gallery split 'gallery'" in p for p in problems), problems


def test_wrong_counts_are_reported(dataset):
    manifest = manifest_of(dataset)
    manifest["splits"]["train"]["images"] += 1
    manifest["evals"]["test"]["count"] -= 1
    rewrite_manifest(dataset, manifest)
    problems = verify.verify_dataset(dataset)
    assert any("'train'" in p and "images" in p for p in problems), problems
    assert any("queries" in p and "manifest says" in p for p in problems), problems


def test_broken_references_and_fields_are_reported(dataset):
    queries = json.loads((dataset / "queries.json").read_text())
    queries[0]["ref_id"] = "css_test_999999"
    queries[1]["qid"] = queries[2]["qid"]
    del queries[3]["text"]
    (dataset / "queries.json").write_text(json.dumps(queries))
    problems = verify.verify_dataset(dataset)
    assert any("'css_test_999999'" in p for p in problems), problems
    assert any("occurs 2 times" in p for p in problems), problems
    assert any("query #3" in p and "text" in p for p in problems), problems


def test_bad_group_json_is_reported(dataset):
    shard = dataset / manifest_of(dataset)["splits"]["train"]["shards"][0]
    members = []
    with tarfile.open(shard) as tar:
        for member in tar.getmembers():
            members.append((member, tar.extractfile(member).read()))
    with tarfile.open(shard, "w", format=tarfile.USTAR_FORMAT) as tar:
        for member, data in members:
            if member.name.endswith(".json"):
                group = json.loads(data)
                group["pairs"][0]["tgt"] = 99
                data = json.dumps(group).encode()
                member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
    problems = verify.verify_dataset(dataset)
    assert any("pair 0->99" in p for p in problems), problems


def test_missing_manifest_is_one_readable_problem(dataset):
    (dataset / "manifest.json").unlink()
    (problem,) = verify.verify_dataset(dataset)
    assert "not a finished shard dataset" in problem

"""export.int8: the quantized image encoder is built, checked against float32 and listed;
the runtime serves it only while it matches the export; the recall gate and bad inputs."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from export_fixtures import cached_export, limit_threads, tiny_dataset

from export import int8 as export_int8
from export.artifacts import ArtifactError
from export.int8_listing import listing_path
from export.runtime import open_runtime
from serve.__main__ import parse_args

limit_threads()
CALIBRATION = ["--calibration-images", "8", "--parity-images", "4", "--threads", "1"]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """An exported tiny TIRG with its int8 graphs, and the dataset they were checked on."""
    base = tmp_path_factory.mktemp("int8")
    data = tiny_dataset(base / "shards")
    source, _ = cached_export(tmp_path_factory, "tirg")
    art = base / "art"
    shutil.copytree(source, art)
    code = export_int8.main(
        ["--artifacts", str(art), "--data", str(data), *CALIBRATION, "--max-recall-drop", "100"]
    )
    assert code == 0
    return art, data


def test_listing_records_the_checks(built):
    art, data = built
    listing = json.loads(listing_path(art).read_text())
    entry = listing["graphs"]["image_encoder"]
    assert (art / entry["file"]).is_file() and entry["file"].startswith("int8/")
    assert listing["calibration"] == {"images": 8, "data": str(data), "split": "gallery"}
    assert listing["parity"]["images"] == 4
    assert 0.9 < listing["parity"]["target_cosine_min"] <= listing["parity"]["target_cosine_mean"]
    recall = listing["recall"]
    assert set(recall["fp32"]) == set(recall["int8"]) and "R@1" in recall["fp32"]
    assert not list(art.glob("int8.partial-*")) and not list((art / "int8").glob("*.npy"))


def test_runtime_serves_int8_close_to_fp32(built):
    art, _ = built
    fp32 = open_runtime(art, "onnxruntime", threads=1)
    int8 = open_runtime(art, "onnxruntime", threads=1, precision="int8")
    assert "int8" in int8.describe and "int8/image_encoder.onnx" in int8.describe
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    tokens, lengths = fp32.tokenize(["make it red", "add a circle", "remove it"])
    want, got = fp32.query(images, tokens, lengths), int8.query(images, tokens, lengths)
    assert got.shape == want.shape == (3, fp32.embed_dim) and got.dtype == torch.float32
    assert torch.allclose(got.norm(dim=1), torch.ones(3), atol=1e-4)
    assert (want * got).sum(dim=1).min() > 0.9
    assert not torch.equal(want, got)  # the int8 graph did run


def test_stale_or_missing_listing_is_refused(built, tmp_path):
    art, _ = built
    copy = tmp_path / "art"
    shutil.copytree(art, copy)
    path = listing_path(copy)
    listing = json.loads(path.read_text())
    listing["graphs"]["image_encoder"]["source_sha256"] = "0" * 64
    path.write_text(json.dumps(listing))
    with pytest.raises(ArtifactError, match="re-exported since"):
        open_runtime(copy, "onnxruntime", precision="int8")
    shutil.rmtree(copy / "int8")
    with pytest.raises(ArtifactError, match="python -m export.int8"):
        open_runtime(copy, "onnxruntime", precision="int8")
    with pytest.raises(ValueError, match="precision must be one of"):
        open_runtime(copy, "onnxruntime", precision="fp16")


def test_recall_gate_writes_nothing(built, tmp_path, monkeypatch, capsys):
    art, data = built
    copy = tmp_path / "art"
    shutil.copytree(art, copy)
    before = listing_path(copy).read_text()
    drop = {"eval": "test", "fp32": {"R@1": 50.0}, "int8": {"R@1": 45.0}, "max_drop": 5.0}
    monkeypatch.setattr(export_int8, "compare_recalls", lambda *a, **k: drop)
    argv = ["--artifacts", str(copy), "--data", str(data), *CALIBRATION, "--overwrite"]
    assert export_int8.main(argv) == 1
    assert "drops a recall" in capsys.readouterr().err
    assert listing_path(copy).read_text() == before  # the earlier build stays
    assert not list(copy.glob("int8.partial-*"))


def test_bad_inputs(built, tmp_path, capsys):
    art, data = built
    argv = ["--artifacts", str(art), "--data", str(data), *CALIBRATION, "--no-recall"]
    assert export_int8.main(argv) == 2  # built already, no --overwrite
    assert "already exists" in capsys.readouterr().err
    copy = tmp_path / "art"
    shutil.copytree(art, copy, ignore=shutil.ignore_patterns("int8"))
    too_many = ["--artifacts", str(copy), "--data", str(data), "--calibration-images", "40"]
    assert export_int8.main(too_many) == 2
    assert "104 are needed (--calibration-images 40 + --parity-images 64)" in (
        capsys.readouterr().err
    )
    assert export_int8.main(["--artifacts", str(tmp_path / "none"), "--data", str(data)]) == 2
    with pytest.raises(SystemExit):
        export_int8.parse_args(
            ["--artifacts", str(art), "--data", str(data), "--parity-images", "0"]
        )


@pytest.mark.parametrize(
    "backend,precision,options",
    [
        ("onnxruntime", "int8", {"precision": "int8"}),
        ("onnxruntime", "fp32", {"precision": "fp32"}),
        ("tensorrt", "fp16", {"fp16": True}),
        ("torch", "fp32", {}),
        ("onnxruntime", "fp16", None),
        ("torch", "int8", None),
    ],
)
def test_serve_precision_flag(backend, precision, options, tmp_path, capsys):
    argv = ["--artifacts", str(tmp_path), "--backend", backend, "--precision", precision]
    if options is None:
        with pytest.raises(SystemExit) as exit_info:
            parse_args(argv)
        assert exit_info.value.code == 2
        assert f"precision {precision} is not one of backend {backend}'s" in capsys.readouterr().err
    else:
        assert parse_args(argv).backend_options == options

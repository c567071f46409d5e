"""export.index: the gallery index layout, its agreement with the torch backend and with
the shards, resuming after an interruption, and bad inputs."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from export_fixtures import cached_export, limit_threads, tiny_dataset

from export import index as export_index
from export.artifacts import load_artifacts
from export.index import build_index
from export.runtime import open_runtime
from export.runtime.onnxruntime_graphs import OnnxRuntimeGraphs
from pipeline.gallery_data import read_gallery_bytes

limit_threads()
GALLERY = 12


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    base = tmp_path_factory.mktemp("index")
    data = tiny_dataset(base / "shards", gallery_size=GALLERY)
    art, _ = cached_export(tmp_path_factory, "tirg")
    reference = build_index(
        art,
        data,
        out=base / "reference",
        dtype="float32",
        batch_size=5,
        threads=1,
        show_progress=False,
    )
    return art, data, base / "reference", reference


def _arrays(index_dir):
    names = ["embeddings.npy", "repr_feature.npy", "image_offsets.npy"]
    return {n: np.load(index_dir / n) for n in names} | {
        "images.bin": (index_dir / "images.bin").read_bytes(),
        "meta.jsonl": (index_dir / "meta.jsonl").read_text(),
        "ids.json": json.loads((index_dir / "ids.json").read_text()),
    }


def test_index_layout_matches_shards_and_model(setup):
    art, data, out, info = setup
    arts = json.loads((art / "artifacts.json").read_text())
    assert info == json.loads((out / "index.json").read_text())
    assert info["complete"] is True and info["count"] == GALLERY and info["embed_dim"] == 32
    assert info["repr"] == {"feature": {"shape": [32], "dtype": "float32"}}
    assert info["checkpoint_sha256"] == arts["checkpoint"]["sha256"]
    assert not (out / "progress.json").exists()
    arrays = _arrays(out)
    ids = arrays["ids.json"]
    assert ids == [f"gal_{i:04d}" for i in range(GALLERY)]
    metas = [json.loads(line) for line in arrays["meta.jsonl"].splitlines()]
    assert [m["id"] for m in metas] == ids and metas[3]["label"] == "label3"
    assert set(metas[0]) == {"id", "label", "caption", "category", "ext"}
    raw = read_gallery_bytes(data)
    offsets = arrays["image_offsets.npy"]
    assert offsets.shape == (GALLERY + 1,) and offsets[0] == 0
    for row, gid in enumerate(ids):
        assert arrays["images.bin"][offsets[row] : offsets[row + 1]] == raw[gid][0]
    emb = arrays["embeddings.npy"]
    assert emb.shape == (GALLERY, 32) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    # stored representations compose to the same target as the encoder
    runtime = open_runtime(art, "onnxruntime", threads=1)
    target = runtime.embed_target({"feature": torch.from_numpy(arrays["repr_feature.npy"][:4])})
    np.testing.assert_allclose(target.numpy(), emb[:4], atol=1e-5)


def test_float16_index_with_torch_backend_agrees(setup, tmp_path):
    art, data, reference, _ = setup
    info = build_index(
        art,
        data,
        out=tmp_path / "idx",
        dtype="float16",
        batch_size=7,
        backend="torch",
        show_progress=False,
    )
    assert info["dtype"] == "float16"
    emb = np.load(tmp_path / "idx" / "embeddings.npy", mmap_mode="r")
    assert emb.dtype == np.float16
    np.testing.assert_allclose(emb, np.load(reference / "embeddings.npy"), atol=2e-3)
    assert (tmp_path / "idx" / "images.bin").read_bytes() == (reference / "images.bin").read_bytes()


class Interrupting(OnnxRuntimeGraphs):
    """Counts encoded batches; raises KeyboardInterrupt at batch ``stop`` (1-based)."""

    def __init__(self, art, stop=None):
        super().__init__(load_artifacts(art), threads=1)
        self.stop, self.batches = stop, 0

    def embed_target(self, image_repr):
        self.batches += 1
        if self.batches == self.stop:
            raise KeyboardInterrupt
        return super().embed_target(image_repr)


def test_interrupted_build_resumes_at_last_completed_batch(setup, tmp_path):
    art, data, reference, _ = setup
    out = tmp_path / "idx"
    first = Interrupting(art, stop=2)
    with pytest.raises(KeyboardInterrupt):
        build_index(
            art, data, out=out, dtype="float32", batch_size=5, runtime=first, show_progress=False
        )
    progress = json.loads((out / "progress.json").read_text())
    assert progress["rows"] == 5 and not (out / "index.json").exists()
    # a crash between writing rows and recording them leaves bytes that must be cut off
    with open(out / "images.bin", "ab") as fh:
        fh.write(b"half-written batch")
    with open(out / "meta.jsonl", "a") as fh:
        fh.write('{"id": "partial"')

    second = Interrupting(art)
    info = build_index(
        art, data, out=out, dtype="float32", batch_size=5, runtime=second, show_progress=False
    )
    assert second.batches == 2  # rows 5-9 and 10-11; rows 0-4 were kept
    assert info["complete"] is True and not (out / "progress.json").exists()
    got, want = _arrays(out), _arrays(reference)
    for name, value in want.items():
        if isinstance(value, np.ndarray):
            np.testing.assert_allclose(got[name], value, atol=1e-6, err_msg=name)
        else:
            assert got[name] == value, name

    # a finished index is not rebuilt; other settings start over
    third = Interrupting(art)
    build_index(
        art, data, out=out, dtype="float32", batch_size=5, runtime=third, show_progress=False
    )
    assert third.batches == 0
    build_index(
        art, data, out=out, dtype="float16", batch_size=5, runtime=third, show_progress=False
    )
    assert third.batches == 3
    assert np.load(out / "embeddings.npy").dtype == np.float16


def test_bad_inputs_exit_2_with_one_line(setup, tmp_path, capsys):
    art, data, _, _ = setup
    broken = tmp_path / "art"
    shutil.copytree(art, broken, ignore=shutil.ignore_patterns("index"))
    (broken / "target_head.onnx").unlink()
    cases = [
        (["--artifacts", broken, "--data", data], "target_head.onnx: missing"),
        (["--artifacts", art, "--data", tmp_path / "no-shards"], "no-shards"),
        (["--artifacts", art, "--data", data, "--split", "train"], "not a gallery split"),
    ]
    for args, message in cases:
        code = export_index.main([str(a) for a in args] + ["--threads", "1"])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and message in err[0], err
    other = tmp_path / "not-an-index"
    other.mkdir()
    (other / "notes.txt").write_text("keep")
    code = export_index.main(["--artifacts", str(art), "--data", str(data), "--out", str(other)])
    assert code == 2 and (other / "notes.txt").read_text() == "keep"

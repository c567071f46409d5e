"""The query service under hostile input and tampered artifacts: crafted images, every
image mode, pickles in checkpoints, tampered graphs, damaged indexes, stale partials
(slow and vanishing clients: test_serve_slow_clients.py)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from hostile_inputs import (
    LOSSY_MODES,
    PickleBomb,
    encode,
    header_only_png,
    modes_of,
    picture,
    png16,
)
from PIL import Image

from pipeline.checkpoint import CheckpointError, load_checkpoint
from pipeline.images import ImagePreprocess, decode_image
from pipeline.partials import OWNER_FILE, partial_dir
from serve.__main__ import main as serve_main
from serve.app import ServiceLimits, create_app
from serve.engine import ImageTooLargeError, QueryEngine

REPO = Path(__file__).resolve().parents[1]


# -- 1. extreme aspect ratios and sizes, refused from the header ----------------------------
@pytest.mark.parametrize(
    "data, limit",
    [
        (encode(Image.new("RGB", (50000, 2))), "each side"),
        (encode(Image.new("RGB", (12000, 2))), "aspect ratio"),
        (header_only_png(1, 40_000_000), "each side"),
        (header_only_png(9000, 8000), "pixels are accepted"),
    ],
    ids=["50000x2", "12000x2", "1x40000000-header", "72M-pixels"],
)
def test_oversized_or_elongated_uploads_are_refused_before_decoding(engine, data, limit):
    with TestClient(create_app(engine, ServiceLimits())) as client:
        began = time.perf_counter()
        response = client.post(
            "/search", data={"text": "red"}, files={"image": ("x.png", data, "image/png")}
        )
        elapsed = time.perf_counter() - began
    assert response.status_code == 413, response.text
    assert response.json()["error"] == "image_too_large"
    assert limit in response.json()["detail"]
    assert elapsed < 1.0  # nothing was decoded (50000x2 took 579 ms, 100000x1 5.4 s before)


def test_elongated_images_within_limits_resize_through_a_small_window():
    rng = np.random.default_rng(0)
    smooth = torch.nn.functional.interpolate(
        torch.from_numpy(rng.random((1, 3, 30, 300), dtype=np.float32)), size=(300, 3000)
    )
    image = (smooth[0] * 255).round().to(torch.uint8)
    preprocess = ImagePreprocess(64)
    # what resizing the whole image and centre-cropping gives
    import torchvision.transforms.v2.functional as TF

    whole = TF.center_crop(TF.resize(image.float() / 255, [64], antialias=True), [64, 64])
    mean, std = torch.tensor(preprocess.mean), torch.tensor(preprocess.std)
    whole = (whole - mean.view(3, 1, 1)) / std.view(3, 1, 1)
    assert torch.allclose(preprocess(image), whole, atol=1e-4)
    assert preprocess(image.transpose(1, 2).contiguous()).shape == (3, 64, 64)


# -- 3. every image mode reaches the network as the same RGB picture ------------------------
@pytest.mark.parametrize("mode", sorted(modes_of(picture())))
def test_every_mode_decodes_to_the_same_rgb_picture(engine, mode):
    data, want = modes_of(picture())[mode]
    decoded = decode_image(data)  # the shard reader's decoder
    assert decoded.dtype == torch.uint8 and decoded.shape == (3, *want.shape[:2])
    diff = np.abs(decoded.permute(1, 2, 0).numpy().astype(int) - want.astype(int))
    assert diff.max() <= (2 if mode in LOSSY_MODES else 0), (mode, diff.max())
    served = engine.prepare_image(data)  # serving's path
    reference = engine.preprocess(torch.from_numpy(want.copy()).permute(2, 0, 1))
    tolerance = 0.05 if mode in LOSSY_MODES else 1e-6
    assert torch.allclose(served, reference, atol=tolerance), (
        mode,
        (served - reference).abs().max(),
    )


@pytest.mark.parametrize("width,height", [(1, 1), (1, 5), (40, 30)])
def test_a_pillow_decoded_image_owns_writable_memory(monkeypatch, width, height):
    # Pillow hands out read-only arrays; a tensor that aliased one (a 1x1 image's
    # permuted view already counts as contiguous, so nothing copied it) would let the
    # preprocessing write into Pillow's buffer
    import pipeline.images as images

    real_pil_to_rgb, handed_out = images.pil_to_rgb, []

    def keep(image):
        handed_out.append(real_pil_to_rgb(image))
        return handed_out[-1]

    monkeypatch.setattr(images, "pil_to_rgb", keep)
    data = encode(Image.fromarray(picture(width, height)), "TIFF")  # torchvision lacks TIFF
    decoded = decode_image(data)
    assert handed_out and not handed_out[0].flags.writeable
    assert decoded.shape == (3, height, width) and decoded.is_contiguous()
    assert not np.shares_memory(decoded.numpy(), handed_out[0])
    decoded.fill_(7)  # and it can be written


def test_a_16bit_png_scores_like_its_8bit_twin(engine):
    rgb = picture(64, 64)
    eight = engine.query("make it red", image=encode(Image.fromarray(rgb)), k=5)
    sixteen = engine.query("make it red", image=png16(rgb.astype(np.uint16) * 257), k=5)
    assert [h.id for h in sixteen] == [h.id for h in eight]
    assert [h.score for h in sixteen] == pytest.approx([h.score for h in eight], abs=1e-5)


@pytest.mark.parametrize("mode", ["rgb16_png", "cmyk_jpeg", "i16_tiff"])
def test_shard_conversion_stores_the_same_8bit_picture(tmp_path, mode):
    from shards.imageio import check_image, encoded_image

    data, want = modes_of(picture())[mode]
    path = tmp_path / f"image.{mode.split('_')[1]}"
    path.write_bytes(data)
    checked = check_image(path)
    assert checked.convert and checked.ext == "png"  # not kept as is: converted once
    stored = encoded_image(checked)
    with Image.open(__import__("io").BytesIO(stored.data)) as image:
        assert image.mode == "RGB"
    diff = np.abs(decode_image(stored.data).permute(1, 2, 0).numpy().astype(int) - want)
    assert diff.max() <= (2 if mode in LOSSY_MODES else 0)


# -- 2. no pickle runs from artifact files; tampered checkpoints are refused ----------------
def test_a_checkpoint_whose_pickle_runs_code_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "code-ran"
    torch.save(
        {"format": "composed-retrieval-checkpoint/1", "x": PickleBomb(str(marker))},
        tmp_path / "checkpoint.pt",
    )
    with pytest.raises(CheckpointError, match="weights-only"):
        load_checkpoint(tmp_path)
    assert not marker.exists()


def _artifact_copy(art_dir: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "artifacts"
    shutil.copytree(art_dir, copy)
    return copy


def test_the_torch_backend_refuses_a_crafted_checkpoint_even_with_its_hash_recorded(
    art_dir, tmp_path
):
    from pipeline.checkpoint import file_sha256

    copy = _artifact_copy(art_dir, tmp_path)
    marker = tmp_path / "code-ran"
    torch.save(
        {"format": "composed-retrieval-checkpoint/1", "x": PickleBomb(str(marker))},
        copy / "checkpoint.pt",
    )
    arts = json.loads((copy / "artifacts.json").read_text())
    arts["checkpoint"]["sha256"] = file_sha256(copy / "checkpoint.pt")  # the attacker's too
    (copy / "artifacts.json").write_text(json.dumps(arts))
    info = json.loads((copy / "index" / "index.json").read_text())
    info["checkpoint_sha256"] = arts["checkpoint"]["sha256"]
    (copy / "index" / "index.json").write_text(json.dumps(info))
    with pytest.raises(CheckpointError):
        QueryEngine(copy, backend="torch", device="cpu")
    assert not marker.exists()


def test_a_checkpoint_with_a_mismatched_sha256_is_not_read_at_all(art_dir, tmp_path, monkeypatch):
    copy = _artifact_copy(art_dir, tmp_path)
    payload = torch.load(copy / "checkpoint.pt", weights_only=True)
    payload["step"] = 999  # a changed file, valid in every other way
    torch.save(payload, copy / "checkpoint.pt")

    def never(*args, **kwargs):
        raise AssertionError("torch.load ran on a file whose hash does not match")

    monkeypatch.setattr(torch, "load", never)
    with pytest.raises(CheckpointError, match="sha256"):
        QueryEngine(copy, backend="torch", device="cpu")


def test_a_tampered_onnx_graph_is_refused(art_dir, tmp_path):
    from export.artifacts import ArtifactError

    copy = _artifact_copy(art_dir, tmp_path)
    with open(copy / "composer.onnx", "ab") as fh:
        fh.write(b"\0")
    with pytest.raises(ArtifactError, match="sha256"):
        QueryEngine(copy, backend="onnxruntime", device="cpu")


# -- 7. start-up refusals: one line naming the file, exit 2 ----------------------------------
def _damage(index: Path, kind: str) -> str:
    """Damage ``index`` one way; returns the file name the refusal must name."""
    if kind == "index_json":
        (index / "index.json").write_text("{not json")
        return "index.json"
    if kind == "ids_missing":
        (index / "ids.json").unlink()
        return "ids.json"
    if kind == "embeddings_garbage":
        (index / "embeddings.npy").write_bytes(b"\x93NUMPY garbage")
        return "embeddings.npy"
    if kind == "embeddings_nan":
        rows = np.load(index / "embeddings.npy")
        rows[3, 0] = np.nan
        np.save(index / "embeddings.npy", rows)
        return "embeddings.npy"
    if kind == "repr_inf":
        name = next(index.glob("repr_*.npy"))
        rows = np.load(name)
        rows.reshape(len(rows), -1)[5, 0] = np.inf
        np.save(name, rows)
        return name.name
    raise ValueError(kind)


DAMAGE = ["index_json", "ids_missing", "embeddings_garbage", "embeddings_nan", "repr_inf"]


@pytest.mark.parametrize("kind", DAMAGE)
def test_a_damaged_index_is_refused_with_one_line_and_exit_2(art_dir, tmp_path, capsys, kind):
    copy = _artifact_copy(art_dir, tmp_path)
    name = _damage(copy / "index", kind)
    code = serve_main(["--artifacts", str(copy), "--device", "cpu", "--no-warmup"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("serve: error: ") and name in err[0], err
    assert "Traceback" not in err[0]


def test_the_command_exits_2_on_a_nan_index(art_dir, tmp_path):
    copy = _artifact_copy(art_dir, tmp_path)
    _damage(copy / "index", "embeddings_nan")
    result = subprocess.run(
        [sys.executable, "-m", "serve", "--artifacts", str(copy), "--device", "cpu"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, result.stderr
    assert lines[-1].startswith("serve: error: ") and "NaN" in lines[-1]
    assert "Traceback" not in result.stderr


# -- 8. stale partial directories ------------------------------------------------------------
def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_stale_partials_are_removed_and_live_or_foreign_ones_kept(tmp_path, caplog):
    from shards.writer import DatasetWriter

    out = tmp_path / "data"
    stale = partial_dir(out, _dead_pid())
    stale.mkdir()
    (stale / "train-000000.tar").write_bytes(b"x" * 1000)
    live = partial_dir(out, os.getppid())
    live.mkdir()
    foreign = partial_dir(out, _dead_pid() + 1)
    foreign.mkdir()
    (foreign / OWNER_FILE).write_text("another-host")
    with caplog.at_level("WARNING"), DatasetWriter(out, name="t", created_by="test") as writer:
        assert writer.tmp_dir == partial_dir(out)
    assert not stale.exists() and live.exists() and foreign.exists()
    assert any("removed stale partial directory" in r.message for r in caplog.records)


def test_export_removes_a_killed_exports_partial(tmp_path):
    from export.artifacts import staging_dir

    out = tmp_path / "art"
    stale = partial_dir(out, _dead_pid())
    stale.mkdir()
    (stale / "image_encoder.onnx").write_bytes(b"x" * 100)
    with staging_dir(out) as tmp:
        (tmp / "artifacts.json").write_text("{}")
    assert not stale.exists()
    assert sorted(p.name for p in out.iterdir()) == ["artifacts.json"]  # no owner file left


def test_image_too_large_error_names_the_limit(engine):
    with pytest.raises(ImageTooLargeError, match="at most 20:1"):
        engine.prepare_image(encode(Image.new("RGB", (2100, 100))))

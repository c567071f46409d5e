"""``bench/train_throughput.py`` runs every path on the CPU at a tiny size and writes the
rows the GPU suite reads (a crash there would cost device time), on JPEG shards as the
suite's 224 px rows use."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
from pathlib import Path

import pytest

from shards import css

BENCH = Path(__file__).resolve().parents[1] / "bench" / "train_throughput.py"
TINY = css.CssConfig(
    train_scenes=6, test_scenes=2, mods_per_scene=3, mod_pool=30, image_size=32, shard_size=8
)  # fmt: skip
KEYS = {"gpu", "model", "image_size", "batch", "path", "image_format", "ms_per_step"}


@pytest.fixture(scope="module")
def train_throughput():
    spec = importlib.util.spec_from_file_location("train_throughput", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def jpeg_css(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("css") / "jpg"
    css.generate_css(out, dataclasses.replace(TINY, image_format="jpg"), workers=1)
    return out


def test_every_path_writes_its_row(train_throughput, jpeg_css, tmp_path, capsys):
    out = tmp_path / "rows.json"
    paths = ["eager-stream", "graph-cache", "eager-synthetic"]
    argv = ["--data", str(jpeg_css), "--cases", "image_only:32:4", "--paths", *paths]
    argv += ["--steps", "4", "--warmup", "1", "--profile-steps", "1", "--threads", "1"]
    argv += ["--set", "model.embed_dim=16", "--set", "train.threads=1", "--out", str(out)]
    assert train_throughput.main(argv) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["path"] for r in rows] == paths
    for row in rows:
        assert KEYS <= set(row) and row["triplets_per_s"] > 0
        assert row["ms_per_step"] == pytest.approx(1000 * 4 / row["triplets_per_s"], rel=1e-2)
    assert [r["image_format"] for r in rows] == ["jpg", "jpg", "tensor"]
    assert "CUDA graphs need a CUDA device" in " ".join(rows[1]["step_mode"])
    assert "eager-synthetic" in capsys.readouterr().out


def test_image_format_reads_the_shards(train_throughput, jpeg_css, tmp_path):
    assert train_throughput.image_format(jpeg_css) == "jpg"
    css.generate_css(tmp_path / "png", TINY, workers=1)
    assert train_throughput.image_format(tmp_path / "png") == "png"

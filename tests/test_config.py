"""Run config: inheritance, --set overrides, demo settings, clear errors for bad keys."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pipeline.config import (
    DEFAULTS,
    ConfigError,
    dump_config,
    load_config,
    resolve_run_paths,
)

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


def write(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def test_inheritance_chain_merges_sections(tmp_path):
    write(tmp_path / "root.yaml", {"optim": {"lr": 0.5, "momentum": 0.8}, "train": {"steps": 10}})
    write(
        tmp_path / "mid.yaml",
        {"base": "root.yaml", "optim": {"lr": 0.1}, "model": {"name": "concat"}},
    )
    leaf = write(tmp_path / "leaf.yaml", {"base": "mid.yaml", "name": "leaf"})
    config = load_config(leaf)
    assert config["name"] == "leaf"
    assert config["optim"]["lr"] == 0.1  # mid wins over root
    assert config["optim"]["momentum"] == 0.8  # root kept where mid is silent
    assert config["model"]["name"] == "concat"
    assert (
        config["model"]["image_backbone"] == DEFAULTS["model"]["image_backbone"]
    )  # defaults fill in
    assert config["train"]["steps"] == 10
    assert "base" not in config


def test_set_overrides_parse_yaml_values(tmp_path):
    path = write(tmp_path / "c.yaml", {"model": {"name": "tirg"}})
    config = load_config(
        path,
        [
            "optim.lr=1e-3",
            "train.use_gpu=false",
            "image.mean=[0, 0, 0]",
            "model.name=concat",
            "model.dropout=0.2",
            "train.steps=7",
            "train.steps=9",
        ],
    )
    assert config["optim"]["lr"] == pytest.approx(1e-3)
    assert config["train"]["use_gpu"] is False
    assert config["image"]["mean"] == [0, 0, 0]
    assert config["model"] == {**DEFAULTS["model"], "name": "concat", "dropout": 0.2}
    assert config["train"]["steps"] == 9  # the last override wins


def test_demo_settings_apply_under_overrides(tmp_path):
    path = write(
        tmp_path / "c.yaml",
        {"demo_settings": {"train": {"steps": 5, "workers": 2}, "image": {"size": 32}}},
    )
    assert load_config(path)["train"]["steps"] == DEFAULTS["train"]["steps"]
    config = load_config(path, ["demo=true", "train.workers=1"])
    assert config["train"]["steps"] == 5 and config["image"]["size"] == 32
    assert config["train"]["workers"] == 1  # an explicit override beats the demo setting


@pytest.mark.parametrize(
    "override, message",
    [
        ("optim.lrr=0.1", "did you mean 'lr'"),
        ("trian.steps=3", "'trian' is not a section"),
        ("optim.name=rmsprop", "optim.name 'rmsprop'"),
        ("train.steps=0", "train.steps must be a positive int"),
        ("image.size=16", "image.size must be an int >= 32"),
        ("train.use_gpu=maybe", "train.use_gpu must be auto"),
        ("train.time_limit_s=0", "train.time_limit_s must be a positive number"),
        ("train.time_limit_s=soon", "train.time_limit_s must be a positive number"),
        ("train.triplets_per_group=0", "train.triplets_per_group must be an int >= 1"),
        ("optim.decay_steps=soon", "optim.decay_steps"),
        ("lr", "not of the form key.sub=value"),
    ],
)
def test_bad_overrides_name_the_key(tmp_path, override, message):
    path = write(tmp_path / "c.yaml", {})
    with pytest.raises(ConfigError, match=message):
        load_config(path, [override])


def test_unknown_key_in_file_is_an_error(tmp_path):
    path = write(tmp_path / "c.yaml", {"train": {"stepz": 3}})
    with pytest.raises(
        ConfigError, match=r"unknown config key 'train.stepz'; did you mean 'steps'"
    ):
        load_config(path)


def test_missing_base_and_cycles_are_errors(tmp_path):
    path = write(tmp_path / "a.yaml", {"base": "nowhere.yaml"})
    with pytest.raises(ConfigError, match="nowhere.yaml not found"):
        load_config(path)
    write(tmp_path / "x.yaml", {"base": "y.yaml"})
    write(tmp_path / "y.yaml", {"base": "x.yaml"})
    with pytest.raises(ConfigError, match="inheritance cycle"):
        load_config(tmp_path / "x.yaml")


def test_resolve_run_paths_defaults_and_round_trip(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = resolve_run_paths(load_config(None, ["data=shards", "name=exp"]))
    assert config["out"] == str(tmp_path / "runs" / "exp")
    assert config["train"]["storage_path"] == str(tmp_path / "runs" / "exp" / "ray")
    assert config["train"]["run_name"] == "exp"
    assert config["data"] == str(tmp_path / "shards")
    assert yaml.safe_load(dump_config(config)) == config
    uri = resolve_run_paths(load_config(None, ["data=x", "train.storage_path=s3://b/runs"]))
    assert uri["train"]["storage_path"] == "s3://b/runs"
    with pytest.raises(ConfigError, match="no dataset"):
        resolve_run_paths(load_config(None))


@pytest.mark.parametrize("path", sorted(CONFIG_DIR.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_load(path):
    config = load_config(path)
    assert config["model"]["name"] and config["loss"]["name"]
    load_config(path, ["demo=true"])


@pytest.mark.parametrize("path", sorted(CONFIG_DIR.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_build_their_model(path):
    from pipeline.models import size_kwarg
    from pipeline.optimization import build_model
    from pipeline.vocab import Vocabulary

    name = load_config(path)["model"]["name"]
    config = load_config(
        path,
        [
            f"model.{size_kwarg(name)}=16",
            "model.image_backbone=resnet18",
            "model.pretrained_path=null",
        ],
    )
    model = build_model(config, Vocabulary(["red", "blue"]))
    assert model.model_name == config["model"]["name"]


def test_every_registered_model_has_a_css_config():
    from pipeline.models import list_models

    missing = [m for m in list_models() if not (CONFIG_DIR / f"css_{m}.yaml").is_file()]
    assert not missing, f"add configs/css_<model>.yaml for {missing}"

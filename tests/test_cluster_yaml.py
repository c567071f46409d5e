"""cluster.yaml is a valid Ray cluster launcher config for a GPU cluster."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
import ray.autoscaler
import yaml

ROOT = Path(__file__).resolve().parent.parent
SCHEMA = Path(ray.autoscaler.__file__).parent / "ray-schema.json"


@pytest.fixture(scope="module")
def cluster() -> dict:
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


def test_matches_ray_autoscaler_schema(cluster):
    jsonschema.validate(cluster, json.loads(SCHEMA.read_text()))


def test_passes_ray_validate_config_after_defaults(cluster):
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(cluster)  # merges the AWS provider defaults, offline
    validate_config(prepared)
    assert prepared["head_node_type"] in prepared["available_node_types"]


def test_head_does_not_train_and_workers_have_gpus(cluster):
    types = cluster["available_node_types"]
    head = types[cluster["head_node_type"]]
    assert head["resources"].get("CPU") == 0 and head["resources"].get("GPU", 0) == 0
    assert any("--num-cpus=0" in cmd for cmd in cluster["head_start_ray_commands"])
    workers = [t for name, t in types.items() if name != cluster["head_node_type"]]
    assert workers and all(t["resources"].get("GPU", 0) >= 1 for t in workers)


def test_image_pins_ray_and_python_of_the_project(cluster):
    image = cluster["docker"]["image"]
    assert image.startswith(f"rayproject/ray:{ray.__version__}-py311-")
    assert image.endswith(("-gpu", "-cu121", "-cu124", "-cu128"))
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert f"ray[default,serve,train,tune]=={'.'.join(ray.__version__.split('.')[:2])}" in pyproject
    assert any("pip install" in c and "composed-retrieval" in c for c in cluster["setup_commands"])


def test_data_and_outputs_are_not_uploaded():
    ignored = (ROOT / ".rayignore").read_text().split()
    for path in ("data/", "runs/", "artifacts/", ".venv/"):
        assert path in ignored

"""The Ray Serve deployment (``serve.deployment``) on a local 2-CPU Ray cluster (its own
temp dir and HTTP port, shut down after): two query-network replicas and a 3-shard
gallery answer exactly what the standalone app answers, bad inputs get the same 4xx,
and a killed replica is replaced while requests keep being answered."""

from __future__ import annotations

import io
import shutil
import socket
import tempfile
import time

import httpx
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from serve_fixtures import limit_threads, serving_artifacts

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve", reason="the deployment needs ray[serve]")
pytestmark = pytest.mark.slow

SETTINGS = {
    "backend": "torch",
    "query_replicas": 2,
    "query_cpus": 0.2,
    "searcher_cpus": 0.1,
    "ingress_cpus": 0.1,
    "limits": {"max_image_bytes": 64 * 1024},
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    """(the serving test artifacts, a copy of them split into 3 gallery shards)"""
    from export.index import main as index_main

    limit_threads()
    source = serving_artifacts(tmp_path_factory.getbasetemp())[0]
    sharded = tmp_path_factory.mktemp("deploy") / "artifacts"
    shutil.copytree(source, sharded)
    assert index_main(["--artifacts", str(sharded), "--shards", "3"]) == 0
    return source, sharded


@pytest.fixture(scope="module")
def deployed(artifacts):
    from serve.deployment import build_app

    temp = tempfile.mkdtemp(prefix="rayserve", dir="/tmp")  # short: unix socket paths
    ray.init(num_cpus=2, include_dashboard=False, _temp_dir=temp, log_to_driver=False)
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app({"artifacts": str(artifacts[1]), **SETTINGS}), name="default")
        yield f"http://127.0.0.1:{port}"
        serve.shutdown()
    finally:  # a failed start (e.g. the proxy timing out on a loaded machine) still
        ray.shutdown()  # ends this cluster, so the Ray tests after it can start theirs
        shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(scope="module")
def standalone(artifacts):
    from serve.app import ServiceLimits, create_app
    from serve.engine import QueryEngine

    engine = QueryEngine(artifacts[0], backend="torch", device="cpu")
    with TestClient(create_app(engine, ServiceLimits(**SETTINGS["limits"]))) as client:
        yield engine, client
    engine.close()


def png(colour=(200, 30, 30)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (40, 30), colour).save(out, format="PNG")
    return out.getvalue()


def test_replicas_and_shards_answer_as_the_standalone_app(deployed, standalone):
    engine, client = standalone
    requests = [
        {"data": {"ref_id": engine.index.ids[i], "text": text, "k": "7"}}
        for i, text in [(0, "make it red"), (5, "add a circle"), (13, "x"), (39, "make it red")]
    ] + [
        {
            "data": {"text": "make it red", "k": "5"},
            "files": {"image": ("r.png", png(), "image/png")},
        }
    ]
    for request in requests:
        want = client.post("/search", **request).json()["results"]
        got = httpx.post(f"{deployed}/search", timeout=60, **request)
        assert got.status_code == 200, got.text
        results = got.json()["results"]
        assert [r["id"] for r in results] == [r["id"] for r in want]
        assert [r["score"] for r in results] == [r["score"] for r in want]  # exactly
    health = httpx.get(f"{deployed}/healthz", timeout=30).json()
    assert health["status"] == "ok" and health["search_layout"] == "remote"


def test_bad_inputs_get_the_standalone_4xx(deployed, standalone):
    engine, client = standalone
    bad = [
        {"data": {"ref_id": "missing", "text": "red"}},
        {"data": {"ref_id": engine.index.ids[0], "text": " "}},
        {"data": {"ref_id": engine.index.ids[0], "text": "red", "k": "0"}},
        {"data": {"text": "red"}, "files": {"image": ("x.png", b"not an image", "image/png")}},
        {"data": {"text": "red"}, "files": {"image": ("x.png", bytes(70 * 1024), "image/png")}},
        {"json": {"ref_id": engine.index.ids[0], "text": "red"}},
    ]
    for request in bad:
        want = client.post("/search", **request)
        got = httpx.post(f"{deployed}/search", timeout=60, **request)
        assert 400 <= want.status_code < 500
        assert (got.status_code, got.json()["error"]) == (want.status_code, want.json()["error"])


def query_replicas() -> set[str]:
    return {
        a["name"]
        for a in ray.util.list_named_actors(all_namespaces=True)
        if "QueryNetwork" in a["name"]
    }


def test_a_killed_query_replica_is_replaced_while_requests_are_answered(deployed, standalone):
    engine, _ = standalone
    before = query_replicas()
    assert len(before) == 2
    victim = sorted(before)[0]
    ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
    answered = 0
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        for _attempt in range(3):  # a request routed to the dead replica is retried
            response = httpx.post(
                f"{deployed}/search",
                data={"ref_id": engine.index.ids[answered % 40], "text": "red", "k": "3"},
                timeout=60,
            )
            if response.status_code == 200:
                answered += 1
                break
            time.sleep(0.5)
        else:
            pytest.fail(f"no answer after 3 tries: {response.status_code} {response.text}")
        now = query_replicas()
        if answered >= 10 and len(now) == 2 and victim not in now:
            break
        time.sleep(0.2)
    assert answered >= 10
    after = query_replicas()
    assert len(after) == 2 and victim not in after  # Serve started a new replica


def test_serve_config_is_a_valid_serve_deploy_file():
    """``serve_config.yaml`` passes Ray Serve's own schema and its args are settings."""
    from pathlib import Path

    import yaml
    from ray.serve.schema import ServeDeploySchema

    from serve.deployment import DeploymentSettings

    config = yaml.safe_load((Path(__file__).resolve().parents[1] / "serve_config.yaml").read_text())
    schema = (
        ServeDeploySchema.model_validate(config)
        if hasattr(ServeDeploySchema, "model_validate")
        else ServeDeploySchema.parse_obj(config)
    )
    app = schema.applications[0]
    assert app.import_path == "serve.deployment:build_app"
    settings = DeploymentSettings.from_args(app.args)
    assert (
        settings.query_autoscaling["max_replicas"] == 8
        and settings.limits["max_pending_uploads"] == 16
    )
    with pytest.raises(ValueError, match="unknown deployment settings"):
        DeploymentSettings.from_args({**app.args, "replicas": 3})
    with pytest.raises(ValueError, match="max_pending_uploads"):
        DeploymentSettings.from_args({**app.args, "limits": {"max_pending_uploads": 0}})
    assert settings.precision == "fp16"  # the engines the config's comment names
    with pytest.raises(ValueError, match="precision int8 is not one of backend tensorrt's"):
        DeploymentSettings.from_args({**app.args, "precision": "int8"})

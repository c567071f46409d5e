"""The design card's entry point for real: ``ray job submit --working-dir . -- python
pipeline/train.py ...`` against a local cluster with its job server (its own temp dir
and dashboard port, so it collides with no other Ray on the machine). The repository
is the job's working_dir (uploaded through ``.rayignore``); a short CSS run with one
Ray Train worker must end SUCCEEDED and leave its ``metrics.json``."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from shard_fixtures import write_dataset

ray = pytest.importorskip("ray")
pytest.importorskip("ray.dashboard", reason="ray job submit needs ray[default]")
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
TINY = [
    "model.embed_dim=32",
    "image.size=32",
    "train.batch_size=8",
    "train.batches_per_epoch=3",
    "train.threads=1",
    "train.loader_workers=0",
    "train.channels_last=false",
    "train.amp=false",
    "train.use_gpu=false",
    "train.log_every=2",
    "train.checkpoint_every=4",
    "train.cpus_per_worker=0.9",
    "optim.name=adam",
    "eval.batch_size=16",
]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def job_server():
    os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "300")
    temp = tempfile.mkdtemp(prefix="rayjob", dir="/tmp")  # short: unix socket paths
    port = free_port()
    ray.init(
        num_cpus=2,
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        dashboard_port=port,
        _temp_dir=temp,
        log_to_driver=False,
    )
    address = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # the dashboard's job server starts after init
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                break
        except OSError:
            time.sleep(0.5)
    yield address
    ray.shutdown()
    shutil.rmtree(temp, ignore_errors=True)


def test_ray_job_submit_runs_pipeline_train(job_server, tmp_path):
    data = write_dataset(tmp_path / "shards", explicit_groups=6)
    out = tmp_path / "run"
    sets = [arg for item in TINY for arg in ("--set", item)]
    command = [
        sys.executable,
        "-m",
        "ray.scripts.scripts",
        "job",
        "submit",
        "--address",
        job_server,
        "--working-dir",
        str(ROOT),
        "--",
        sys.executable,  # the job runs with this environment's Python and packages
        "pipeline/train.py",
        "--config",
        "configs/css_tirg.yaml",
        "--data",
        str(data),
        "--out",
        str(out),
        "--steps",
        "4",
        "--workers",
        "1",
        *sets,
        "--set",
        f"train.storage_path={tmp_path / 'storage'}",
    ]
    env = {**os.environ, "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "token")}
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    log = re.sub(r"\x1b\[[0-9;]*m", "", result.stdout + result.stderr)
    assert result.returncode == 0, log[-4000:]
    job_id = re.search(r"raysubmit_\w+", log).group(0)
    from ray.job_submission import JobStatus, JobSubmissionClient

    assert JobSubmissionClient(job_server).get_job_status(job_id) == JobStatus.SUCCEEDED
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["step"] == 4 and "R@1" in metrics
    assert (out / "checkpoint" / "checkpoint.pt").is_file()

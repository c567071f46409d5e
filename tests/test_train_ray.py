"""The training loop under Ray Train (V2): 2-worker DDP that survives a worker killed
mid-epoch, resuming by rerunning the same run, parity with the in-process loop. One
local Ray cluster (2 CPUs) serves the whole module; workers take 0.9 CPU each so two fit."""

from __future__ import annotations

import json
import os
import shutil
import tempfile

import pytest
import torch
from shard_fixtures import write_dataset
from train_fixtures import tiny_config

from pipeline.checkpoint import load_checkpoint
from pipeline.distributed import LocalContext
from pipeline.launch import fit_with_ray, run
from pipeline.loop import train_loop
from pipeline.shard_groups import build_vocabulary

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.slow  # a local Ray cluster and three TorchTrainer runs


@pytest.fixture(scope="module")
def ray_cluster():
    # a loaded 2-core machine can take more than the default 60 s to start two workers
    os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "300")
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: unix socket paths
    ray.init(num_cpus=2, include_dashboard=False, _temp_dir=temp, log_to_driver=False)
    yield
    ray.shutdown()
    shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("shards") / "tiny", explicit_groups=8)


def reported(result) -> list[dict]:
    """Metrics of every kept checkpoint, in step order."""
    return sorted((metrics for _, metrics in result.best_checkpoints), key=lambda m: m["step"])


def test_two_workers_survive_a_killed_worker_evaluate_and_resume(ray_cluster, dataset, tmp_path):
    # One 2-worker DDP run (worker group starts dominate the cost, so one run checks
    # three things). Rank 1 dies (os._exit) after step 7, inside the second 5-batch
    # epoch; the last checkpoint is step 6, so both workers restart there, skip one batch
    # of epoch 1 and finish all 10 steps; rank 0 then evaluates.
    out = tmp_path / "run"
    config = tiny_config(
        dataset,
        out,
        "train.workers=2",
        "train.steps=10",
        "train.max_failures=1",
        "fault_injection={step: 7, rank: 1}",
    )
    metrics = run(config)
    assert (out / "fault-injected-rank1-step7").is_file()
    assert metrics["step"] == 10 and {"R@1", "R@5", "R@10"} <= set(metrics)
    assert json.loads((out / "metrics.json").read_text())["R@1"] == metrics["R@1"]
    assert load_checkpoint(out / "checkpoint")["step"] == 10
    storage = out / "ray" / config["train"]["run_name"]
    kept = sorted(storage.glob("checkpoint_0*"))
    assert [load_checkpoint(d)["step"] for d in kept] == [2, 4, 6, 8, 10]
    losses = [load_checkpoint(d)["metrics"]["loss"] for d in kept]
    assert losses[-1] < losses[0]  # mean loss over both ranks falls

    # the same run name + storage path again, with more steps: restores step 10, ends at 12
    longer = tiny_config(dataset, out, "train.workers=2", "train.steps=12", "eval.at_end=false")
    result = fit_with_ray(longer, build_vocabulary(dataset).to_dict())
    assert [m["step"] for m in reported(result)] == [2, 4, 6, 8, 10, 12]
    assert load_checkpoint(result.checkpoint.path)["step"] == 12


def test_one_ray_worker_matches_the_in_process_loop(ray_cluster, dataset, tmp_path):
    vocab = build_vocabulary(dataset).to_dict()
    local = tiny_config(
        dataset, tmp_path / "local", "train.steps=4", "eval.at_end=false", "train.seed=5"
    )
    context = LocalContext(
        local["train"]["storage_path"], local["train"]["run_name"], use_gpu=False
    )
    local_metrics = train_loop(local, context=context, vocab=vocab)
    remote = tiny_config(
        dataset,
        tmp_path / "ray",
        "train.steps=4",
        "eval.at_end=false",
        "train.seed=5",
        "train.workers=1",
    )
    result = fit_with_ray(remote, vocab)
    assert result.metrics["loss"] == pytest.approx(local_metrics["loss"], rel=1e-4)
    ours = load_checkpoint(context.checkpoints()[-1])["model"]
    theirs = load_checkpoint(result.checkpoint.path)["model"]
    assert ours.keys() == theirs.keys()
    for key in ours:
        torch.testing.assert_close(ours[key], theirs[key], rtol=1e-4, atol=1e-5, msg=key)

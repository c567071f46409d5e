"""The training loop under Ray Train (V2): 2-worker DDP, parity with the in-process loop,
a worker killed mid-epoch, and resuming by rerunning the same run. One local Ray cluster
(2 CPUs) serves the whole module; workers take 0.9 CPU each so two fit."""

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
from pipeline.data import build_vocabulary
from pipeline.distributed import LocalContext
from pipeline.loop import train_loop
from pipeline.train import fit_with_ray, run

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.slow  # a local Ray cluster and five TorchTrainer runs


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


def test_two_workers_train_evaluate_and_rerun_resumes(ray_cluster, dataset, tmp_path):
    config = tiny_config(dataset, tmp_path / "run", "train.workers=2")
    metrics = run(config)
    assert metrics["step"] == 8 and {"R@1", "R@5", "R@10"} <= set(metrics)
    out = tmp_path / "run"
    assert json.loads((out / "metrics.json").read_text())["R@1"] == metrics["R@1"]
    assert load_checkpoint(out / "checkpoint")["step"] == 8
    storage = out / "ray" / config["train"]["run_name"]
    losses = [load_checkpoint(d)["metrics"]["loss"] for d in sorted(storage.glob("checkpoint_0*"))]
    assert len(losses) == 4 and losses[-1] < losses[0]  # steps 2, 4, 6, 8

    # the same run name + storage path again, with more steps: restores step 8, ends at 10
    longer = tiny_config(dataset, out, "train.workers=2", "train.steps=10", "eval.at_end=false")
    result = fit_with_ray(longer, build_vocabulary(dataset).to_dict())
    steps = [m["step"] for m in reported(result)]
    assert steps == [2, 4, 6, 8, 10]
    assert load_checkpoint(storage / "checkpoint_00000010")["step"] == 10


def test_worker_killed_mid_epoch_finishes_all_steps(ray_cluster, dataset, tmp_path):
    # rank 1 dies (os._exit) after step 7, inside the second 5-batch epoch; the last
    # checkpoint is step 6, so both workers restart there and skip one batch of epoch 1
    config = tiny_config(
        dataset,
        tmp_path / "run",
        "train.workers=2",
        "train.steps=10",
        "train.max_failures=1",
        "eval.at_end=false",
        "fault_injection={step: 7, rank: 1}",
    )
    result = fit_with_ray(config, build_vocabulary(dataset).to_dict())
    assert (tmp_path / "run" / "fault-injected-rank1-step7").is_file()
    assert result.metrics["step"] == 10
    assert [m["step"] for m in reported(result)] == [2, 4, 6, 8, 10]
    assert load_checkpoint(result.checkpoint.path)["step"] == 10


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

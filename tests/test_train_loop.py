"""The training loop in one process (no Ray): schedule, optimiser groups, checkpoints,
resume, and the ``pipeline/train.py --workers 0`` entry point end to end."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from shard_fixtures import write_dataset
from train_fixtures import ROOT, tiny_config

from pipeline.checkpoint import load_checkpoint, load_model
from pipeline.distributed import LocalContext
from pipeline.loop import train_loop
from pipeline.models import create_model
from pipeline.optimization import build_optimizer, lr_factor
from pipeline.run_control import TimeLimit


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("shards") / "tiny", explicit_groups=8)


def test_lr_factor_step_exponential_warmup():
    optim = {"schedule": "step", "gamma": 0.1, "warmup_steps": 0}
    assert [lr_factor(s, optim, 10) for s in (0, 9, 10, 25)] == pytest.approx([1, 1, 0.1, 0.01])
    optim = {"schedule": "exponential", "gamma": 0.5, "warmup_steps": 0}
    assert lr_factor(5, optim, 10) == pytest.approx(0.5**0.5)
    optim = {"schedule": "constant", "gamma": 0.5, "warmup_steps": 4}
    assert [lr_factor(s, optim, 10) for s in (0, 1, 3, 100)] == pytest.approx([0.25, 0.5, 1, 1])


def test_backbone_gets_its_lr_multiplier():
    model = create_model("tirg", vocab_size=20, embed_dim=16)
    optim = {
        "name": "sgd",
        "lr": 0.01,
        "momentum": 0.9,
        "weight_decay": 1e-6,
        "backbone_lr_mult": 0.1,
        "betas": [0.9, 0.999],
    }
    optimizer = build_optimizer(model, optim)
    rest, trunk = optimizer.param_groups
    assert rest["lr"] == pytest.approx(0.01) and trunk["lr"] == pytest.approx(0.001)
    trunk_ids = {id(p) for p in trunk["params"]}
    for name, param in model.named_parameters():
        assert (id(param) in trunk_ids) == (".backbone." in f".{name}"), name
    assert len(trunk["params"]) + len(rest["params"]) == len(list(model.parameters()))


def test_loss_falls_and_checkpoints_are_kept(dataset, tmp_path):
    config = tiny_config(
        dataset, tmp_path / "run", "train.steps=10", "train.num_to_keep=2", "eval.at_end=false"
    )
    context = LocalContext(
        config["train"]["storage_path"], config["train"]["run_name"], use_gpu=False, num_to_keep=2
    )
    metrics = train_loop(config, context=context)
    steps = [r["step"] for r in context.reports]
    assert steps == [2, 4, 6, 8, 10] and metrics["step"] == 10
    assert context.reports[-1]["loss"] < context.reports[0]["loss"]
    kept = [p.name for p in context.checkpoints()]
    assert kept == ["checkpoint_00000008", "checkpoint_00000010"]
    payload = load_checkpoint(context.checkpoints()[-1])
    assert payload["step"] == 10 and payload["optimizer"] and payload["scheduler"]
    assert payload["config"]["train"]["steps"] == 10


def test_resume_continues_the_step_count(dataset, tmp_path):
    first = tiny_config(dataset, tmp_path / "run", "train.steps=4", "eval.at_end=false")
    train_loop(first)
    again = tiny_config(dataset, tmp_path / "run", "train.steps=7", "eval.at_end=false")
    context = LocalContext(
        again["train"]["storage_path"], again["train"]["run_name"], use_gpu=False
    )
    train_loop(again, context=context)
    # restored at 4, not from scratch: only steps 5..7 were trained and reported
    assert [r["step"] for r in context.reports] == [6, 7]
    assert load_checkpoint(context.checkpoints()[-1])["step"] == 7
    # the same command after the run finished does nothing and keeps the metrics
    finished = LocalContext(
        again["train"]["storage_path"], again["train"]["run_name"], use_gpu=False
    )
    assert train_loop(again, context=finished)["step"] == 7 and finished.reports == []


def test_train_script_in_process_writes_run_dir(dataset, tmp_path):
    out = tmp_path / "run"
    command = [
        sys.executable,
        str(ROOT / "pipeline" / "train.py"),
        "--config",
        str(ROOT / "configs" / "css_concat.yaml"),
        "--data",
        str(dataset),
        "--out",
        str(out),
        "--workers",
        "0",
        "--steps",
        "4",
        "--batch-size",
        "8",
        "--seed",
        "3",
        "--set",
        "model.embed_dim=32",
        "--set",
        "image.size=32",
        "--set",
        "train.threads=1",
        "--set",
        "train.loader_workers=0",
        "--set",
        "train.batches_per_epoch=3",
        "--set",
        "train.use_gpu=false",
        "--set",
        "train.channels_last=false",
        "--set",
        "eval.batch_size=16",
    ]
    # ``-X importtime``-free check that Ray stays out of the in-process path
    env_check = (
        "import sys; sys.argv = sys.argv[1:]; sys.path.insert(0, 'pipeline'); "
        "import runpy; runpy.run_path(sys.argv[0], run_name='__main__'); "
        "assert 'ray' not in sys.modules, 'ray was imported'"
    )
    done = subprocess.run(
        [sys.executable, "-c", env_check, *command[1:]],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "R@1" in done.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["step"] == 4 and {"R@1", "R@5", "R@10"} <= set(metrics)
    model, vocab, payload = load_model(out / "checkpoint")
    assert payload["model_name"] == "concat" and payload["step"] == 4
    assert payload["config"]["train"]["seed"] == 3 and len(vocab) > 2
    assert (out / "config.yaml").is_file() and any((out / "tb").iterdir())
    assert not torch.isnan(next(model.parameters())).any()


def test_time_limit_ends_the_run_evaluated_and_checkpointed(dataset, tmp_path):
    """train.time_limit_s spent after the first step: the run ends there as if
    train.steps were 1 (evaluation, checkpoint, metrics["step"] = 1)."""
    config = tiny_config(dataset, tmp_path / "run", "train.steps=1000", "train.time_limit_s=1e-6")
    context = LocalContext(
        config["train"]["storage_path"], config["train"]["run_name"], use_gpu=False
    )
    metrics = train_loop(config, context=context)
    assert metrics["step"] == 1 and "R@1" in metrics
    assert [r["step"] for r in context.reports] == [1]
    assert load_checkpoint(context.checkpoints()[-1])["step"] == 1


class RanksContext:
    """Just what TimeLimit reads of a run context: the world size and the collective."""

    def __init__(self, world_size: int, others_out_of_time: bool):
        self.world_size, self.others = world_size, others_out_of_time
        self.collectives = []

    def mean_over_ranks(self, value: float) -> float:
        self.collectives.append(value)
        return (value + self.others * (self.world_size - 1)) / self.world_size


def test_time_limit_ranks_agree_only_at_sync_steps():
    """With several ranks, one rank out of time stops them all, and only at the steps
    where every rank joins the collective (never a rank alone in an all-reduce)."""
    context = RanksContext(world_size=2, others_out_of_time=True)
    limit = TimeLimit(3600, context, sync_every=20)
    assert [limit.spent(step) for step in (1, 19)] == [False, False]
    assert context.collectives == []  # no collective between sync steps
    assert limit.spent(20) is True and context.collectives == [0.0]
    alone = TimeLimit(3600, RanksContext(world_size=2, others_out_of_time=False))
    assert alone.spent(40) is False
    assert TimeLimit(None, context).spent(20) is False


def test_nan_loss_stops_the_run_with_the_step(dataset, tmp_path):
    """The loss is read back only every log_every steps; a NaN still stops the run."""
    config = tiny_config(dataset, tmp_path / "run", "train.steps=6", "train.log_every=3")

    def nan_batches(epoch, skip=0):
        for _ in range(5):
            images = torch.full((4, 3, 32, 32), float("nan"))
            yield {
                "ref_images": images,
                "target_images": images.clone(),
                "tokens": torch.ones(4, 3, dtype=torch.long),
                "lengths": torch.full((4,), 3),
            }

    with pytest.raises(FloatingPointError, match="up to step 3 on rank 0"):
        train_loop(config, batch_source=nan_batches)

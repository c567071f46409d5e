"""Run the training loop: in this process, or under Ray Train (``TorchTrainer``, DDP).

The library behind the entry points: ``pipeline/train.py`` (the script that
``ray job submit ... -- python pipeline/train.py`` runs) parses flags and calls ``run``;
``tune`` launches a trial's ``TorchTrainer`` with ``run_with_ray``; ``bench.reproduce``
calls ``run`` per model and seed. With ``train.workers >= 1`` ``ray.init()`` joins a
running cluster (``RAY_ADDRESS``, as ``ray job submit`` sets it) or starts a local one;
``train.workers == 0`` runs the loop here without importing Ray.

A finished run leaves in ``RUN_DIR`` (``out``): ``config.yaml`` (resolved config),
``metrics.json`` (the protocol's recalls, ``R@1`` ...), ``checkpoint/`` (final
checkpoint, ``pipeline.checkpoint`` format) and ``tb/`` (TensorBoard scalars).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from pipeline.config import dump_config

log = logging.getLogger(__name__)


def use_gpu(config: dict[str, Any]) -> bool:
    """``train.use_gpu: auto`` asks for GPUs when the Ray cluster has any."""
    setting = config["train"]["use_gpu"]
    if setting != "auto":
        return bool(setting)
    import ray

    return ray.cluster_resources().get("GPU", 0) > 0


def configure_logging() -> None:
    """Progress lines of ``pipeline.*`` (step, loss, samples/s, lr) at INFO on stderr."""
    logger = logging.getLogger("pipeline")
    logger.setLevel(logging.INFO)
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s"))
        logger.addHandler(handler)
        logger.propagate = False


def ray_worker(loop_config: dict[str, Any]) -> None:
    """Body of each Ray Train worker: the one training loop with a Ray context."""
    from pipeline.distributed import RayContext
    from pipeline.loop import train_loop

    configure_logging()
    train_loop(loop_config["config"], context=RayContext(), vocab=loop_config["vocab"])


def fit_with_ray(config: dict[str, Any], vocab_dict: dict, *, callbacks: list | None = None):
    """``TorchTrainer(...).fit()`` over ``train.workers`` workers; returns Ray's ``Result``.

    ``callbacks``: Ray Train ``RunConfig`` callbacks (a Tune trial passes
    ``TuneReportCallback()`` so rank 0's reports reach Tune)."""
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    if not ray.is_initialized():
        ray.init()  # joins RAY_ADDRESS / a running cluster, else starts a local one
    train = config["train"]
    gpu = use_gpu(config)
    resources = {"CPU": float(train["cpus_per_worker"])}
    if gpu:
        resources["GPU"] = float(train["gpus_per_worker"])
    trainer = TorchTrainer(
        ray_worker,
        train_loop_config={"config": config, "vocab": vocab_dict},
        scaling_config=ScalingConfig(
            num_workers=train["workers"], use_gpu=gpu, resources_per_worker=resources
        ),
        run_config=RunConfig(
            name=train["run_name"],
            storage_path=train["storage_path"],
            checkpoint_config=CheckpointConfig(num_to_keep=train["num_to_keep"]),
            failure_config=FailureConfig(max_failures=train["max_failures"]),
            callbacks=callbacks,
        ),
    )
    return trainer.fit()


def run_with_ray(
    config: dict[str, Any], vocab_dict: dict, *, callbacks: list | None = None
) -> tuple[dict[str, Any], Path]:
    """Train under Ray; returns (final metrics, ``RUN_DIR/checkpoint`` copied from storage)."""
    result = fit_with_ray(config, vocab_dict, callbacks=callbacks)
    if result.checkpoint is None:
        raise RuntimeError(f"run {config['train']['run_name']!r} finished without a checkpoint")
    final = Path(config["out"]) / "checkpoint"
    shutil.rmtree(final, ignore_errors=True)
    result.checkpoint.to_directory(str(final))
    return dict(result.metrics or {}), final


def run_in_process(config: dict[str, Any], vocab_dict: dict) -> tuple[dict[str, Any], Path]:
    """The loop in this process (``--workers 0``); Ray is not imported."""
    from pipeline.loop import local_context, train_loop

    context = local_context(config)
    metrics = train_loop(config, context=context, vocab=vocab_dict)
    with context.latest_checkpoint() as latest:
        if latest is None:
            raise RuntimeError(f"run {config['train']['run_name']!r} left no checkpoint")
        final = Path(config["out"]) / "checkpoint"
        shutil.rmtree(final, ignore_errors=True)
        shutil.copytree(latest, final)
    return metrics, final


def recall_table(metrics: dict[str, Any]) -> str:
    """Two-line table of every ``R@K``-style metric (``pipeline.evaluate`` gives percents)."""
    keys = [k for k in metrics if "@" in k and isinstance(metrics[k], (int, float))]
    header = "  ".join(f"{k:>9}" for k in keys)
    values = "  ".join(f"{float(metrics[k]):>8.2f}%" for k in keys)
    return f"{header}\n{values}"


def run(config: dict[str, Any]) -> dict[str, Any]:
    """Train (Ray or in-process), then write config.yaml, metrics.json and checkpoint/."""
    from pipeline.shard_groups import build_vocabulary

    out = Path(config["out"])
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(dump_config(config))
    vocab_dict = build_vocabulary(config["data"]).to_dict()
    if config["train"]["workers"] == 0:
        metrics, _ = run_in_process(config, vocab_dict)
    else:
        metrics, _ = run_with_ray(config, vocab_dict)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1, sort_keys=True))
    return metrics

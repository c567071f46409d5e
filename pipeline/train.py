"""Train a composed-retrieval model: ``python pipeline/train.py --config configs/<name>.yaml``.

With ``train.workers >= 1`` the loop runs under Ray Train (``TorchTrainer``, DDP over
gloo on CPU / nccl on GPU); ``ray.init()`` joins a running cluster or starts a local
one, so the same command works through ``ray job submit``. ``--workers 0`` runs the
same loop in this process without importing Ray. Rerunning the same command (same
run name and storage path) resumes from the newest checkpoint.

A finished run leaves in ``RUN_DIR`` (``--out``): ``config.yaml`` (resolved config),
``metrics.json`` (the protocol's recalls, ``R@1`` ...), ``checkpoint/`` (final
checkpoint, ``pipeline.checkpoint`` format) and ``tb/`` (TensorBoard scalars).
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as a script (``python pipeline/train.py``) Python puts pipeline/ on sys.path, not
# the repository root: swap it for the root so ``import pipeline`` finds the package and
# pipeline's modules (data.py, config.py, ...) do not shadow top-level names.
_SCRIPT_DIR, _ROOT = Path(__file__).resolve().parent, Path(__file__).resolve().parent.parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _SCRIPT_DIR]
sys.path.insert(0, str(_ROOT))

import argparse  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
from typing import Any  # noqa: E402

from pipeline.config import ConfigError, dump_config, load_config, resolve_run_paths  # noqa: E402

log = logging.getLogger("pipeline.train")


def add_common_flags(parser: argparse.ArgumentParser) -> None:
    """Flags shared by every entry point that runs the training loop."""
    parser.add_argument("--config", required=True, help="YAML run config (configs/*.yaml)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. optim.lr=0.1",
    )
    parser.add_argument("--data", help="shard dataset directory (sets 'data')")
    parser.add_argument("--model", help="model name from the registry (sets model.name)")
    parser.add_argument("--steps", type=int, help="training steps (sets train.steps)")
    parser.add_argument(
        "--workers",
        type=int,
        help="Ray Train workers; 0 = in-process without Ray (sets train.workers)",
    )
    parser.add_argument("--batch-size", type=int, help="per-worker batch (sets train.batch_size)")
    parser.add_argument("--seed", type=int, help="random seed (sets train.seed)")
    parser.add_argument("--out", help="run directory (sets 'out'; default runs/<name>)")


def config_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """Load the config file, apply ``--set`` and the flag overrides, resolve run paths."""
    flags = {
        "data": args.data,
        "model.name": args.model,
        "train.steps": args.steps,
        "train.workers": args.workers,
        "train.batch_size": args.batch_size,
        "train.seed": args.seed,
        "out": args.out,
    }
    overrides = list(args.overrides)
    overrides += [f"{key}={json.dumps(value)}" for key, value in flags.items() if value is not None]
    return resolve_run_paths(load_config(args.config, overrides))


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
    from pipeline.data import build_vocabulary

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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_flags(parser)
    args = parser.parse_args(argv)
    configure_logging()
    try:
        config = config_from_args(args)
    except ConfigError as err:
        parser.error(str(err))
    metrics = run(config)
    print(
        f"run {config['train']['run_name']}: {config['model']['name']} on {config['data']}, "
        f"{metrics.get('step')} steps -> {config['out']}"
    )
    print(recall_table(metrics))
    return 0


if __name__ == "__main__":
    sys.exit(main())

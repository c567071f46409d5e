"""How a search is set up: the evaluation cadence of short trials, trial resources
and how many trials fit, ASHA and the search algorithm. ``tune.search`` drives them."""

from __future__ import annotations

import argparse
import logging
import math
from typing import Any

from tune.space import ParamSpec

log = logging.getLogger("tune.search")


class SearchSetupError(ValueError):
    """The search cannot run as asked (resources, scheduler settings, missing package)."""


def shorten_cadence(train: dict[str, Any], rungs: int = 3) -> None:
    """When ``train.steps`` is below the config's evaluation (or checkpoint) cadence, as
    after ``--steps 60`` on a config made for 10k-step trials, evaluate ``rungs`` times
    per trial instead (ASHA's default grace period is the cadence, so it follows) and
    checkpoint at the end; log what the cadence became."""
    steps = int(train["steps"])
    eval_every = int(train["eval_every"])
    if eval_every > steps:
        train["eval_every"] = max(1, steps // rungs)
        log.warning(
            "train.steps %d is below train.eval_every %d: trials evaluate every %d steps "
            "instead, and ASHA's default grace period follows (%d)",
            steps,
            eval_every,
            train["eval_every"],
            train["eval_every"],
        )
    if int(train["checkpoint_every"]) > steps:
        log.info(
            "train.checkpoint_every %d > train.steps %d: trials checkpoint at their end",
            train["checkpoint_every"],
            steps,
        )
        train["checkpoint_every"] = steps


def trial_resources(
    train: dict[str, Any], workers: int, gpu: bool, cpus_per_trial: float
) -> tuple[dict[str, float], dict[str, float]]:
    """(what Tune reserves for a trial's process, what the trial needs in all).

    In-process trials train in the trial process: it gets a worker's CPU/GPU. Otherwise
    the trial process only drives a ``TorchTrainer`` whose workers Train reserves."""
    worker = {
        "CPU": float(train["cpus_per_worker"]),
        "GPU": float(train["gpus_per_worker"]) if gpu else 0.0,
    }
    if workers == 0:
        return worker, dict(worker)
    trial = {"CPU": float(cpus_per_trial), "GPU": 0.0}
    return trial, {r: trial[r] + workers * worker[r] for r in trial}


def fitting_trials(cluster: dict[str, float], need: dict[str, float]) -> int:
    """How many trials (with their workers) the cluster holds at once."""
    counts = [
        math.floor(cluster.get(r, 0.0) / amount + 1e-9) for r, amount in need.items() if amount > 0
    ]
    return min(counts) if counts else 0


def concurrency(
    requested: int | None,
    fits: int,
    need: dict[str, float],
    cluster: dict[str, float],
    *,
    joined: bool = False,
) -> int:
    """Trials at once: what fits now, or fewer when ``--max-concurrent`` asks so.

    ``joined`` (a cluster given by ``--address``/``RAY_ADDRESS``): an explicit
    ``--max-concurrent`` above what fits now is kept, since an autoscaling cluster
    (``cluster.yaml``: GPU workers from 0) adds the nodes when the trials ask for them.
    """
    if requested is not None and requested < 1:
        raise SearchSetupError(f"--max-concurrent must be >= 1, got {requested}")
    if joined and requested is not None and requested > fits:
        log.warning(
            "the cluster holds %d trial(s) of %s now (%s); running %d at once, as "
            "--max-concurrent asks, for the autoscaler to add nodes",
            fits,
            need,
            cluster,
            requested,
        )
        return requested
    if fits < 1:
        have = {r: cluster.get(r, 0.0) for r in need}
        raise SearchSetupError(
            f"one trial needs {need} but the cluster has {have}; lower "
            f"train.cpus_per_worker / --cpus-per-trial / --workers, or on an "
            f"autoscaling cluster pass --max-concurrent"
        )
    if requested is not None and requested > fits:
        log.warning(
            "--max-concurrent %d: only %d trial(s) of %s fit in %s; using %d",
            requested,
            fits,
            need,
            cluster,
            fits,
        )
    return min(requested or fits, fits)


def make_scheduler(name: str, config: dict[str, Any], args: argparse.Namespace):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    if name == "fifo":
        return FIFOScheduler()
    eval_every, steps = int(config["train"]["eval_every"]), int(config["train"]["steps"])
    if eval_every <= 0 and args.grace_period is None:
        raise SearchSetupError(
            "ASHA needs evaluations during training: set train.eval_every "
            "> 0 (e.g. --set train.eval_every=500) or use --scheduler fifo"
        )
    max_t = args.max_t or steps
    grace = args.grace_period or eval_every
    if not 0 < grace <= max_t:
        raise SearchSetupError(f"ASHA: grace period {grace} must be in [1, max_t={max_t}]")
    if args.reduction_factor <= 1:
        raise SearchSetupError(f"--reduction-factor must be > 1, got {args.reduction_factor}")
    return ASHAScheduler(
        time_attr="step", max_t=max_t, grace_period=grace, reduction_factor=args.reduction_factor
    )


def make_searcher(
    name: str, metric: str, seed: int, max_concurrent: int, space: dict[str, ParamSpec]
):
    """Random search (Tune's variant generator), or Optuna's TPE when it is installed."""
    if name == "random":  # a SearchAlgorithm, not a Searcher: it limits concurrency itself
        from ray.tune.search import BasicVariantGenerator

        return BasicVariantGenerator(random_state=seed, max_concurrent=max_concurrent)
    grids = [key for key, spec in space.items() if spec.type == "grid"]
    if grids:
        raise SearchSetupError(f"--search optuna does not take grid entries ({grids}); use choice")
    try:
        from ray.tune.search.optuna import OptunaSearch
    except ImportError as err:
        raise SearchSetupError(
            "--search optuna needs the optuna package (pip install optuna)"
        ) from err

    class EvaluatedResultsOptunaSearch(OptunaSearch):
        """Optuna sees only reports that hold the metric (the loop also reports
        checkpoints between evaluations)."""

        def on_trial_result(self, trial_id: str, result: dict) -> None:
            if metric in result:
                super().on_trial_result(trial_id, result)

    return EvaluatedResultsOptunaSearch(seed=seed)

"""Hyper-parameter search over the training loop with Ray Tune.

    python -m tune.search --config configs/css_tirg.yaml --num-samples 8 \
        [--max-concurrent K] [--workers W] [--out DIR] [--set key=value ...] \
        [--scheduler asha|fifo] [--search random|optuna] [--resume]

Each trial applies its sampled values (``tune:`` section of the config, else the
model's default space: ``tune.space``) to the run config and runs the one training
loop (``tune.trial``): as a Ray Train ``TorchTrainer`` with W workers, or with
``--workers 0`` inside the trial's own process. ASHA stops weak trials on
the protocol's recall (default the first K of the evaluation protocol, e.g. ``R@1``,
mode max) at the loop's evaluations (``time_attr`` = ``step``).

Ray: ``--address`` or ``RAY_ADDRESS`` (set by ``ray job submit``) joins that cluster,
otherwise a local Ray instance is started (``connect_ray``). Trials run concurrently
only as far as the cluster's resources hold all of them with their workers
(``ray.cluster_resources()``): Train V2 reserves the workers itself, outside Tune's
view, so an unbounded Tune would start trials whose workers can never be placed.

``DIR`` (``--out``, default ``runs/<name>-tune``) receives ``results.csv``,
``results.md``, ``best.yaml`` (for ``pipeline/train.py --config``), ``search.png``,
``search.yaml`` (the config searched over); ``DIR/tune`` is Tune's experiment (restored
when it exists or with ``--resume``), ``DIR/trials/<id>`` each trial's run directory and
``DIR/train`` the Train runs' checkpoints (``train.storage_path`` if the config sets one).
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
from pathlib import Path
from typing import Any

from pipeline.cli_flags import add_config_flags, add_run_flags, flag_overrides
from pipeline.config import ConfigError, dump_config, load_config, resolve_run_paths
from shards.manifest import ManifestError
from tune.report import markdown_table, trial_table, write_outputs
from tune.search_setup import (  # noqa: F401  (re-exported: the search's setup API)
    SearchSetupError,
    concurrency,
    fitting_trials,
    make_scheduler,
    make_searcher,
    shorten_cadence,
    trial_resources,
)
from tune.space import SPACE_SECTION, ParamSpec, SearchSpaceError, search_space

log = logging.getLogger("tune.search")

EXPERIMENT_NAME = "tune"
SCHEDULERS = ("asha", "fifo")
SEARCHERS = ("random", "optuna")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m tune.search", description=__doc__.splitlines()[0]
    )
    add_config_flags(parser)
    add_run_flags(
        parser,
        help_overrides={
            "steps": "training steps per trial (sets train.steps)",
            "workers": "Ray Train workers per trial; 0 = the loop in the trial's process "
            "(sets train.workers; default 1)",
            "seed": "random seed of every trial (sets train.seed)",
            "out": "search directory (sets 'out'; default runs/<name>-tune)",
        },
    )
    parser.add_argument(
        "--num-samples",
        type=int,
        required=True,
        help="trials to sample (each grid value is run this many times)",
    )
    parser.add_argument(
        "--max-concurrent",
        type=int,
        help="at most K trials at once (default and upper bound: what fits)",
    )
    parser.add_argument("--scheduler", choices=SCHEDULERS, default="asha")
    parser.add_argument(
        "--search", choices=SEARCHERS, default="random", help="optuna needs the optuna package"
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue DIR/tune (also done when it exists), errored trials too",
    )
    parser.add_argument("--metric", help="reported metric to optimise (default R@<first K>)")
    parser.add_argument("--mode", choices=("max", "min"), default="max")
    parser.add_argument(
        "--grace-period",
        type=int,
        help="ASHA: steps before a trial can be stopped (default train.eval_every)",
    )
    parser.add_argument(
        "--reduction-factor",
        type=float,
        default=3.0,
        help="ASHA: keep the top 1/factor at each rung",
    )
    parser.add_argument(
        "--max-t", type=int, help="ASHA: stop every trial at this step (default train.steps)"
    )
    parser.add_argument(
        "--cpus-per-trial",
        type=float,
        default=0.2,
        help="CPU of a trial's driver process when it launches Train workers",
    )
    parser.add_argument("--search-seed", type=int, default=0, help="seed of the search algorithm")
    parser.add_argument(
        "--address",
        help="Ray cluster to join (default RAY_ADDRESS, as set by "
        "ray job submit; without either a local Ray instance is started)",
    )
    parser.add_argument("--num-cpus", type=float, help="CPUs of a local Ray instance")
    return parser.parse_args(argv)


def load_search_config(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, ParamSpec]]:
    """(resolved run config without its ``tune`` section, checked search space)."""
    out = args.out
    args.out = None  # the search directory, not a run's: trials get their own run dirs
    config = load_config(args.config, flag_overrides(args))
    args.out = out
    space = search_space(config)
    config[SPACE_SECTION] = None
    config["out"] = str(Path(args.out or Path("runs") / f"{config['name']}-tune").resolve())
    if not config["train"]["storage_path"]:
        config["train"]["storage_path"] = str(Path(config["out"]) / "train")
    shorten_cadence(config["train"])
    return resolve_run_paths(config), space


def default_metric(config: dict[str, Any]) -> str:
    """The first recall of the evaluation set the loop evaluates (``eval.eval_set``):
    ``R@<first K>``, or ``avg/R@<first K>`` for Fashion-IQ, which reports recalls per
    category and their average (``pipeline.protocols``)."""
    from pipeline.protocols import resolve_protocol
    from shards.manifest import load_manifest

    evals = load_manifest(config["data"])["evals"]
    name = config["eval"]["eval_set"] or next(iter(evals))
    if name not in evals:
        raise SearchSetupError(
            f"eval.eval_set {name!r} is not in the dataset's evals ({', '.join(evals)})"
        )
    protocol = resolve_protocol(evals[name]["protocol"])
    recall = f"R@{protocol['ks'][0]}"
    return f"avg/{recall}" if protocol["name"] == "fashioniq" else recall


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def connect_ray(address: str | None, num_cpus: float | None, *, dashboard: bool) -> bool:
    """Join ``address`` / ``RAY_ADDRESS`` (returns True), else start a local Ray instance
    (False; also when Ray is already initialised in this process).

    A stopped trial's Train workers are released by Train V2's PlacementGroupCleaner,
    which asks the dashboard's state API whether the trial's controller is alive. On a
    cluster it finds the head's dashboard; a local start (``dashboard``) runs one and
    gives every worker its address, since with several Ray instances on one machine the
    cleaner cannot tell which is its own and the workers of stopped trials stay reserved.
    """
    import ray

    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
        return True
    if not dashboard:
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False)
        return False
    port = free_port()
    ray.init(
        address="local",
        num_cpus=num_cpus,
        include_dashboard=True,
        dashboard_port=port,
        runtime_env={"env_vars": {"RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{port}"}},
    )
    return False


def trial_dirname(trial) -> str:
    return trial.trial_id


def build_trainable(config: dict[str, Any], vocab: dict, workers: int, resources: dict[str, float]):
    from ray import tune as ray_tune

    from tune.trial import run_trial

    trainable = ray_tune.with_parameters(
        run_trial,
        base_config=config,
        vocab=vocab,
        out_dir=config["out"],
        train_storage=config["train"]["storage_path"],
        workers=workers,
    )
    return ray_tune.with_resources(trainable, {"cpu": resources["CPU"], "gpu": resources["GPU"]})


def run_search(args: argparse.Namespace) -> dict[str, Any]:
    """Set up and run (or resume) the search; write the outputs. Returns a summary."""
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    # The loop reports checkpoints between evaluations without the metric; Tune's strict
    # check would fail those reports (ASHA ignores them by itself).
    os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
    import ray
    from ray import tune as ray_tune

    from pipeline.launch import use_gpu
    from pipeline.shard_groups import build_vocabulary

    config, space = load_search_config(args)
    metric = args.metric or default_metric(config)
    workers = 1 if args.workers is None else int(args.workers)
    if workers < 0:
        raise SearchSetupError(f"--workers must be >= 0, got {workers}")
    joined = connect_ray(args.address, args.num_cpus, dashboard=workers > 0)
    gpu = use_gpu(config)
    config["train"]["use_gpu"] = gpu
    cluster = {r: float(v) for r, v in ray.cluster_resources().items()}
    resources, need = trial_resources(config["train"], workers, gpu, args.cpus_per_trial)
    fits = fitting_trials(cluster, need)
    max_concurrent = concurrency(args.max_concurrent, fits, need, cluster, joined=joined)
    scheduler = make_scheduler(args.scheduler, config, args)
    searcher = make_searcher(args.search, metric, args.search_seed, max_concurrent, space)

    out = Path(config["out"])
    out.mkdir(parents=True, exist_ok=True)
    (out / "search.yaml").write_text(
        dump_config({**config, SPACE_SECTION: {k: vars_of(s) for k, s in space.items()}})
    )
    vocab = build_vocabulary(config["data"]).to_dict()
    trainable = build_trainable(config, vocab, workers, resources)
    experiment = out / EXPERIMENT_NAME
    log.info(
        "search %s: %d sample(s), %d at once, %s per trial (%s reserved by Tune), metric %s (%s)",
        experiment,
        args.num_samples,
        max_concurrent,
        need,
        resources,
        metric,
        args.mode,
    )
    if args.resume or ray_tune.Tuner.can_restore(str(experiment)):
        log.info("resuming the search in %s", experiment)
        tuner = ray_tune.Tuner.restore(str(experiment), trainable=trainable, resume_errored=True)
    else:
        tuner = ray_tune.Tuner(
            trainable,
            param_space={key: spec.domain() for key, spec in space.items()},
            tune_config=ray_tune.TuneConfig(
                metric=metric,
                mode=args.mode,
                scheduler=scheduler,
                search_alg=searcher,
                num_samples=args.num_samples,
                # the variant generator takes the limit itself (Tune ignores this for it)
                max_concurrent_trials=None if args.search == "random" else max_concurrent,
                trial_dirname_creator=trial_dirname,
                # in-process trials: a finished or stopped trial's process takes the next
                # trial (no new process importing torch). A stopped Train-driving trial's
                # thread stays blocked in TorchTrainer.fit, so its process cannot be reset.
                reuse_actors=workers == 0,
            ),
            run_config=ray_tune.RunConfig(
                name=EXPERIMENT_NAME,
                storage_path=str(out),
                failure_config=ray_tune.FailureConfig(max_failures=0),
                checkpoint_config=ray_tune.CheckpointConfig(
                    num_to_keep=int(config["train"]["num_to_keep"])
                ),
                verbose=1,
            ),
        )
    grid = tuner.fit()
    table = trial_table(
        grid, space, metric=metric, mode=args.mode, max_steps=int(config["train"]["steps"])
    )
    written = write_outputs(table, config, space, metric, out)
    return {
        "table": table,
        "written": written,
        "metric": metric,
        "max_concurrent": max_concurrent,
        "experiment": str(experiment),
    }


def vars_of(spec: ParamSpec) -> dict[str, Any]:
    """A ParamSpec as the ``tune:`` entry that would produce it."""
    if spec.type in ("choice", "grid"):
        return {"type": spec.type, "values": list(spec.values)}
    return {"type": spec.type, "low": spec.low, "high": spec.high}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        summary = run_search(args)
    except (ConfigError, ManifestError, SearchSpaceError, SearchSetupError) as err:
        print(f"tune.search: error: {err}", file=sys.stderr)
        return 2
    print(markdown_table(summary["table"]), end="")
    for kind, path in summary["written"].items():
        print(f"{kind}: {path}")
    if "best" not in summary["written"]:
        print(f"no trial reported {summary['metric']}: no best.yaml", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Reproduce the TIRG paper's CSS comparison: every composer, several seeds, mean ± std.

``python -m bench.reproduce --data DIR --models all --seeds 3`` trains and evaluates
each (model, seed) through the normal training entry point (``pipeline.train``: the
config ``configs/css_<model>.yaml``, or ``configs/css_base.yaml`` with ``model.name``
set where a model has no file of its own) and writes to ``--out``:

* ``table.md``: R@1/R@5/R@10 as mean ± std per model, with runs, iterations and the
  paper's R@1 (Vo et al., CVPR 2019, Table 1);
* ``runs.json``: settings, the summary rows and every run (model, seed, metrics, wall
  time, resolved config);
* ``recalls.png``: bars with ±std error bars and the paper's R@1;
* ``runs/<model>/seed<S>/``: each run's directory (``config.yaml``, ``metrics.json``,
  ``checkpoint/``, ``tb/``).

A run whose directory already holds ``metrics.json`` (with the same resolved config) is
reused, so an interrupted reproduction resumes; an unfinished run restarts from its
newest checkpoint (the entry point's own resume). By default the runs go through Ray
Train (one ``ray.init`` for all of them; ``--parallel K`` keeps K runs in flight);
``--in-process`` runs them with ``--workers 0`` (no Ray), for machines without it.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from bench.reproduce_report import markdown_table, plot_recalls, summarize, write_json
from pipeline.cli_flags import add_config_flags, add_run_flags

log = logging.getLogger("bench.reproduce")

REPO_ROOT = Path(__file__).resolve().parent.parent
RUN_RECORD = "reproduce_run.json"  # per run: model, seed, wall time (next to metrics.json)
# The paper's CSS setting (Sec. 4.1 and the authors' code): 64 px renders, ResNet-18,
# 512-d embedding, batch 32; the number of steps comes from --steps.
PAPER_SCALE = [
    "image.size=64",
    "model.image_backbone=resnet18",
    "model.embed_dim=512",
    "train.batch_size=32",
]
# A reduced version for a CPU box (with ``shards.css --small`` data): 32 px, a 128-d
# embedding, no loader processes or AMP, one final checkpoint; the paper's batch and lr
# (a 5x lr, as the config's demo_settings use, took concat to R@1 2% after 80 steps,
# below the 11% of untrained image features).
CPU_SCALE = [
    "image.size=32",
    "model.embed_dim=128",
    "train.batch_size=32",
    "train.use_gpu=false",
    "train.loader_workers=0",
    "train.shuffle_buffer=200",
    "train.amp=false",
    "train.channels_last=false",
    "train.checkpoint_every=0",
    "train.log_every=50",
]
CPU_SCALE_ITERATIONS = 300


class ReproduceError(RuntimeError):
    """A reproduction cannot go on (bad dataset, a run directory from other settings)."""


@dataclass
class PlannedRun:
    """One (model, seed) with its resolved run config."""

    model: str
    seed: int
    config: dict[str, Any]

    @property
    def run_dir(self) -> Path:
        return Path(self.config["out"])


def parse_args(argv: list[str] | None) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    parser = argparse.ArgumentParser(
        prog="python -m bench.reproduce", description=__doc__.splitlines()[0]
    )
    add_run_flags(
        parser,
        ("data", "steps", "workers", "batch_size"),
        help_overrides={
            "data": "CSS-style shard dataset (shards.css; required)",
            "steps": "training steps per run (sets train.steps; default: the config's; "
            f"{CPU_SCALE_ITERATIONS} with --cpu-scale)",
            "workers": "Ray Train workers per run (sets train.workers; default 1; 0 and "
            "--in-process: in this process without Ray)",
        },
    )
    parser.add_argument(
        "--models", default="all", help="'all' (every registered model) or a comma-separated list"
    )
    parser.add_argument("--seeds", type=int, default=3, help="runs per model (seeds 0..N-1)")
    parser.add_argument("--parallel", type=int, default=1, help="runs in flight at once")
    parser.add_argument(
        "--in-process", action="store_true", help="train with --workers 0 in this process (no Ray)"
    )
    scale = parser.add_mutually_exclusive_group()
    scale.add_argument(
        "--paper-scale", action="store_true", help="the paper's setup: " + " ".join(PAPER_SCALE)
    )
    scale.add_argument(
        "--cpu-scale", action="store_true", help="reduced CPU setup: " + " ".join(CPU_SCALE)
    )
    add_config_flags(parser, config=False)  # --set KEY=VALUE, for every run
    parser.add_argument(
        "--config-dir",
        default=str(REPO_ROOT / "configs"),
        help="where css_<model>.yaml / css_base.yaml live",
    )
    parser.add_argument("--out", default="results/reproduce", help="output directory")
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="train nothing: tabulate the finished runs, list the missing ones",
    )
    parser.add_argument("--ray-address", help="join this Ray cluster instead of a local one")
    parser.add_argument("--ray-cpus", type=int, help="CPUs of the local Ray cluster")
    args = parser.parse_args(argv)
    if args.data is None:
        parser.error("--data DIR is required (a CSS-style shard dataset)")
    if args.workers is None:
        args.workers = 0 if args.in_process else 1
    for name in ("seeds", "parallel"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.steps is not None and args.steps < 1:
        parser.error(f"--steps must be >= 1, got {args.steps}")
    if args.workers < 1 and not args.in_process:
        parser.error(
            f"--workers must be >= 1 for Ray runs, got {args.workers} "
            "(use --in-process to train without Ray)"
        )
    return parser, args


def resolve_models(spec: str) -> list[str]:
    """``"all"`` -> every registered model; else the listed names, each checked."""
    from pipeline.models import list_models

    known = list_models()
    if spec.strip() == "all":
        return known
    names = [name.strip() for name in spec.split(",") if name.strip()]
    unknown = [name for name in names if name not in known]
    if unknown or not names:
        raise ValueError(
            f"--models {spec!r}: unknown model(s) {unknown}; "
            f"registered: {', '.join(known)} (or 'all')"
        )
    return list(dict.fromkeys(names))


def model_config_file(config_dir: Path, model: str) -> Path:
    """``css_<model>.yaml`` if present, else ``css_base.yaml`` (the model is set by name)."""
    own = config_dir / f"css_{model}.yaml"
    if own.is_file():
        return own
    base = config_dir / "css_base.yaml"
    if not base.is_file():
        raise ReproduceError(f"no {own.name} or {base.name} in --config-dir {config_dir}")
    return base


def scale_overrides(args: argparse.Namespace) -> list[str]:
    if args.paper_scale:
        return list(PAPER_SCALE)
    if args.cpu_scale:
        return list(CPU_SCALE)
    return []


def iterations(args: argparse.Namespace) -> int | None:
    if args.steps is None and args.cpu_scale:
        return CPU_SCALE_ITERATIONS
    return args.steps


def plan_runs(args: argparse.Namespace, models: list[str]) -> list[PlannedRun]:
    """Resolved configs through the entry point's own flag handling (``pipeline.train``)."""
    from pipeline.cli_flags import add_common_flags, config_from_args

    dataset = Path(args.data)
    if not (dataset / "manifest.json").is_file():
        raise ReproduceError(
            f"--data {dataset}: no manifest.json (expected a shard "
            "dataset written by python -m shards.css)"
        )
    flag_parser = argparse.ArgumentParser(add_help=False)
    add_common_flags(flag_parser)
    out, steps = Path(args.out).resolve(), iterations(args)
    workers = 0 if args.in_process else args.workers
    overrides = scale_overrides(args) + list(args.overrides)
    runs = []
    for model in models:
        for seed in range(args.seeds):
            argv = [
                "--config",
                str(model_config_file(Path(args.config_dir), model)),
                "--data",
                str(dataset),
                "--model",
                model,
                "--seed",
                str(seed),
                "--workers",
                str(workers),
                "--out",
                str(out / "runs" / model / f"seed{seed}"),
            ]
            argv += [] if steps is None else ["--steps", str(steps)]
            argv += [] if args.batch_size is None else ["--batch-size", str(args.batch_size)]
            for item in overrides:
                argv += ["--set", item]
            config = config_from_args(flag_parser.parse_args(argv))
            runs.append(PlannedRun(model, seed, config))
    return runs


def config_differences(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two configs (after a JSON round trip)."""
    if isinstance(old, dict) and isinstance(new, dict):
        diffs = []
        for key in sorted(set(old) | set(new), key=str):
            path = f"{prefix}.{key}" if prefix else str(key)
            if key not in old or key not in new:
                diffs.append(path)
            else:
                diffs += config_differences(old[key], new[key], path)
        return diffs
    same = json.loads(json.dumps(old, default=str)) == json.loads(json.dumps(new, default=str))
    return [] if same else [f"{prefix}: {old!r} -> {new!r}"]


def finished_result(run: PlannedRun) -> dict[str, Any] | None:
    """The stored result of a finished run, None if it has not finished.

    Raises ReproduceError when the directory holds a finished run of other settings.
    """
    metrics_file = run.run_dir / "metrics.json"
    if not metrics_file.is_file():
        return None
    config_file = run.run_dir / "config.yaml"
    stored = yaml.safe_load(config_file.read_text()) if config_file.is_file() else None
    diffs = config_differences(stored, run.config) if stored is not None else ["config.yaml"]
    if diffs:
        raise ReproduceError(
            f"{run.run_dir} holds a finished run with other settings ({'; '.join(diffs[:5])}); "
            "pass another --out or delete that directory"
        )
    record_file = run.run_dir / RUN_RECORD
    record = json.loads(record_file.read_text()) if record_file.is_file() else {}
    return result_dict(run, json.loads(metrics_file.read_text()), record.get("wall_s"), reused=True)


def result_dict(
    run: PlannedRun, metrics: dict[str, Any], wall_s: float | None, *, reused: bool
) -> dict[str, Any]:
    return {
        "model": run.model,
        "seed": run.seed,
        "metrics": metrics,
        "wall_s": wall_s,
        "reused": reused,
        "run_dir": str(run.run_dir),
        "config": run.config,
    }


def train_timed(config: dict[str, Any]) -> tuple[dict[str, Any], float]:
    """One run through ``pipeline.train.run``; returns (metrics, wall seconds)."""
    from pipeline.launch import run as train_run

    start = time.perf_counter()
    metrics = train_run(config)
    wall = time.perf_counter() - start
    Path(config["out"], RUN_RECORD).write_text(
        json.dumps(
            {"model": config["model"]["name"], "seed": config["train"]["seed"], "wall_s": wall}
        )
    )
    return metrics, wall


def train_in_subprocess(config: dict[str, Any]) -> tuple[dict[str, Any], float]:
    """``train_timed`` in a pool process (``--in-process --parallel K``), with logging."""
    # runs share one log: each line names its run
    run_name = f"{config['model']['name']}/seed{config['train']['seed']}"
    logging.basicConfig(
        level=logging.INFO, format=f"%(asctime)s [{run_name}] %(name)s: %(message)s"
    )
    return train_timed(config)


class RunExecutor:
    """Runs configs one after another or K at a time; ``submit`` then ``wait_one``."""

    def __init__(self, args: argparse.Namespace):
        self.parallel, self.in_process = args.parallel, args.in_process
        self.pending: dict[Any, PlannedRun] = {}
        self.pool = None
        self.remote = None
        if self.in_process and self.parallel > 1:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            self.pool = ProcessPoolExecutor(
                self.parallel, mp_context=multiprocessing.get_context("spawn")
            )
        elif not self.in_process:
            self.remote = start_ray(args)

    def has_room(self) -> bool:
        return len(self.pending) < self.parallel

    def submit(self, run: PlannedRun) -> None:
        if self.pool is not None:
            self.pending[self.pool.submit(train_in_subprocess, run.config)] = run
        elif self.remote is not None and self.parallel > 1:
            self.pending[self.remote.remote(run.config)] = run
        else:
            self.pending[("now", id(run))] = run  # trained in wait_one, in this process

    def wait_one(self) -> tuple[PlannedRun, tuple[dict[str, Any], float] | None, str | None]:
        """(run, (metrics, wall) or None, error text or None) of the next finished run."""
        if self.pool is not None:
            from concurrent.futures import FIRST_COMPLETED, wait

            done, _ = wait(list(self.pending), return_when=FIRST_COMPLETED)
            key = next(iter(done))
            getter = key.result
        elif self.remote is not None and self.parallel > 1:
            import ray

            (key,), _ = ray.wait(list(self.pending), num_returns=1)

            def getter():
                return ray.get(key)
        else:
            key = next(iter(self.pending))
            config = self.pending[key].config

            def getter():
                return train_timed(config)

        run = self.pending.pop(key)
        try:
            return run, getter(), None
        except Exception as err:  # one failed run must not lose the others' results
            log.exception("%s seed %d failed", run.model, run.seed)
            return run, None, f"{type(err).__name__}: {err}"

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown()
        if self.remote is not None:
            import ray

            ray.shutdown()


def start_ray(args: argparse.Namespace):
    """``ray.init`` once for every run; returns a remote wrapper of ``train_timed``."""
    import os

    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    import ray

    if not ray.is_initialized():
        if args.ray_address:
            ray.init(address=args.ray_address)
        else:
            ray.init(num_cpus=args.ray_cpus, include_dashboard=False)
    # The task only waits on its TorchTrainer; the trainer's workers hold the CPUs.
    return ray.remote(num_cpus=0, max_retries=0)(train_timed)


def format_eta(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def recall_text(metrics: dict[str, Any]) -> str:
    return "  ".join(f"{k} {float(metrics[k]):.1f}" for k in ("R@1", "R@5", "R@10") if k in metrics)


def run_all(runs: list[PlannedRun], args: argparse.Namespace) -> tuple[list[dict], list[dict]]:
    """Train every unfinished run; returns (results, failures). One log line per run."""
    results, failures, todo = [], [], []
    for run in runs:
        stored = finished_result(run)
        if stored is None:
            todo.append(run)
        else:
            results.append(stored)
            log.info(
                "[%d/%d] %s seed %d: reused %s",
                len(results),
                len(runs),
                run.model,
                run.seed,
                recall_text(stored["metrics"]),
            )
    if not todo:
        return results, failures
    if args.report_only:
        for run in todo:
            failures.append(
                {
                    "model": run.model,
                    "seed": run.seed,
                    "error": "not run",
                    "run_dir": str(run.run_dir),
                }
            )
        log.info(
            "--report-only: %d of %d runs not finished: %s",
            len(todo),
            len(runs),
            ", ".join(f"{run.model} seed {run.seed}" for run in todo),
        )
        return results, failures
    executor = RunExecutor(args)
    walls, queue = [], list(todo)
    try:
        while queue or executor.pending:
            while queue and executor.has_room():
                executor.submit(queue.pop(0))
            run, outcome, error = executor.wait_one()
            done = len(results) + len(failures) + 1
            if outcome is None:
                failures.append(
                    {
                        "model": run.model,
                        "seed": run.seed,
                        "error": error,
                        "run_dir": str(run.run_dir),
                    }
                )
                log.info(
                    "[%d/%d] %s seed %d: FAILED (%s)", done, len(runs), run.model, run.seed, error
                )
                continue
            metrics, wall = outcome
            walls.append(wall)
            results.append(result_dict(run, metrics, wall, reused=False))
            left = len(queue) + len(executor.pending)
            eta = sum(walls) / len(walls) * left / args.parallel
            log.info(
                "[%d/%d] %s seed %d: %s  (%.0f s; %d left, ETA %s)",
                done,
                len(runs),
                run.model,
                run.seed,
                recall_text(metrics),
                wall,
                left,
                format_eta(eta),
            )
    finally:
        executor.close()
    return results, failures


def hardware() -> dict[str, Any]:
    import os

    import torch

    info = {
        "platform": platform.platform(),
        "processor": platform.processor(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def main(argv: list[str] | None = None) -> int:
    parser, args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        models = resolve_models(args.models)
    except ValueError as err:
        parser.error(str(err))
    from pipeline.config import ConfigError

    try:
        runs = plan_runs(args, models)
        started = time.time()
        results, failures = run_all(runs, args)
    except (ConfigError, ReproduceError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    order = {(run.model, run.seed): i for i, run in enumerate(runs)}
    results.sort(key=lambda r: order[(r["model"], r["seed"])])
    settings = {
        "command": "python -m bench.reproduce " + " ".join(sys.argv[1:] if argv is None else argv),
        "dataset": str(Path(args.data).resolve()),
        "models": models,
        "seeds": args.seeds,
        "iterations": iterations(args),
        "scale": scale_overrides(args),
        "overrides": args.overrides,
        "in_process": args.in_process,
        "workers": args.workers,
        "parallel": args.parallel,
        "report_only": args.report_only,
        "hardware": hardware(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
        "wall_s": time.time() - started,
        "failures": failures,
    }
    rows = summarize(results) if results else []
    table = markdown_table(rows)
    (out / "table.md").write_text(table)
    write_json(out / "runs.json", results, rows, settings)
    if rows:
        plot_recalls(
            out / "recalls.png",
            rows,
            f"CSS: {len(models)} models x {args.seeds} seeds, "
            f"{iterations(args) or 'config'} iterations",
        )
    print(table)
    print(f"wrote {out / 'table.md'}, {out / 'runs.json'}, {out / 'recalls.png'}")
    if failures:
        print(
            f"{len(failures)} run(s) failed or not run: "
            + ", ".join(f"{f['model']} seed {f['seed']}" for f in failures),
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

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
import os
import platform
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from bench.reproduce_plan import (  # noqa: F401  (parse_args, plan_runs: the API)
    RUN_RECORD,
    PlannedRun,
    ReproduceError,
    finished_result,
    iterations,
    parse_args,
    plan_runs,
    resolve_models,
    result_dict,
    scale_overrides,
)
from bench.reproduce_report import markdown_table, plot_recalls, summarize, write_json

log = logging.getLogger("bench.reproduce")


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
    # runs share one log: each line names its run (force: a pool process trains several
    # runs one after another, and basicConfig alone would keep the first run's name)
    run_name = f"{config['model']['name']}/seed{config['train']['seed']}"
    logging.basicConfig(
        level=logging.INFO, format=f"%(asctime)s [{run_name}] %(name)s: %(message)s", force=True
    )
    return train_timed(config)


def exit_with_parent(parent_pid: int, poll_s: float = 1.0) -> None:
    """Pool initializer: end this worker once the process that started it is gone.

    A killed ``bench.reproduce`` (SIGKILL, or SIGTERM while a pool shuts down) would
    otherwise leave its workers training on as orphans, holding the cores that the
    next invocation's runs are timed on. What they leave behind is what an interrupted
    run leaves: the next invocation reuses finished runs and resumes the rest."""

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(poll_s)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


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
                self.parallel,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=exit_with_parent,
                initargs=(os.getpid(),),
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

    def close(self, *, interrupted: bool = False) -> None:
        """Shut down the pool or Ray; ``interrupted``: do not wait for runs in flight
        (the pool's workers end with this process, ``exit_with_parent``)."""
        if self.pool is not None:
            self.pool.shutdown(wait=not interrupted, cancel_futures=interrupted)
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
    interrupted = True  # until the loop ends normally
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
        interrupted = False
    finally:
        executor.close(interrupted=interrupted)
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


def exit_on_sigterm(signum, frame) -> None:
    """SIGTERM as SystemExit, so ``run_all``'s cleanup runs (Python's default ends the
    process on the spot)."""
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    if threading.current_thread() is not threading.main_thread():
        return reproduce(argv)  # signal handlers can only be set in the main thread
    previous = signal.signal(signal.SIGTERM, exit_on_sigterm)
    try:
        return reproduce(argv)
    finally:
        signal.signal(signal.SIGTERM, previous)


def reproduce(argv: list[str] | None = None) -> int:
    """``main`` without the SIGTERM handler: plan, train, write the outputs."""
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
        "first_seed": args.first_seed,
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

"""What ``bench.reproduce`` runs: its flags, the scale presets, one resolved config per
(model, seed) through the training entry point's own flag handling, and which runs
finished earlier with the same settings (so an interrupted reproduction resumes)."""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from pipeline.cli_flags import add_config_flags, add_run_flags

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
# The paper's model and image size on a CPU box (``shards.css --preset medium`` data):
# PAPER_SCALE with the host settings above, bf16 autocast, which runs a 64 px step
# ~1.7x faster on a CPU with AVX-512 BF16, and channels_last, which spares bf16 max
# pooling its slow contiguous kernel (Zen 4, TIRG, batch 32, 1 thread,
# ``bench.profile_step --amp-on-cpu``: 431 ms bf16 channels_last, 471 ms bf16
# contiguous, 794 ms float32).
CPU_PAPER_SCALE = PAPER_SCALE + [
    "train.use_gpu=false",
    "train.loader_workers=0",
    "train.amp=true",
    "train.amp_on_cpu=true",
    "train.channels_last=true",
    "train.checkpoint_every=0",
    "train.log_every=100",
]


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
    parser.add_argument(
        "--seeds", type=int, default=3, help="runs per model (seeds S..S+N-1, S = --first-seed)"
    )
    parser.add_argument(
        "--first-seed",
        type=int,
        default=0,
        help="the first seed (default 0); with the same --out, '--first-seed 2 --seeds 2' "
        "adds seeds 2 and 3 to a table of two, and '--seeds 4 --report-only' tabulates all four",
    )
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
    scale.add_argument(
        "--cpu-paper-scale",
        action="store_true",
        help="the paper's setup on a CPU: " + " ".join(CPU_PAPER_SCALE),
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
    if args.first_seed < 0:
        parser.error(f"--first-seed must be >= 0, got {args.first_seed}")
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
    if args.cpu_paper_scale:
        return list(CPU_PAPER_SCALE)
    return []


def iterations(args: argparse.Namespace) -> int | None:
    if args.steps is None and args.cpu_scale:
        return CPU_SCALE_ITERATIONS
    return args.steps


def model_scale(overrides: list[str], model: str) -> list[str]:
    """A scale's overrides for ``model``: its ``model.embed_dim`` (the query size) sets
    CCNet's ``model.expert_dim`` (D per expert) instead, the keyword CCNet has."""
    from pipeline.models import size_kwarg

    size = size_kwarg(model)
    return [
        f"model.{size}={item.split('=', 1)[1]}" if item.startswith("model.embed_dim=") else item
        for item in overrides
    ]


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
    runs = []
    for model in models:
        overrides = model_scale(scale_overrides(args), model) + list(args.overrides)
        for seed in range(args.first_seed, args.first_seed + args.seeds):
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

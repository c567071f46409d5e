"""The command-line flags that every entry point running the training loop shares.

``pipeline/train.py``, ``python -m tune.search`` and ``python -m bench.reproduce`` take
these from one table, so a flag means the same thing everywhere: each sets one config
key (``--steps`` sets ``train.steps``, ``--workers`` sets ``train.workers``: Ray Train
workers, 0 = the loop in the calling process without Ray). An entry point takes the
subset that fits it (``bench.reproduce`` trains many models, so it has no ``--model``).
Flags of other commands that count something else are named for it
(``shards.css --render-processes``, ``export.index --loader-workers``).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from typing import Any

# flag -> (config key it sets, argparse type, help)
RUN_FLAGS: dict[str, tuple[str | None, Any, str]] = {
    "data": ("data", str, "shard dataset directory (sets 'data')"),
    "model": ("model.name", str, "model name from the registry (sets model.name)"),
    "steps": ("train.steps", int, "training steps per run (sets train.steps)"),
    "workers": (
        "train.workers",
        int,
        "Ray Train workers per run; 0 = the loop in this process without Ray (sets train.workers)",
    ),
    "batch_size": ("train.batch_size", int, "per-worker batch (sets train.batch_size)"),
    "seed": ("train.seed", int, "random seed of a run (sets train.seed)"),
    "out": ("out", str, "output directory (sets 'out'; default runs/<name>)"),
}


def add_config_flags(parser: argparse.ArgumentParser, *, config: bool = True) -> None:
    """``--config FILE`` (unless ``config=False``) and ``--set KEY=VALUE`` (repeatable)."""
    if config:
        parser.add_argument("--config", required=True, help="YAML run config (configs/*.yaml)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. optim.lr=0.1 (repeatable)",
    )


def add_run_flags(
    parser: argparse.ArgumentParser,
    names: Sequence[str] = tuple(RUN_FLAGS),
    help_overrides: dict[str, str] | None = None,
) -> None:
    """The flags ``names`` of ``RUN_FLAGS`` (default: all), each setting its config key."""
    for name in names:
        _, kind, help_text = RUN_FLAGS[name]
        help_text = (help_overrides or {}).get(name, help_text)
        parser.add_argument("--" + name.replace("_", "-"), type=kind, help=help_text)


def flag_overrides(args: argparse.Namespace) -> list[str]:
    """``KEY=JSON`` overrides of ``--set`` followed by the run flags that were given."""
    overrides = list(getattr(args, "overrides", []) or [])
    for name, (key, _, _) in RUN_FLAGS.items():
        value = getattr(args, name, None)
        if key is not None and value is not None:
            overrides.append(f"{key}={json.dumps(value)}")
    return overrides


def add_common_flags(parser: argparse.ArgumentParser) -> None:
    """Every shared flag: what ``pipeline/train.py`` takes."""
    add_config_flags(parser)
    add_run_flags(parser)


def config_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """Load the config file, apply ``--set`` and the flag overrides, resolve run paths."""
    from pipeline.config import load_config, resolve_run_paths

    return resolve_run_paths(load_config(args.config, flag_overrides(args)))

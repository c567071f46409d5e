"""Results of a search: one row per trial, the best config as a YAML, a plot.

``trial_table`` turns Tune's per-trial report histories into a table (pandas) with the
searched values, the metric at the trial's last evaluation (reports between
evaluations carry only ``step``/``loss``), the best value it reached, the last step,
the number of reports (Tune's ``training_iteration``) and a status: ``completed``
(reached ``train.steps``), ``stopped`` (the scheduler stopped it early), ``error`` or
``unfinished`` (an interrupted search; ``--resume`` continues it). Rows are ordered
best first: the trials that trained furthest, then by the metric at their last
evaluation; the first row with a metric gives ``best.yaml``.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import pandas as pd

from pipeline.config import dump_config
from tune.space import SPACE_SECTION, ParamSpec, apply_params

RESULTS_CSV = "results.csv"
RESULTS_MD = "results.md"
BEST_YAML = "best.yaml"
PLOT_PNG = "search.png"


def metric_history(history: pd.DataFrame | None, metric: str) -> pd.Series:
    """The metric's evaluated values in report order (NaN/absent rows dropped)."""
    if history is None or metric not in history:
        return pd.Series(dtype=float)
    return pd.to_numeric(history[metric], errors="coerce").dropna()


def trial_row(
    trial_id: str,
    params: dict[str, Any],
    history: pd.DataFrame | None,
    error: Any,
    *,
    metric: str,
    mode: str,
    max_steps: int,
) -> dict[str, Any]:
    """One table row from a trial's report history (``Result.metrics_dataframe``)."""
    values = metric_history(history, metric)
    has_history = history is not None and len(history) > 0
    steps = (
        pd.to_numeric(history["step"], errors="coerce")
        if has_history and "step" in history
        else pd.Series(dtype=float)
    )
    step = int(steps.max()) if len(steps.dropna()) else 0
    if error is not None:
        status = "error"
    elif step >= max_steps:
        status = "completed"
    elif has_history and bool(history.get("done", pd.Series([False])).iloc[-1]):
        status = "stopped"
    else:
        status = "unfinished"
    best = (values.max() if mode == "max" else values.min()) if len(values) else math.nan
    return {
        "trial_id": trial_id,
        **params,
        metric: float(values.iloc[-1]) if len(values) else math.nan,
        f"best_{metric}": float(best),
        "step": step,
        "iterations": len(history) if has_history else 0,
        "status": status,
    }


def trial_table(
    result_grid, space: dict[str, ParamSpec], *, metric: str, mode: str, max_steps: int
) -> pd.DataFrame:
    """One row per trial of a ``ray.tune.ResultGrid``, best first (``sort_table``)."""
    rows = []
    for result in result_grid:
        config = result.config or {}
        params = {key: config.get(key) for key in space}
        trial_id = Path(result.path).name  # the trial directory is named after its id
        rows.append(
            trial_row(
                trial_id,
                params,
                result.metrics_dataframe,
                result.error,
                metric=metric,
                mode=mode,
                max_steps=max_steps,
            )
        )
    return sort_table(pd.DataFrame(rows), metric, mode)


def sort_table(table: pd.DataFrame, metric: str, mode: str) -> pd.DataFrame:
    """Best first: furthest step, then the metric at the last evaluation (NaN last)."""
    if table.empty:
        return table
    # Trials that trained furthest come first: ASHA let them continue because they beat
    # the others at the rungs both reached, so a value a stopped trial had at an early step
    # does not outrank them. The trial id breaks ties, so the best row (and best.yaml)
    # does not depend on the order in which Tune lists the trials.
    ordered = table.sort_values(
        ["step", metric, "trial_id"],
        ascending=[False, mode == "min", True],
        na_position="last",
        kind="stable",
    )
    return ordered.reset_index(drop=True)


def format_value(value: Any) -> str:
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.4g}"
    return str(value)


def markdown_table(table: pd.DataFrame) -> str:
    """A GitHub-flavoured Markdown table (no extra dependency)."""
    header = "| " + " | ".join(str(c) for c in table.columns) + " |"
    rule = "|" + "|".join("---" for _ in table.columns) + "|"
    body = [
        "| " + " | ".join(format_value(v) for v in row) + " |"
        for row in table.itertuples(index=False)
    ]
    return "\n".join([header, rule, *body]) + "\n"


def best_params(table: pd.DataFrame, space: dict[str, ParamSpec], metric: str) -> dict | None:
    """The searched values of the first (best) row that has a metric, or None."""
    rated = table.dropna(subset=[metric]) if not table.empty else table
    if rated.empty:
        return None
    row = rated.iloc[0]
    return {key: row[key] for key in space}


def best_config(base: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    """The run config to train the best trial's values with ``pipeline/train.py``.

    ``base`` is the search's config before per-trial paths; the run paths are cleared so
    ``train.py`` picks fresh ones, and ``demo`` is switched off because its settings are
    already merged in (merging them again would undo the searched values), as is
    ``fault_injection`` (a test of the search's fault tolerance, not a setting to keep).
    """
    config = apply_params(base, params)
    config = copy.deepcopy(config)
    config[SPACE_SECTION] = None
    config["demo"] = False
    config["demo_settings"] = {}
    config["paper"] = False  # already merged into the base
    config["paper_settings"] = {}
    config["fault_injection"] = None
    config["name"] = f"{base['name']}_best"
    config["out"] = None
    config["train"]["run_name"] = None
    config["train"]["storage_path"] = None
    return config


def plot_search(
    table: pd.DataFrame, space: dict[str, ParamSpec], metric: str, path: str | Path
) -> Path:
    """One panel per searched key: the metric of every trial against its value."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(space)
    cols = min(3, len(keys))
    rows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.0 * cols, 3.2 * rows), squeeze=False)
    for ax in axes.flat[len(keys) :]:
        ax.set_visible(False)
    markers = {
        "completed": ("o", "tab:blue"),
        "stopped": ("x", "tab:red"),
        "error": ("s", "black"),
        "unfinished": ("^", "tab:gray"),
    }
    for ax, key in zip(axes.flat, keys):
        spec = space[key]
        categorical = spec.type in ("choice", "grid")
        if categorical:
            labels = [str(v) for v in spec.values]
            ax.set_xticks(range(len(labels)), labels)
            ax.set_xlim(-0.5, len(labels) - 0.5)
        for status, (marker, colour) in markers.items():
            rows = table[table["status"] == status] if not table.empty else table
            if rows.empty:
                continue
            xs = [labels.index(str(v)) if categorical else v for v in rows[key]]
            ax.scatter(xs, rows[metric], marker=marker, color=colour, label=status)
        if spec.type == "loguniform":
            ax.set_xscale("log")
        ax.set_xlabel(key)
        ax.set_ylabel(f"{metric} (last evaluation)")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize="small")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_outputs(
    table: pd.DataFrame,
    base: dict[str, Any],
    space: dict[str, ParamSpec],
    metric: str,
    out_dir: str | Path,
) -> dict[str, Path]:
    """results.csv, results.md, search.png and (when a trial has a metric) best.yaml."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = {"csv": out_dir / RESULTS_CSV, "markdown": out_dir / RESULTS_MD}
    table.to_csv(written["csv"], index=False)
    written["markdown"].write_text(markdown_table(table))
    written["plot"] = plot_search(table, space, metric, out_dir / PLOT_PNG)
    params = best_params(table, space, metric)
    if params is not None:
        written["best"] = out_dir / BEST_YAML
        written["best"].write_text(dump_config(best_config(base, params)))
    return written

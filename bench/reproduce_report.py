"""Tables, JSON and a bar chart for ``bench.reproduce`` (the TIRG paper's CSS comparison).

The paper (Vo et al., "Composing Text and Image for Image Retrieval - An Empirical
Odyssey", CVPR 2019, Table 1, CSS) reports R@1 as the mean and standard deviation over
runs; ``PAPER_CSS_R1`` holds its means. A run here is one finished training run: a dict
with ``model``, ``seed``, ``metrics`` (the protocol's recalls in percent, ``"R@1"`` ...),
``wall_s`` and ``config`` (the resolved run config).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

RECALL_KEYS = ("R@1", "R@5", "R@10")
# TIRG paper, Table 1 (CSS, 3D images): R@1 in percent. Models the paper does not
# report (tirg_lastconv, ccnet) have no entry.
PAPER_CSS_R1: dict[str, float] = {
    "tirg": 73.7,
    "film": 65.6,
    "relationship": 62.1,
    "concat": 60.6,
    "param_hashing": 60.5,
    "mrn": 60.1,
    "show_and_tell": 33.0,
    "image_only": 6.3,
    "text_only": 0.1,
}


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1 in the denominator; 0 for one value)."""
    if not values:
        raise ValueError("mean_std needs at least one value")
    mean = sum(values) / len(values)
    if len(values) == 1:
        return mean, 0.0
    var = sum((v - mean) ** 2 for v in values) / (len(values) - 1)
    return mean, math.sqrt(var)


def model_order(models: list[str]) -> list[str]:
    """The paper's row order (best R@1 first), then models it does not report, by name."""
    known = sorted((m for m in models if m in PAPER_CSS_R1), key=lambda m: -PAPER_CSS_R1[m])
    return known + sorted(m for m in models if m not in PAPER_CSS_R1)


def trained_steps(run: dict[str, Any]) -> int:
    """Steps a run trained: its final metrics' step, else its planned ``train.steps``."""
    step = run["metrics"].get("step")
    return int(step) if step is not None else int(run["config"]["train"]["steps"])


def format_iterations(iterations: list[int]) -> str:
    """``"300"``, or ``"5120–5480"`` when the runs trained different step counts."""
    if len(iterations) == 1:
        return str(iterations[0])
    return f"{min(iterations)}–{max(iterations)}"


def summarize(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per model: number of runs, their iterations, and mean/std of each recall.

    A row: ``{"model", "runs", "seeds", "iterations", "paper_R@1", "R@1": {"mean", "std"},
    ...}``; ``iterations`` lists the distinct step counts the model's runs trained
    (``metrics["step"]``; a run ended by ``train.time_limit_s`` stops short of
    ``train.steps``, which is used where a run's metrics have no step).
    """
    by_model: dict[str, list[dict[str, Any]]] = {}
    for run in runs:
        by_model.setdefault(run["model"], []).append(run)
    rows = []
    for model in model_order(list(by_model)):
        group = by_model[model]
        row: dict[str, Any] = {
            "model": model,
            "runs": len(group),
            "seeds": sorted(run["seed"] for run in group),
            "iterations": sorted({trained_steps(run) for run in group}),
            "paper_R@1": PAPER_CSS_R1.get(model),
        }
        for key in RECALL_KEYS:
            values = [float(run["metrics"][key]) for run in group if key in run["metrics"]]
            if len(values) != len(group):
                missing = [run["seed"] for run in group if key not in run["metrics"]]
                raise KeyError(f"{model}: runs with seeds {missing} have no {key!r} in metrics")
            mean, std = mean_std(values)
            row[key] = {"mean": mean, "std": std}
        rows.append(row)
    return rows


def format_cell(stat: dict[str, float], runs: int) -> str:
    """``"73.2 ± 1.1"``; a single run has no spread, so only its value is shown."""
    if runs < 2:
        return f"{stat['mean']:.1f}"
    return f"{stat['mean']:.1f} ± {stat['std']:.1f}"


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """Markdown table: model, runs, iterations, R@1/R@5/R@10 as mean ± std, paper R@1."""
    header = ["model", "runs", "iterations", *RECALL_KEYS, "paper R@1"]
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|",
    ]
    for row in rows:
        paper = row["paper_R@1"]
        cells = [
            row["model"],
            str(row["runs"]),
            format_iterations(row["iterations"]),
            *(format_cell(row[key], row["runs"]) for key in RECALL_KEYS),
            "–" if paper is None else f"{paper:.1f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_json(
    path: str | Path,
    runs: list[dict[str, Any]],
    rows: list[dict[str, Any]],
    settings: dict[str, Any],
) -> None:
    """``{"settings", "summary": rows, "runs": runs}`` as indented JSON."""
    payload = {"settings": settings, "summary": rows, "runs": runs}
    Path(path).write_text(json.dumps(payload, indent=1, sort_keys=False, default=str) + "\n")


def plot_recalls(path: str | Path, rows: list[dict[str, Any]], title: str) -> None:
    """Grouped bars of R@1/R@5/R@10 per model with ±std error bars; the paper's R@1 as a
    black marker on the R@1 bar."""
    import matplotlib

    matplotlib.use("Agg")  # files only; no display on servers
    import matplotlib.pyplot as plt

    models = [row["model"] for row in rows]
    width = 0.8 / len(RECALL_KEYS)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(models) + 2), 4.2))
    for i, key in enumerate(RECALL_KEYS):
        xs = [m + (i - (len(RECALL_KEYS) - 1) / 2) * width for m in range(len(models))]
        ax.bar(
            xs,
            [row[key]["mean"] for row in rows],
            width,
            yerr=[row[key]["std"] for row in rows],
            capsize=3,
            label=key,
        )
        if key == "R@1":
            paper = [
                (x, row["paper_R@1"]) for x, row in zip(xs, rows) if row["paper_R@1"] is not None
            ]
            if paper:
                ax.scatter(
                    *zip(*paper), marker="_", s=200, color="black", zorder=3, label="paper R@1"
                )
    ax.set_xticks(range(len(models)), models, rotation=30, ha="right")
    ax.set_ylabel("recall (%)")
    ax.set_ylim(0, 100)
    ax.set_title(title, pad=24)
    # above the axes: inside them it covers the bars of recalls near 100
    ax.legend(fontsize=8, ncol=4, loc="lower center", bbox_to_anchor=(0.5, 1.0), frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

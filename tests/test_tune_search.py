"""End-to-end searches on tiny CSS shards with a 2-CPU Ray instance.

An in-process search (3 trials, ASHA) writes its table, plot and best config, which
then trains with ``pipeline/train.py``. A trial runs a Ray Train ``TorchTrainer`` whose
reports reach Tune through ``TuneReportCallback``. A search whose trial dies (injected
fault) resumes with ``--resume``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent

TINY = {
    "base": str(ROOT / "configs" / "css_tirg.yaml"),
    "name": "tiny",
    "model": {"embed_dim": 32},
    "image": {"size": 32, "augment": False},
    "train": {
        "steps": 2,
        "batch_size": 4,
        "workers": 0,
        "use_gpu": False,
        "cpus_per_worker": 1.0,
        "threads": 1,
        "loader_workers": 0,
        "shuffle_buffer": 8,
        "amp": False,
        "channels_last": False,
        "log_every": 1,
        "eval_every": 1,
        "checkpoint_every": 1,
        "max_failures": 0,
    },
    "eval": {"batch_size": 64},
    "tune": {
        "optim.lr": {"type": "loguniform", "low": 1e-3, "high": 0.1},
        "model.learn_weights": {"type": "choice", "values": [True, False]},
    },
}


@pytest.fixture(scope="module")
def ray_session(tmp_path_factory):
    import ray

    ray.init(num_cpus=2, include_dashboard=False, _temp_dir=str(tmp_path_factory.mktemp("ray")))
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def css_data(tmp_path_factory):
    from shards.css import main as css_main

    out = tmp_path_factory.mktemp("css") / "css"
    assert (
        css_main(
            [
                "--small",
                "--out",
                str(out),
                "--train-scenes",
                "12",
                "--test-scenes",
                "6",
                "--mods-per-scene",
                "2",
                "--mod-pool",
                "24",
                "--image-size",
                "32",
                "--shard-size",
                "16",
                "--render-processes",
                "1",
            ]
        )
        == 0
    )
    return out


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory):
    path = tmp_path_factory.mktemp("cfg") / "tiny.yaml"
    path.write_text(yaml.safe_dump(TINY))
    return path


def search_args(config, data, out, *extra):
    return ["--config", str(config), "--data", str(data), "--out", str(out), *extra]


def test_asha_search_writes_results_and_best_config_trains(
    ray_session, css_data, tiny_config, tmp_path, capsys
):
    from pipeline.train import main as train_main
    from tune.search import main

    out = tmp_path / "search"
    args = search_args(
        tiny_config,
        css_data,
        out,
        "--num-samples",
        "3",
        "--workers",
        "0",
        "--grace-period",
        "1",
        "--reduction-factor",
        "2",
        "--max-t",
        "1",
    )
    assert main(args) == 0
    table = pd.read_csv(out / "results.csv")
    assert len(table) == 3
    # ASHA (max_t 1 < train.steps 2) stopped the trials at their first evaluation
    assert (table["status"] == "stopped").sum() >= 1
    assert table["R@1"].notna().all() and (table["step"] == 1).all()
    assert set(table.columns) >= {"optim.lr", "model.learn_weights", "iterations"}
    assert table["optim.lr"].between(1e-3, 0.1).all()
    assert (out / "results.md").read_text().count("\n") == 2 + 3
    assert (out / "search.png").stat().st_size > 0
    printed = capsys.readouterr().out
    assert "| trial_id |" in printed and "best:" in printed

    # the same command again restores the finished experiment instead of a new search
    assert main(args) == 0
    assert pd.read_csv(out / "results.csv").equals(table)

    best = yaml.safe_load((out / "best.yaml").read_text())
    assert best["optim"]["lr"] == pytest.approx(table["optim.lr"][0])
    assert best["model"]["learn_weights"] == bool(table["model.learn_weights"][0])
    run = tmp_path / "best-run"
    assert (
        train_main(
            [
                "--config",
                str(out / "best.yaml"),
                "--workers",
                "0",
                "--steps",
                "1",
                "--out",
                str(run),
            ]
        )
        == 0
    )
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["step"] == 1 and "R@1" in metrics
    trained = yaml.safe_load((run / "config.yaml").read_text())
    assert trained["optim"]["lr"] == best["optim"]["lr"]


def test_trial_runs_a_torch_trainer_reporting_to_tune(ray_session, css_data, tiny_config, tmp_path):
    from tune.search import main

    out = tmp_path / "search"
    assert (
        main(
            search_args(
                tiny_config,
                css_data,
                out,
                "--num-samples",
                "1",
                "--workers",
                "1",
                "--scheduler",
                "fifo",
                "--steps",
                "1",
                "--set",
                "train.cpus_per_worker=0.9",
            )
        )
        == 0
    )
    table = pd.read_csv(out / "results.csv")
    assert list(table["status"]) == ["completed"] and table["R@1"].notna().all()
    trial_id = table["trial_id"][0]
    # rank 0's report reached Tune through TuneReportCallback, and the Train run kept its
    # checkpoint in its own storage, named after the trial
    assert list((out / "train" / f"tiny-{trial_id}").glob("checkpoint_*"))
    assert (out / "trials" / trial_id / "checkpoint" / "checkpoint.pt").is_file()


def test_errored_search_resumes(ray_session, css_data, tiny_config, tmp_path):
    from tune.search import main

    out = tmp_path / "search"
    args = search_args(
        tiny_config,
        css_data,
        out,
        "--num-samples",
        "1",
        "--workers",
        "0",
        "--scheduler",
        "fifo",
        "--steps",
        "1",
        # the trial's process dies at step 1, once (a marker in its run dir)
        "--set",
        "fault_injection={step: 1, rank: 0}",
    )
    assert main(args) == 1  # the trial errored: no R@1, no best.yaml
    first = pd.read_csv(out / "results.csv")
    assert list(first["status"]) == ["error"] and not (out / "best.yaml").exists()

    assert main([*args, "--resume"]) == 0
    table = pd.read_csv(out / "results.csv")
    assert list(table["trial_id"]) == list(first["trial_id"])  # the same trial, resumed
    assert list(table["status"]) == ["completed"] and table["R@1"].notna().all()
    assert yaml.safe_load((out / "best.yaml").read_text())["fault_injection"] is None

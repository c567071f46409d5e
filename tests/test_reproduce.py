"""bench.reproduce: aggregation, outputs, resume, CLI errors, and one real tiny run."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import yaml

from bench import reproduce
from bench.reproduce_report import (
    PAPER_CSS_R1,
    markdown_table,
    mean_std,
    plot_recalls,
    summarize,
    write_json,
)
from pipeline.config import dump_config


def fake_run(model: str, seed: int, r1: float, steps: int = 100) -> dict:
    return {
        "model": model,
        "seed": seed,
        "wall_s": 1.0,
        "metrics": {"R@1": r1, "R@5": r1 + 10, "R@10": r1 + 20, "R@50": 99.0},
        "config": {"train": {"steps": steps}},
    }


def test_mean_std_is_sample_std():
    mean, std = mean_std([1.0, 2.0, 6.0])
    assert mean == pytest.approx(3.0)
    assert std == pytest.approx(math.sqrt(((2**2) + 1 + 3**2) / 2))
    assert mean_std([4.0]) == (4.0, 0.0)
    with pytest.raises(ValueError):
        mean_std([])


def test_summarize_rows_in_paper_order_with_spread():
    runs = [
        fake_run("text_only", 0, 0.5),
        fake_run("tirg", 0, 50.0),
        fake_run("tirg", 1, 60.0),
        fake_run("ccnet", 0, 40.0, steps=200),
        fake_run("concat", 1, 30.0),
    ]
    rows = summarize(runs)
    assert [r["model"] for r in rows] == ["tirg", "concat", "text_only", "ccnet"]
    tirg = rows[0]
    assert tirg["runs"] == 2 and tirg["seeds"] == [0, 1] and tirg["iterations"] == [100]
    assert tirg["R@1"]["mean"] == pytest.approx(55.0)
    assert tirg["R@1"]["std"] == pytest.approx(math.sqrt(50.0))
    assert tirg["R@10"]["mean"] == pytest.approx(75.0)
    assert tirg["paper_R@1"] == PAPER_CSS_R1["tirg"]
    assert rows[-1]["paper_R@1"] is None and rows[-1]["iterations"] == [200]


def test_iterations_are_the_steps_each_run_trained():
    """Time-limited runs (train.time_limit_s) stop short of train.steps: the table shows
    the steps they reached, as a range when the seeds differ."""
    short, full = fake_run("tirg", 0, 50.0, steps=9000), fake_run("tirg", 1, 60.0, steps=9000)
    short["metrics"]["step"], full["metrics"]["step"] = 5120, 5480
    rows = summarize([short, full, fake_run("concat", 0, 30.0, steps=300)])
    assert rows[0]["iterations"] == [5120, 5480] and rows[1]["iterations"] == [300]
    lines = markdown_table(rows).splitlines()
    assert lines[2].startswith("| tirg | 2 | 5120–5480 | 55.0 ± 7.1 |")
    assert lines[3].startswith("| concat | 1 | 300 | 30.0 |")


def test_summarize_names_run_missing_a_recall():
    broken = fake_run("tirg", 3, 10.0)
    del broken["metrics"]["R@5"]
    with pytest.raises(KeyError, match="seeds \\[3\\].*R@5"):
        summarize([fake_run("tirg", 0, 10.0), broken])


def test_table_json_and_png(tmp_path):
    runs = [fake_run("tirg", 0, 50.0), fake_run("tirg", 1, 60.0), fake_run("ccnet", 0, 40.0)]
    rows = summarize(runs)
    table = markdown_table(rows)
    lines = table.strip().splitlines()
    assert lines[0] == "| model | runs | iterations | R@1 | R@5 | R@10 | paper R@1 |"
    assert lines[2] == "| tirg | 2 | 100 | 55.0 ± 7.1 | 65.0 ± 7.1 | 75.0 ± 7.1 | 73.7 |"
    assert lines[3] == "| ccnet | 1 | 100 | 40.0 | 50.0 | 60.0 | – |"  # one run: no ± shown
    write_json(tmp_path / "runs.json", runs, rows, {"seeds": 2})
    payload = json.loads((tmp_path / "runs.json").read_text())
    assert payload["settings"] == {"seeds": 2}
    assert payload["summary"][0]["R@1"]["std"] == pytest.approx(math.sqrt(50.0))
    assert [r["seed"] for r in payload["runs"]] == [0, 1, 0]
    plot_recalls(tmp_path / "recalls.png", rows, "test")
    assert (tmp_path / "recalls.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def fake_dataset(tmp_path) -> Path:
    """Planning only reads the manifest's presence; training is faked in these tests."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "manifest.json").write_text("{}")
    return data


def fake_training(calls: list):
    """Stands in for ``train_timed``: records the call and leaves what ``run`` leaves."""

    def train(config):
        calls.append((config["model"]["name"], config["train"]["seed"]))
        out = Path(config["out"])
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(dump_config(config))
        metrics = {"R@1": 10.0 + config["train"]["seed"], "R@5": 20.0, "R@10": 30.0, "step": 3}
        (out / "metrics.json").write_text(json.dumps(metrics))
        return metrics, 0.5

    return train


def test_resume_skips_finished_runs(tmp_path, fake_dataset, monkeypatch):
    argv = [
        "--data",
        str(fake_dataset),
        "--models",
        "tirg,concat",
        "--seeds",
        "2",
        "--steps",
        "3",
        "--in-process",
        "--cpu-scale",
        "--out",
        str(tmp_path / "out"),
    ]
    _, args = reproduce.parse_args(argv)
    runs = reproduce.plan_runs(args, ["tirg", "concat"])
    assert [(r.model, r.seed) for r in runs] == [
        ("tirg", 0),
        ("tirg", 1),
        ("concat", 0),
        ("concat", 1),
    ]
    assert all(
        r.config["train"]["workers"] == 0
        and r.config["train"]["steps"] == 3
        and r.config["image"]["size"] == 32
        for r in runs
    )
    calls: list = []
    monkeypatch.setattr(reproduce, "train_timed", fake_training(calls))
    reproduce.train_timed(runs[1].config)  # a finished run from an earlier invocation
    calls.clear()

    results, failures = reproduce.run_all(runs, args)
    assert failures == []
    assert sorted(calls) == [("concat", 0), ("concat", 1), ("tirg", 0)]
    reused = {(r["model"], r["seed"]): r["reused"] for r in results}
    assert reused == {
        ("tirg", 1): True,
        ("tirg", 0): False,
        ("concat", 0): False,
        ("concat", 1): False,
    }

    calls.clear()
    results, _ = reproduce.run_all(runs, args)  # everything finished: nothing trains
    assert calls == [] and all(r["reused"] for r in results)


def test_first_seed_adds_seeds_to_a_table(tmp_path, fake_dataset, monkeypatch):
    """``--first-seed 2 --seeds 2`` trains seeds 2 and 3 only, each with its own seed and
    directory; ``--seeds 4 --report-only`` over the same --out then tabulates all four."""
    base = ["--data", str(fake_dataset), "--models", "tirg", "--in-process", "--steps", "3"]
    base += ["--out", str(tmp_path / "out")]
    calls: list = []
    monkeypatch.setattr(reproduce, "train_timed", fake_training(calls))
    _, first = reproduce.parse_args([*base, "--seeds", "2"])
    reproduce.run_all(reproduce.plan_runs(first, ["tirg"]), first)
    _, more = reproduce.parse_args([*base, "--seeds", "2", "--first-seed", "2"])
    added = reproduce.plan_runs(more, ["tirg"])
    assert [(r.seed, Path(r.config["out"]).name) for r in added] == [(2, "seed2"), (3, "seed3")]
    assert all(r.config["train"]["seed"] == r.seed for r in added)
    calls.clear()
    reproduce.run_all(added, more)
    assert calls == [("tirg", 2), ("tirg", 3)]

    calls.clear()
    _, report = reproduce.parse_args([*base, "--seeds", "4", "--report-only"])
    results, missing = reproduce.run_all(reproduce.plan_runs(report, ["tirg"]), report)
    assert calls == [] and missing == []
    assert sorted(r["seed"] for r in results) == [0, 1, 2, 3]
    (row,) = summarize(results)
    assert row["seeds"] == [0, 1, 2, 3] and row["R@1"]["mean"] == pytest.approx(11.5)


def test_report_only_trains_nothing(tmp_path, fake_dataset, monkeypatch):
    argv = [
        "--data",
        str(fake_dataset),
        "--models",
        "tirg",
        "--seeds",
        "2",
        "--in-process",
        "--steps",
        "3",
        "--out",
        str(tmp_path / "out"),
    ]
    _, args = reproduce.parse_args(argv)
    runs = reproduce.plan_runs(args, ["tirg"])
    calls: list = []
    monkeypatch.setattr(reproduce, "train_timed", fake_training(calls))
    reproduce.train_timed(runs[0].config)
    calls.clear()
    _, report = reproduce.parse_args([*argv, "--report-only"])
    results, missing = reproduce.run_all(runs, report)
    assert calls == []
    assert [(r["model"], r["seed"], r["reused"]) for r in results] == [("tirg", 0, True)]
    assert [(m["model"], m["seed"], m["error"]) for m in missing] == [("tirg", 1, "not run")]


def test_finished_run_with_other_settings_is_an_error(tmp_path, fake_dataset, monkeypatch):
    base = [
        "--data",
        str(fake_dataset),
        "--models",
        "tirg",
        "--seeds",
        "1",
        "--in-process",
        "--out",
        str(tmp_path / "out"),
    ]
    _, args = reproduce.parse_args([*base, "--steps", "3"])
    monkeypatch.setattr(reproduce, "train_timed", fake_training([]))
    reproduce.run_all(reproduce.plan_runs(args, ["tirg"]), args)
    _, longer = reproduce.parse_args([*base, "--steps", "4"])
    with pytest.raises(reproduce.ReproduceError, match="train.steps: 3 -> 4"):
        reproduce.run_all(reproduce.plan_runs(longer, ["tirg"]), longer)


def test_failed_run_is_reported_and_others_kept(tmp_path, fake_dataset, monkeypatch, capsys):
    calls: list = []
    ok = fake_training(calls)

    def flaky(config):
        if config["model"]["name"] == "concat":
            raise FloatingPointError("loss is nan at step 2 on rank 0")
        return ok(config)

    monkeypatch.setattr(reproduce, "train_timed", flaky)
    out = tmp_path / "out"
    code = reproduce.main(
        [
            "--data",
            str(fake_dataset),
            "--models",
            "tirg,concat",
            "--seeds",
            "2",
            "--steps",
            "3",
            "--in-process",
            "--out",
            str(out),
        ]
    )
    assert code == 1
    assert "concat seed 0, concat seed 1" in capsys.readouterr().err
    payload = json.loads((out / "runs.json").read_text())
    assert [r["model"] for r in payload["runs"]] == ["tirg", "tirg"]
    assert [f["model"] for f in payload["settings"]["failures"]] == ["concat", "concat"]
    assert "FloatingPointError" in payload["settings"]["failures"][0]["error"]
    table = (out / "table.md").read_text()
    assert "| tirg | 2 | 3 | 10.5 ± 0.7 |" in table and "concat" not in table
    assert (out / "recalls.png").stat().st_size > 0


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--models", "tirg,no_such_model"], "unknown model(s) ['no_such_model']"),
        (["--seeds", "0"], "--seeds must be >= 1"),
        (["--first-seed", "-1"], "--first-seed must be >= 0"),
        (["--workers", "0"], "use --in-process"),
        (["--paper-scale", "--cpu-scale"], "not allowed with argument"),
        (["--steps", "0"], "--steps must be >= 1"),
    ],
)
def test_cli_argument_errors(tmp_path, fake_dataset, capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        reproduce.main(["--data", str(fake_dataset), "--out", str(tmp_path / "o"), *argv])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_missing_dataset_is_an_error(tmp_path, capsys):
    code = reproduce.main(
        [
            "--data",
            str(tmp_path / "nowhere"),
            "--models",
            "tirg",
            "--in-process",
            "--out",
            str(tmp_path / "o"),
        ]
    )
    assert code == 2
    assert "no manifest.json" in capsys.readouterr().err


def test_real_tiny_run_in_process(tmp_path):
    """One model x one seed through pipeline.train on a tiny generated CSS dataset."""
    from shards.css import CssConfig, generate_css

    data = tmp_path / "css"
    generate_css(
        data,
        CssConfig(
            train_scenes=6,
            test_scenes=3,
            mods_per_scene=2,
            mod_pool=40,
            image_size=32,
            shard_size=20,
        ),
        workers=1,
    )
    out = tmp_path / "out"
    argv = [
        "--data",
        str(data),
        "--models",
        "image_only",
        "--seeds",
        "1",
        "--steps",
        "2",
        "--in-process",
        "--cpu-scale",
        "--out",
        str(out),
        "--set",
        "train.batch_size=4",
        "--set",
        "model.embed_dim=16",
        "--set",
        "train.threads=1",
    ]
    assert reproduce.main(argv) == 0
    payload = json.loads((out / "runs.json").read_text())
    (run,) = payload["runs"]
    assert run["model"] == "image_only" and run["wall_s"] > 0 and not run["reused"]
    assert 0.0 <= run["metrics"]["R@1"] <= 100.0 and run["metrics"]["step"] == 2
    stored = yaml.safe_load((out / "runs" / "image_only" / "seed0" / "config.yaml").read_text())
    assert stored["train"]["steps"] == 2 and stored["model"]["embed_dim"] == 16
    assert reproduce.main(argv) == 0  # resumes: the finished run is reused
    assert json.loads((out / "runs.json").read_text())["runs"][0]["reused"] is True


def test_difficulty_of_a_rendered_dataset_and_of_a_plan(tmp_path, capsys):
    """``--data`` reads a rendered dataset's labels, ``--plan`` a preset's plan; the
    medium preset's ceilings are the ones docs/reproduce.md states."""
    from bench import reproduce_difficulty
    from shards.css import CssConfig, generate_css

    data = tmp_path / "css"
    generate_css(
        data,
        CssConfig(train_scenes=2, test_scenes=6, mods_per_scene=3, mod_pool=30, image_size=16),
        workers=1,
    )
    assert reproduce_difficulty.main(["--data", str(data), "--json", str(tmp_path / "d.json")]) == 0
    assert "image oracle" in capsys.readouterr().out
    assert json.loads((tmp_path / "d.json").read_text())
    assert reproduce_difficulty.main(["--plan", "medium", "--json", str(tmp_path / "m.json")]) == 0
    medium = json.loads((tmp_path / "m.json").read_text())
    assert round(medium["image oracle"]["all"]["R@1"], 1) == 16.6
    assert round(medium["text oracle"]["all"]["R@1"], 1) == 3.1


def test_expected_recall_with_random_ties_is_exact():
    from bench.reproduce_difficulty import expected_recalls

    scores = np.array([2.0, 1.0, 1.0, 1.0, 0.0])
    hits = np.array([False, False, True, False, True])
    got = expected_recalls(scores, hits, (1, 2, 3, 4))
    # one non-hit above the best hit; the hit ties with two non-hits
    assert got == pytest.approx({1: 0.0, 2: 1 / 3, 3: 2 / 3, 4: 1.0})
    assert expected_recalls(scores, np.zeros(5, dtype=bool), (1,)) == {1: 0.0}


def test_oracle_ceilings_on_a_hand_made_gallery():
    from bench.reproduce_difficulty import ceilings, object_row

    def obj(shape, color, size, row, col):
        return {"shape": shape, "color": color, "size": size, "pos": [row, col]}

    ref = [obj("circle", "red", "small", 0, 0)]
    target = [*ref, obj("triangle", "blue", "large", 1, 1)]
    other = [obj("triangle", "blue", "large", 1, 1), obj("rectangle", "gray", "small", 2, 2)]
    far = [obj("rectangle", "green", "large", 0, 2)]
    scenes = {"ref": ref, "tgt": target, "other": other, "far": far}
    ids = list(scenes)
    objects = np.stack([object_row(s) for s in scenes.values()])
    add = {
        "type": "add",
        "object": {"shape": "triangle", "color": "blue", "size": "large", "pos": [1, 1]},
    }
    result = ceilings(
        ids, objects, [{"ref_id": "ref", "target_ids": ["tgt"], "mod": add}], ks=(1, 2)
    )
    assert result["image oracle"]["all"]["R@1"] == pytest.approx(100.0)  # 1 object differs
    assert result["text oracle"]["add"]["R@1"] == pytest.approx(50.0)  # tgt and other fit
    assert result["text oracle"]["add"]["R@2"] == pytest.approx(100.0)
    assert result["chance"]["all"]["R@1"] == pytest.approx(100 / 3)


# A stand-in for `bench.reproduce --in-process --parallel K`: the same pool, one worker
# busy with a long run; prints the worker's pid, then waits to be killed.
POOL_PARENT = """
import multiprocessing, os, sys, time
from concurrent.futures import ProcessPoolExecutor
from bench.reproduce import exit_with_parent

pool = ProcessPoolExecutor(
    1,
    mp_context=multiprocessing.get_context("spawn"),
    initializer=exit_with_parent,
    initargs=(os.getpid(), 0.1),
)
print(pool.submit(os.getpid).result(), flush=True)
pool.submit(time.sleep, 120)
time.sleep(120)
"""


def process_running(pid: int) -> bool:
    """Whether ``pid`` exists and is not a zombie waiting to be reaped."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads process states from /proc")
def test_pool_workers_end_when_the_bench_process_is_killed():
    """A killed reproduction leaves no run training on as an orphan (it would hold the
    cores the next invocation's runs are timed on)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    root = Path(__file__).resolve().parent.parent
    parent = subprocess.Popen(
        [sys.executable, "-c", POOL_PARENT], cwd=root, stdout=subprocess.PIPE, text=True
    )
    try:
        worker = int(parent.stdout.readline())
        assert process_running(worker)
        parent.send_signal(signal.SIGKILL)
        parent.wait(timeout=10)
        deadline = time.monotonic() + 20
        while process_running(worker) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not process_running(worker), "the pool worker outlived its killed parent"
    finally:
        parent.kill()
        if "worker" in locals() and process_running(worker):
            os.kill(worker, signal.SIGKILL)


def test_sigterm_ends_reproduce_through_its_cleanup():
    with pytest.raises(SystemExit) as stop:
        reproduce.exit_on_sigterm(15, None)
    assert stop.value.code == 143

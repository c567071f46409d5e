"""``bench/gpu_suite.sh`` runs every stage's command line at tiny sizes on the CPU
(``SMOKE=1``) and writes the files a lent device returns: a stage that breaks there
costs device time that no session can get back. Its time budget skips stages, with
a message and exit code 1, when it runs out."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SUITE = REPO / "bench" / "gpu_suite.sh"
RETURNED = {
    "train_throughput_64.json",
    "train_throughput_224.json",
    "eval_speed.json",
    "reproduce.log.gz",
    "reproduce_table.md",
    "reproduce_runs.json",
    "reproduce_recalls.png",
    "serve_latency.json",
}


def run_suite(tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    settings = {
        **os.environ,
        "SMOKE": "1",
        "OUT": str(tmp_path / "out"),
        "WORK": str(tmp_path / "work"),
        "PYTHON": sys.executable,
        **env,
    }
    return subprocess.run(
        ["bash", str(SUITE)], cwd=REPO, env=settings, capture_output=True, text=True, timeout=900
    )


def test_every_stage_runs_and_writes_what_the_device_returns(tmp_path):
    result = run_suite(tmp_path, STAGES="gputests throughput eval reproduce serve export")
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "every stage ran" in result.stdout
    # at most 8 files come back from a device call: exactly these
    assert {p.name for p in (tmp_path / "out").iterdir()} == RETURNED
    for name in ("train_throughput_64.json", "train_throughput_224.json"):
        rows = json.loads((tmp_path / "out" / name).read_text())["rows"]
        assert {r["path"] for r in rows} == {
            "eager-stream",
            "eager-cache",
            "graph-stream",
            "graph-cache",
        }
    formats = json.loads((tmp_path / "out" / "train_throughput_224.json").read_text())["rows"]
    assert {r["image_format"] for r in formats} == {"jpg"}
    assert {r["model"] for r in formats} == {"tirg", "ccnet"}
    runs = json.loads((tmp_path / "out" / "reproduce_runs.json").read_text())
    assert sorted(r["model"] for r in runs["runs"]) == ["text_only", "tirg"]
    assert "gputests: skipped on the CPU" in result.stdout
    for stage in ("training throughput", "evaluation at", "CSS reproduction:", "serving", "export"):
        assert f" s] {stage}" in result.stdout, stage


def test_a_spent_budget_skips_stages_and_fails(tmp_path):
    result = run_suite(tmp_path, SUITE_SECONDS="3", STAGES="eval serve")
    assert result.returncode == 1
    assert "eval: skipped" in result.stdout and "serve: skipped" in result.stdout
    assert "failed stages:" in result.stdout and "eval (no time left)" in result.stdout
    assert not (tmp_path / "out" / "eval_speed.json").exists()

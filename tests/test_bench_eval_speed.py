"""``bench.eval_speed`` runs its pass on the CPU at a tiny size and writes its JSON row
(the GPU suite runs it at Fashion200k's size; a crash there would cost device time)."""

from __future__ import annotations

import json

import pytest

from bench import eval_speed


def test_a_tiny_pass_writes_its_row(tmp_path, capsys):
    out = tmp_path / "eval_speed.json"
    argv = ["--gallery", "40", "--queries", "30", "--image-size", "32", "--embed-dim", "16"]
    assert eval_speed.main([*argv, "--repeats", "1", "--threads", "1", "--out", str(out)]) == 0
    row = json.loads(out.read_text())
    assert (row["gallery"], row["queries"], row["image_size"], row["amp"]) == (40, 30, 32, False)
    phases = row["seconds"]
    assert set(phases) == {"gallery_embedding", "compose_and_rank", "recalls", "total"}
    assert phases["total"] == pytest.approx(sum(v for k, v in phases.items() if k != "total"))
    assert row["target_s_h200"] is None  # only the Fashion200k size has the target
    assert 0.0 <= row["R@1_random_model"] <= 100.0
    assert "compose_and_rank" in capsys.readouterr().out


def test_bad_sizes_are_refused(capsys):
    with pytest.raises(SystemExit):
        eval_speed.main(["--queries", "0"])
    assert "--queries must be >= 1" in capsys.readouterr().err

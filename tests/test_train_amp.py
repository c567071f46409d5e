"""``train.amp_on_cpu``: bf16 autocast on a CPU run only where the CPU has native bf16.
Elsewhere oneDNN cannot build a bf16 LSTM at all, so such a run trains in float32 and
one log line says why (found on a Zen 3 host running ``bench.reproduce
--cpu-paper-scale``, which crashed in the text encoder's first forward)."""

from __future__ import annotations

import logging

import pytest
import torch
from shard_fixtures import write_dataset
from train_fixtures import final_weights, tiny_config

import pipeline.loop as loop
from pipeline.distributed import LocalContext
from pipeline.loop import build_run

torch.set_num_threads(1)
WARNING = "train.amp_on_cpu: this CPU has no native bf16 (AVX-512 BF16 / AMX); training in float32"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("amp") / "ds", explicit_groups=7)


def amp_config(dataset, out, amp_on_cpu: bool) -> dict:
    return tiny_config(
        dataset,
        out,
        "train.amp=true",
        f"train.amp_on_cpu={str(amp_on_cpu).lower()}",
        "train.checkpoint_every=0",
        "eval.at_end=false",
    )


def test_without_native_bf16_the_run_trains_float32_and_says_why(
    dataset, tmp_path, monkeypatch, caplog
):
    monkeypatch.setattr(loop, "cpu_bf16_supported", lambda: False)
    with caplog.at_level(logging.WARNING, logger="pipeline.loop"):
        asked = final_weights(amp_config(dataset, tmp_path / "asked", amp_on_cpu=True))
    assert [r.getMessage() for r in caplog.records if "amp_on_cpu" in r.getMessage()] == [WARNING]
    float32 = final_weights(amp_config(dataset, tmp_path / "fp32", amp_on_cpu=False))
    assert asked.keys() == float32.keys()
    for name, tensor in asked.items():
        assert torch.equal(tensor, float32[name]), name


@pytest.mark.parametrize(
    ("supported", "amp_on_cpu", "expected"),
    [
        (True, True, True),
        (True, False, False),
        (False, True, False),
        (False, False, False),
    ],
)
def test_bf16_autocast_only_where_asked_and_native(
    dataset, tmp_path, monkeypatch, caplog, supported, amp_on_cpu, expected
):
    monkeypatch.setattr(loop, "cpu_bf16_supported", lambda: supported)
    config = amp_config(dataset, tmp_path / "run", amp_on_cpu=amp_on_cpu)
    with caplog.at_level(logging.WARNING, logger="pipeline.loop"):
        run = build_run(config, LocalContext(tmp_path / "ray", "amp"), None, None)
    if expected:
        assert isinstance(run.autocast, torch.autocast)
        assert run.autocast.fast_dtype == torch.bfloat16
    else:
        assert not isinstance(run.autocast, torch.autocast)
    warned = [r for r in caplog.records if "amp_on_cpu" in r.getMessage()]
    assert len(warned) == (1 if amp_on_cpu and not supported else 0)

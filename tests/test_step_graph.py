"""``train.step_graph``: a CPU run falls back to eager with one line that says why, and
the graph step's bookkeeping (warm-up, static buffers, text-length buckets, LR
re-captures, capture failures) trains the weights eager steps train. The CUDA capture
itself needs a GPU (``bench/train_throughput.py`` measures it there)."""

from __future__ import annotations

import logging

import pytest
import torch
from shard_fixtures import write_dataset
from train_fixtures import final_weights, tiny_config

import pipeline.step_graph as step_graph
from pipeline.loop import train_loop

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("graph") / "ds", explicit_groups=7)


class DirectCapture:
    """A CPU stand-in for ``cuda_capture``: capturing runs nothing (as on CUDA); each
    replay runs the step on the static inputs and writes the static outputs in place."""

    def __init__(self, fail: bool = False):
        self.captures, self.replays, self.fail = 0, 0, fail

    def __call__(self, fn, static_inputs):
        if self.fail:
            raise RuntimeError("operation not permitted when stream is capturing\nmore")
        self.captures += 1
        loss, logs = torch.zeros(()), {}

        def replay():
            self.replays += 1
            new_loss, new_logs = fn(*static_inputs)
            loss.copy_(new_loss)
            logs.clear()
            logs.update(new_logs)

        return replay, (loss, logs)


def test_a_cpu_run_asked_for_a_graph_runs_eagerly_and_says_why(dataset, tmp_path, caplog):
    config = tiny_config(dataset, tmp_path / "run", "train.step_graph=true", "eval.at_end=false")
    with caplog.at_level(logging.INFO, logger="pipeline.loop"):
        metrics = train_loop(config)
    assert metrics["step"] == 8
    lines = [r.getMessage() for r in caplog.records if "train.step_graph" in r.getMessage()]
    assert lines == [
        "train.step_graph: eager steps (the device is cpu: CUDA graphs need a CUDA device)"
    ]


# SGD (the paper's optimiser) keeps a rounding-level difference at rounding level, so
# eager and graph weights must agree to float32 noise. Adam does not: its per-element
# step lr * m / (sqrt(v) + eps) turns a one-ulp gradient difference on an element whose
# gradient is near zero into a step of up to ~lr. Measured with oneDNN limited to AVX2
# (ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2, as on a Zen 3 host): the LSTM over
# text padded to 8 tokens rounds differently from the eager batch's length, the first
# difference appears at step 8 (SGD: 6e-8 on any weight; Adam: 9.4e-5 on one element of
# text_encoder.fc.1.bias) and at step 9 Adam's is 3.7e-4 = 0.37 lr. On AVX-512 both
# runs are bit-identical. So Adam is held to one step's size: a wrong LR, a stale static
# buffer or a missed step moves every weight by about lr per step.
@pytest.mark.parametrize(
    "optimizer, schedule", [("sgd", "constant"), ("sgd", "step"), ("adam", "constant")]
)
def test_graph_steps_train_the_weights_eager_steps_train(
    dataset, tmp_path, monkeypatch, optimizer, schedule
):
    """Same seed: eager vs the graph bookkeeping (3 eager warm-up steps, then replays
    over static buffers with text padded to 8 tokens); a step decay re-captures."""
    lr = 1e-2 if optimizer == "sgd" else 1e-3
    common = (
        "eval.at_end=false",
        "train.steps=9",
        "train.checkpoint_every=0",
        f"optim.name={optimizer}",
        f"optim.lr={lr}",
        f"optim.schedule={schedule}",
        "optim.decay_steps=2",
        "optim.gamma=0.5",
    )
    eager = final_weights(
        tiny_config(dataset, tmp_path / "eager", "train.step_graph=false", *common)
    )
    capture = DirectCapture()
    monkeypatch.setattr(step_graph, "graph_unsupported", lambda *args: None)
    monkeypatch.setattr(step_graph, "cuda_capture", capture)
    graphed = final_weights(tiny_config(dataset, tmp_path / "graph", *common))
    assert capture.replays == 9 - step_graph.WARMUP_STEPS
    assert capture.captures >= 1
    if schedule == "step":  # the LR halves every 2 steps: each change re-captures
        assert capture.captures >= 2
    tolerance = {"rtol": 1e-4, "atol": 1e-5} if optimizer == "sgd" else {"rtol": 0, "atol": lr}
    assert graphed.keys() == eager.keys()
    for name in eager:
        torch.testing.assert_close(
            graphed[name], eager[name], **tolerance, msg=lambda detail, n=name: f"{n}: {detail}"
        )


def test_a_failed_capture_makes_the_run_eager_with_one_line(dataset, tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(step_graph, "graph_unsupported", lambda *args: None)
    monkeypatch.setattr(step_graph, "cuda_capture", DirectCapture(fail=True))
    config = tiny_config(dataset, tmp_path / "run", "eval.at_end=false")
    with caplog.at_level(logging.WARNING, logger="pipeline.loop"):
        assert train_loop(config)["step"] == 8
    lines = [r.getMessage() for r in caplog.records if "train.step_graph" in r.getMessage()]
    assert lines == [
        "train.step_graph: eager from here on: capture failed: "
        "operation not permitted when stream is capturing"
    ]


def test_padded_length_buckets():
    assert [step_graph.padded_length(n, 40) for n in (1, 8, 9, 17, 39, 40)] == [
        8,
        8,
        16,
        24,
        40,
        40,
    ]
    assert step_graph.padded_length(50, None) == 56
    assert step_graph.graph_unsupported(torch.device("cpu"), 1, "auto").startswith(
        "the device is cpu"
    )
    assert step_graph.graph_unsupported(torch.device("cuda"), 2, True).startswith("DDP over 2")
    assert step_graph.graph_unsupported(torch.device("cuda"), 1, False) == "train.step_graph=false"
    assert step_graph.graph_unsupported(torch.device("cuda"), 1, "auto") is None

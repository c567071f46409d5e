"""The whole training step as a CUDA graph, on a GPU (skipped without CUDA): for every
registered model the step is captured (no eager fallback) and trains the weights that
eager steps train. ``tests/test_step_graph.py`` checks the bookkeeping on the CPU; this
checks the capture itself, which only CUDA has. ``bench/gpu_suite.sh`` runs it first
(stage ``gputests``) so that its throughput figures are of a step known to be right."""

from __future__ import annotations

import logging

import pytest
import torch
from shard_fixtures import write_dataset
from train_fixtures import final_weights, tiny_config

from pipeline.models import accepted_kwargs, list_models, size_kwarg

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("graph-gpu") / "ds", explicit_groups=7)


def gpu_config(dataset, out, name: str, graph: bool) -> dict:
    """A tiny CUDA run of ``name`` with SGD at a constant LR, float32 and no dropout:
    dropout masks come from the CUDA generator in another order under replay, so only
    a run without them can be compared weight for weight."""
    config = tiny_config(
        dataset,
        out,
        "train.use_gpu=true",
        f"train.step_graph={'true' if graph else 'false'}",
        "train.steps=9",
        "train.checkpoint_every=0",
        "eval.at_end=false",
        "optim.name=sgd",
        "optim.lr=1e-2",
        "optim.schedule=constant",
        "loss.name=batch_classification",
        model=name,
    )
    config["model"].pop("embed_dim", None)
    config["model"][size_kwarg(name)] = 32
    for key in accepted_kwargs(name):
        if key.endswith("dropout"):
            config["model"][key] = 0.0
    return config


@pytest.mark.parametrize("name", list_models())
def test_every_model_trains_as_one_cuda_graph(dataset, tmp_path, caplog, name):
    eager = final_weights(gpu_config(dataset, tmp_path / "eager", name, graph=False))
    with caplog.at_level(logging.INFO, logger="pipeline.loop"):
        graphed = final_weights(gpu_config(dataset, tmp_path / "graph", name, graph=True))
    lines = [r.getMessage() for r in caplog.records if "train.step_graph" in r.getMessage()]
    assert not [line for line in lines if "eager" in line and "warm-up" not in line], lines
    assert any("captured the training step" in line for line in lines), lines
    for key in eager:
        torch.testing.assert_close(
            graphed[key].float(),
            eager[key].float(),
            rtol=1e-3,
            atol=1e-4,
            msg=lambda detail, k=key: f"{name} {k}: {detail}",
        )

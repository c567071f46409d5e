"""Recall parity: the exported graphs must rank a dataset exactly as the checkpoint does.

``verify_recall`` runs ``pipeline.evaluate.evaluate_model`` twice over the same gallery
and queries: once with the PyTorch model, once with ``RuntimeModule`` -- the ONNX Runtime
graphs of ``export.runtime`` behind the model's tuple API -- and requires every
reported recall to be equal.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from export.artifacts import Artifacts, load_artifacts
from export.runtime import open_runtime
from export.runtime.model_api import RuntimeModule

log = logging.getLogger(__name__)


class RecallMismatch(AssertionError):
    """ONNX Runtime's recalls differ from the checkpoint's."""


def recall_keys(metrics: dict[str, Any]) -> list[str]:
    """The numeric results of an evaluation (recalls and score, not counts or labels)."""
    return [k for k, v in metrics.items() if isinstance(v, float) and k not in ("queries",)]


def different_recalls(reference: dict[str, Any], exported: dict[str, Any]) -> list[str]:
    """Keys of the reference's recalls that the exported run does not reproduce exactly."""
    return [
        k
        for k in recall_keys(reference)
        if not math.isclose(reference[k], exported.get(k, math.nan), rel_tol=0, abs_tol=1e-9)
    ]


def evaluate_exported(
    model: nn.Module,
    arts: Artifacts,
    data: str | Path,
    *,
    eval_set: str | None = None,
    image_size: int | None = None,
    batch_size: int = 64,
) -> dict[str, Any]:
    """``pipeline.evaluate.evaluate_model`` of ``model`` (the checkpoint's, or a runtime
    behind ``RuntimeModule``) on ``data`` with the export's preprocessing, on the CPU."""
    from pipeline.evaluate import evaluate_model

    pre = arts.preprocess
    with torch.inference_mode():
        return evaluate_model(
            model,
            arts.vocab,
            data,
            eval_name=eval_set,
            image_size=image_size or int(pre["crop"]),
            mean=pre["mean"],
            std=pre["std"],
            batch_size=batch_size,
            device="cpu",
        )


def verify_recall(
    model: nn.Module,
    art_dir: str | Path,
    data: str | Path,
    *,
    eval_set: str | None = None,
    image_size: int | None = None,
    batch_size: int = 64,
    threads: int = 0,
) -> dict[str, dict[str, float]]:
    """Evaluate ``data`` with ``model`` and with the ONNX graphs of ``art_dir``; raise
    ``RecallMismatch`` unless every recall is equal. Returns both metric dicts."""
    arts = load_artifacts(art_dir)
    runtime = open_runtime(arts, "onnxruntime", "cpu", threads=threads)
    common = dict(eval_set=eval_set, image_size=image_size, batch_size=batch_size)
    reference = evaluate_exported(model, arts, data, **common)
    exported = evaluate_exported(RuntimeModule(runtime), arts, data, **common)
    keys = recall_keys(reference)
    different = different_recalls(reference, exported)
    torch_recalls = {k: reference[k] for k in keys}
    ort_recalls = {k: exported[k] for k in keys}
    log.info("recall torch %s | onnxruntime %s", torch_recalls, ort_recalls)
    if different:
        detail = ", ".join(
            f"{k}: torch {reference[k]:.3f} vs onnxruntime {exported[k]:.3f}" for k in different
        )
        raise RecallMismatch(
            f"{art_dir}: ONNX Runtime recalls differ from the checkpoint's on {data}: {detail}"
        )
    return {
        "data": str(data),
        "eval": reference.get("eval"),
        "torch": torch_recalls,
        "onnxruntime": ort_recalls,
    }

"""The one runtime of exported models: torch, ONNX Runtime and TensorRT behind one
torch-tensor API (``export.runtime.base``). Export verification, evaluation through ONNX,
the gallery index, the query engine and the benches all open models here.

    runtime = open_runtime("artifacts/css_tirg", "onnxruntime", device="cpu")
    query = runtime.query(images, *runtime.tokenize(["make it red"]))   # (B, D)

Backends: ``torch`` (``ART_DIR/checkpoint.pt``; CUDA graphs on a GPU), ``onnxruntime``
(IO-bound to torch tensors; CUDA provider with onnxruntime-gpu) and ``tensorrt``
(engines of ``python -m export.trt``, ``fp16=True`` for FP16 engines; GPU only).
``precision_options`` turns a command line's ``--precision`` into those options.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from export.artifacts import Artifacts, load_artifacts
from export.runtime.base import BACKENDS, PRECISIONS, ExportedGraphs, GraphRuntime, Reprs

__all__ = [
    "BACKENDS",
    "PRECISIONS",
    "ExportedGraphs",
    "GraphRuntime",
    "Reprs",
    "open_runtime",
    "precision_options",
]


def precision_options(backend: str, precision: str | None) -> dict[str, Any]:
    """``open_runtime`` options that select ``precision`` (None: the backend's default);
    ValueError naming the backend's precisions for one it does not have."""
    allowed = PRECISIONS.get(backend)
    if allowed is None:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    if precision is None:
        return {}
    if precision not in allowed:
        raise ValueError(
            f"precision {precision} is not one of backend {backend}'s ({', '.join(allowed)})"
        )
    if backend == "tensorrt":
        return {"fp16": precision == "fp16"}
    if backend == "onnxruntime":
        return {"precision": precision}
    return {}


def open_runtime(
    artifacts: Artifacts | str | Path,
    backend: str = "onnxruntime",
    device: str | torch.device = "cpu",
    **options: Any,
) -> GraphRuntime:
    """The ``backend`` runtime over one artifact directory (or its loaded ``Artifacts``).

    ``options``: ``cuda_graphs`` (torch), ``threads`` and ``precision`` (onnxruntime:
    ``"int8"`` for the graphs of ``export.int8``), ``fp16`` (tensorrt).
    """
    if not isinstance(artifacts, Artifacts):
        artifacts = load_artifacts(artifacts)
    if backend == "torch":
        from export.runtime.torch_model import TorchModel

        return TorchModel(artifacts, device, **options)
    if backend == "onnxruntime":
        from export.runtime.onnxruntime_graphs import OnnxRuntimeGraphs

        return OnnxRuntimeGraphs(artifacts, device, **options)
    if backend == "tensorrt":
        from export.runtime.tensorrt_engines import TensorRTEngines

        return TensorRTEngines(artifacts, device, **options)
    raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")

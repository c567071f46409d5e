"""The one runtime of exported models: torch, ONNX Runtime and TensorRT behind one
torch-tensor API (``export.runtime.base``). Export verification, evaluation through ONNX,
the gallery index, the query engine and the benches all open models here.

    runtime = open_runtime("artifacts/css_tirg", "onnxruntime", device="cpu")
    query = runtime.query(images, *runtime.tokenize(["make it red"]))   # (B, D)

Backends: ``torch`` (``ART_DIR/checkpoint.pt``; CUDA graphs on a GPU), ``onnxruntime``
(IO-bound to torch tensors; CUDA provider with onnxruntime-gpu) and ``tensorrt``
(engines of ``python -m export.trt``, ``fp16=True`` for FP16 engines; GPU only).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from export.artifacts import Artifacts, load_artifacts
from export.runtime.base import BACKENDS, ExportedGraphs, GraphRuntime, Reprs

__all__ = ["BACKENDS", "ExportedGraphs", "GraphRuntime", "Reprs", "open_runtime"]


def open_runtime(
    artifacts: Artifacts | str | Path,
    backend: str = "onnxruntime",
    device: str | torch.device = "cpu",
    **options: Any,
) -> GraphRuntime:
    """The ``backend`` runtime over one artifact directory (or its loaded ``Artifacts``).

    ``options``: ``cuda_graphs`` (torch), ``threads`` (onnxruntime), ``fp16`` (tensorrt).
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

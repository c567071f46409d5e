"""TensorRT engines of an artifact directory: the module, names and the listing.

``ART_DIR/engines/`` holds one engine per graph, TensorRT version, GPU and precision,
named ``<graph>.trt<version>.sm<major><minor>.<sha256[:12] of the parsed ONNX>[.fp16]
.engine``, and ``engines.json`` listing them with their parity figures. ``export.trt``
builds and records engines; ``export.runtime.tensorrt_engines`` finds and runs them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from export.artifacts import ArtifactError

ENGINE_DIR = "engines"
ENGINES_FILE = "engines.json"
TIMING_CACHE_FILE = "timing.cache"
EXIT_NO_TENSORRT = 3
INSTALL_HINT = (
    "TensorRT is not installed: install the Python package with "
    "`pip install tensorrt-cu12` (or `pip install tensorrt --extra-index-url https://pypi.nvidia.com`),"
    " or run inside NVIDIA's NGC TensorRT container (nvcr.io/nvidia/tensorrt); "
    "it also needs an NVIDIA GPU with a CUDA driver"
)


class TensorRTUnavailable(RuntimeError):
    """TensorRT (or a CUDA GPU for it) is missing on this machine."""


class EngineBuildError(RuntimeError):
    """TensorRT refused to parse, build or deserialize an engine."""


def import_tensorrt():
    """The ``tensorrt`` module, or ``TensorRTUnavailable`` with install instructions."""
    try:
        import tensorrt
    except ImportError as err:
        raise TensorRTUnavailable(INSTALL_HINT) from err
    return tensorrt


def trt_major(trt) -> int:
    return int(str(trt.__version__).split(".")[0])


def engine_file_name(
    graph: str,
    trt_version: str,
    compute_capability: tuple[int, int],
    onnx_sha: str,
    fp16: bool = False,
) -> str:
    """``<graph>.trt<version>.sm<major><minor>.<sha12>[.fp16].engine`` (artifacts layout)."""
    major, minor = compute_capability
    precision = ".fp16" if fp16 else ""
    return f"{graph}.trt{trt_version}.sm{major}{minor}.{onnx_sha[:12]}{precision}.engine"


def cuda_compute_capability(device: int = 0) -> tuple[int, int]:
    import torch

    if not torch.cuda.is_available():
        raise TensorRTUnavailable(
            "TensorRT engines need an NVIDIA GPU, and torch sees no CUDA device on this machine"
        )
    return tuple(torch.cuda.get_device_capability(device))


def read_engine_listing(art_dir: Path) -> dict[str, Any]:
    path = Path(art_dir) / ENGINE_DIR / ENGINES_FILE
    if not path.is_file():
        return {"engines": []}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ArtifactError(f"{path}: not valid JSON ({err})") from err


def find_engine(
    listing: dict[str, Any], graph: str, trt_version: str, cc: tuple[int, int], fp16: bool
) -> dict[str, Any] | None:
    for entry in listing["engines"]:
        if (
            entry["graph"] == graph
            and entry["tensorrt"] == trt_version
            and tuple(entry["compute_capability"]) == tuple(cc)
            and entry["precision"] == ("fp16" if fp16 else "fp32")
        ):
            return entry
    return None


def record_engine(listing: dict[str, Any], entry: dict[str, Any]) -> dict[str, Any]:
    """Listing with ``entry`` replacing any engine of the same graph/version/GPU/precision."""
    key = (
        entry["graph"],
        entry["tensorrt"],
        tuple(entry["compute_capability"]),
        entry["precision"],
    )
    kept = [
        e
        for e in listing["engines"]
        if (e["graph"], e["tensorrt"], tuple(e["compute_capability"]), e["precision"]) != key
    ]
    return {"engines": kept + [entry]}

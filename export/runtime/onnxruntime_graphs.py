"""The exported graphs in ONNX Runtime, bound to torch tensors (no numpy round trips).

Every input and output is bound with IO binding to a torch tensor's memory: on a GPU
(CUDA provider, onnxruntime-gpu) the tensors stay on the device, on the CPU no copy is
made either. Outputs are allocated by the runtime at the shapes ``artifacts.json``
declares, so ONNX Runtime writes straight into them.

Threads: all sessions of the process share one intra-op thread pool
(``ort_session``). With a pool per session, five sessions on two cores each kept their
workers spinning after a run, and the next graph waited for them: the query path took
51 ms while its image encoder alone took 20 (bench/export_latency.py, 2-core VM).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from export.artifacts import ArtifactError, Artifacts, GraphSpec
from export.int8_listing import int8_graph_files
from export.runtime.base import PRECISIONS, TORCH_DTYPES, ExportedGraphs, Reprs
from pipeline.checkpoint import sha256_mismatch

log = logging.getLogger(__name__)

# ONNX Runtime's type strings for the dtypes artifacts.json records.
ORT_TYPES = {"float32": "tensor(float)", "int64": "tensor(int64)", "float16": "tensor(float16)"}
_POOL: dict[str, int] = {}  # the process-wide thread pool's size, once sessions exist


def ort_session(
    path: str | Path, providers: Sequence[Any] = ("CPUExecutionProvider",), threads: int = 0
):
    """An ``onnxruntime.InferenceSession`` on the process-wide intra-op thread pool.

    Every session of this project is made here: once one uses the global pool, ONNX
    Runtime refuses sessions with pools of their own. ``threads`` sizes the pool when the
    first session is made (0: ONNX Runtime's default, all cores); later values are
    ignored, with a log line when they differ.
    """
    import onnxruntime as ort

    if not _POOL:
        from onnxruntime.capi import _pybind_state

        try:
            _pybind_state.set_global_thread_pool_sizes(int(threads), 1)
            _POOL.update(mode="global", threads=int(threads))
        except RuntimeError:  # an environment without a global pool exists already
            _POOL.update(mode="session", threads=int(threads))
    elif int(threads) != _POOL["threads"]:
        log.debug(
            "ONNX Runtime's thread pool has %s threads for the whole process; %s asked",
            _POOL["threads"] or "default",
            threads,
        )
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if _POOL["mode"] == "global":
        options.use_per_session_threads = False
    else:  # pools of their own must not spin after a run (they starve the next graph)
        options.intra_op_num_threads = int(threads)
        options.inter_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=list(providers))


def ort_providers(device: torch.device) -> list[Any]:
    """The providers for ``device``: CUDA (onnxruntime-gpu) on a GPU, else CPU."""
    import onnxruntime as ort

    if device.type != "cuda":
        return ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        raise RuntimeError(
            "backend onnxruntime on a CUDA device needs onnxruntime-gpu "
            "(pip install 'composed-retrieval[gpu]'); this onnxruntime has "
            f"{ort.get_available_providers()}"
        )
    return [("CUDAExecutionProvider", {"device_id": device.index or 0}), "CPUExecutionProvider"]


class OnnxRuntimeGraphs(ExportedGraphs):
    """One ONNX Runtime session per graph, inputs and outputs bound to torch tensors.

    ``threads`` sizes ONNX Runtime's intra-op pool (``ort_session``). ``precision``
    ``"int8"`` runs the graphs ``python -m export.int8`` quantized (``ART_DIR/int8/``,
    the image encoder) in place of their float32 files; the others stay float32.
    ``graph_files`` loads the named graphs from other files of the same interface
    (``export.int8`` checks a quantized graph this way before it lists it).
    """

    name = "onnxruntime"

    def __init__(
        self,
        artifacts: Artifacts,
        device: str | torch.device = "cpu",
        threads: int = 0,
        precision: str = "fp32",
        graph_files: Mapping[str, Path] | None = None,
    ):
        super().__init__(artifacts, device)
        if precision not in PRECISIONS["onnxruntime"]:
            raise ValueError(
                f"precision must be one of {PRECISIONS['onnxruntime']}, got {precision!r}"
            )
        providers = ort_providers(self.device)
        files = int8_graph_files(artifacts) if precision == "int8" else {}
        files.update(graph_files or {})
        self.sessions = {}
        for graph, spec in artifacts.graphs.items():
            if spec.sha256 and (problem := sha256_mismatch(spec.file, spec.sha256)):
                raise ArtifactError(problem)
            file = files.get(graph, spec.file)
            try:
                session = ort_session(file, providers, threads)
            except Exception as err:  # ORT raises its own exception types for bad files
                raise ArtifactError(f"{file}: ONNX Runtime cannot load it ({err})") from err
            check_session_io(session, spec)
            self.sessions[graph] = session
        self._device_type = "cuda" if self.device.type == "cuda" else "cpu"
        provider = "CUDA" if self._device_type == "cuda" else "CPU"
        swapped = (
            f", {', '.join(f'{g} from {f.parent.name}/{f.name}' for g, f in sorted(files.items()))}"
        )
        self.describe = f"onnxruntime ({provider} provider, {precision}{swapped if files else ''})"

    def _run(self, graph: str, feeds: Reprs) -> Reprs:
        spec = self.artifacts.graph(graph)
        binding = self.sessions[graph].io_binding()
        inputs = {}
        for name in spec.inputs:
            tensor = feeds[name].to(self.device, TORCH_DTYPES[spec.dtypes[name]]).contiguous()
            inputs[name] = tensor  # kept alive until the run returns
            self._bind(binding.bind_input, name, tensor)
        batch = next(iter(inputs.values())).shape[0]
        length = inputs["tokens"].shape[1] if "tokens" in inputs else _length_of(spec, inputs)
        outputs = {}
        for name in spec.outputs:
            shape = spec.shape(name, batch, length)
            outputs[name] = torch.empty(
                shape, dtype=TORCH_DTYPES[spec.dtypes[name]], device=self.device
            )
            self._bind(binding.bind_output, name, outputs[name])
        if self._device_type == "cuda":  # ORT runs on its own stream: inputs must be ready
            torch.cuda.current_stream(self.device).synchronize()
        self.sessions[graph].run_with_iobinding(binding)
        return {name: t.float() for name, t in outputs.items()}

    def _bind(self, bind, name: str, tensor: torch.Tensor) -> None:
        bind(
            name,
            self._device_type,
            self.device.index or 0,
            _NUMPY_DTYPES[tensor.dtype],
            tuple(tensor.shape),
            tensor.data_ptr(),
        )


_NUMPY_DTYPES = {torch.float32: np.float32, torch.float16: np.float16, torch.int64: np.int64}


def _length_of(spec: GraphSpec, inputs: Reprs) -> int:
    """The text length T of inputs with a ``length`` axis (1 when none has one)."""
    for name, shape in spec.inputs.items():
        if "length" in shape:
            return inputs[name].shape[shape.index("length")]
    return 1


def check_session_io(session, spec: GraphSpec) -> None:
    """Raise ``ArtifactError`` unless the graph's inputs/outputs are those of artifacts.json
    (names, ranks, element types, fixed dims)."""
    for kind, declared, actual in (
        ("inputs", spec.inputs, session.get_inputs()),
        ("outputs", spec.outputs, session.get_outputs()),
    ):
        names = {a.name: a for a in actual}
        if set(names) != set(declared):
            raise ArtifactError(
                f"{spec.file}: graph {kind} are {sorted(names)}, "
                f"artifacts.json expects {sorted(declared)}"
            )
        for name, shape in declared.items():
            arg = names[name]
            want_type = ORT_TYPES.get(spec.dtypes.get(name, "float32"))
            if arg.type != want_type:
                raise ArtifactError(
                    f"{spec.file}: {kind[:-1]} {name!r} has type {arg.type}, "
                    f"artifacts.json expects {want_type}"
                )
            if len(arg.shape) != len(shape) or any(
                isinstance(want, int) and got != want for got, want in zip(arg.shape, shape)
            ):
                raise ArtifactError(
                    f"{spec.file}: {kind[:-1]} {name!r} has shape {arg.shape}, "
                    f"artifacts.json expects {shape}"
                )

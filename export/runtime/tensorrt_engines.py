"""TensorRT engines (built by ``python -m export.trt``) bound to torch CUDA tensors.

Tensors are addressed by name (TensorRT 10/11: ``set_input_shape`` and
``set_tensor_address`` with the ``data_ptr()`` of torch tensors) and run with
``execute_async_v3`` on torch's current stream: inputs, outputs and the work all stay
on the GPU, ordered with the rest of torch's work on that stream, no host copies and no
synchronisation inside a call.
"""

from __future__ import annotations

import torch

from export.artifacts import ArtifactError, Artifacts
from export.engines import (
    ENGINE_DIR,
    EngineBuildError,
    cuda_compute_capability,
    find_engine,
    import_tensorrt,
    read_engine_listing,
)
from export.runtime.base import ExportedGraphs, Reprs


class EngineRunner:
    """One deserialized engine and its execution context: torch tensors in and out."""

    def __init__(self, trt, engine_bytes: bytes, name: str = "engine", logger=None, device="cuda"):
        self.trt = trt
        self.name = name
        self.device = torch.device(device)
        self.runtime = trt.Runtime(logger or trt.Logger(trt.Logger.WARNING))
        self.engine = self.runtime.deserialize_cuda_engine(engine_bytes)
        if self.engine is None:
            raise EngineBuildError(
                f"{name}: TensorRT could not deserialize the engine "
                "(built by another TensorRT version or for another GPU?)"
            )
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if n not in self.inputs]
        self.dtypes = {n: _torch_dtype(trt, self.engine.get_tensor_dtype(n)) for n in names}

    def __call__(self, feeds: Reprs) -> Reprs:
        """Run on torch's current stream; returns the outputs (ready in stream order)."""
        keep = []  # inputs converted here must outlive the asynchronous execution
        for name in self.inputs:
            tensor = feeds[name].to(self.device, self.dtypes[name]).contiguous()
            keep.append(tensor)
            self.context.set_input_shape(name, tuple(tensor.shape))
            self.context.set_tensor_address(name, tensor.data_ptr())
        outputs = {}
        for name in self.outputs:
            shape = tuple(self.context.get_tensor_shape(name))
            outputs[name] = torch.empty(shape, dtype=self.dtypes[name], device=self.device)
            self.context.set_tensor_address(name, outputs[name].data_ptr())
        stream = torch.cuda.current_stream(self.device)
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError(f"{self.name}: execute_async_v3 failed")
        for tensor in keep:  # the caching allocator must not reuse them before the run ends
            tensor.record_stream(stream)
        return outputs


def _torch_dtype(trt, dtype) -> torch.dtype:
    table = {
        trt.float32: torch.float32,
        trt.float16: torch.float16,
        trt.int32: torch.int32,
        trt.bool: torch.bool,
    }
    if hasattr(trt, "int64"):
        table[trt.int64] = torch.int64
    if dtype not in table:
        raise ArtifactError(f"engine tensor type {dtype} has no torch equivalent here")
    return table[dtype]


class TensorRTEngines(ExportedGraphs):
    """The engines of ``ART_DIR/engines`` for this TensorRT version and GPU, at the wanted
    precision (``fp16``; None: fp16 when the listing has fp16 engines for every graph,
    else fp32); ``ArtifactError`` names a missing engine and the command to build it."""

    name = "tensorrt"

    def __init__(
        self, artifacts: Artifacts, device: str | torch.device = "cuda", fp16: bool | None = None
    ):
        super().__init__(artifacts, device)
        if self.device.type != "cuda":
            raise RuntimeError(f"backend tensorrt needs a CUDA device, got {self.device}")
        trt = import_tensorrt()
        cc = cuda_compute_capability(self.device.index or 0)
        listing = read_engine_listing(artifacts.dir)
        if fp16 is None:  # the listing decides: fp16 when every graph has an fp16 engine
            fp16 = all(find_engine(listing, g, trt.__version__, cc, True) for g in artifacts.graphs)
        precision = "fp16" if fp16 else "fp32"
        self.runners = {}
        for graph in artifacts.graphs:
            entry = find_engine(listing, graph, trt.__version__, cc, fp16)
            if entry is None:
                raise ArtifactError(
                    f"{artifacts.dir / ENGINE_DIR}: no {precision} engine for graph {graph!r} "
                    f"built by TensorRT {trt.__version__} for sm{cc[0]}{cc[1]} (run `python -m "
                    f"export.trt --artifacts {artifacts.dir}{' --fp16' if fp16 else ''}`)"
                )
            path = artifacts.dir / ENGINE_DIR / entry["file"]
            self.runners[graph] = EngineRunner(
                trt, path.read_bytes(), str(path), device=self.device
            )
        self.describe = f"tensorrt {trt.__version__} ({precision})"

    def _run(self, graph: str, feeds: Reprs) -> Reprs:
        return {n: t.float() for n, t in self.runners[graph](feeds).items()}

"""Query-network backends of the engine: the exported model behind one torch-tensor API.

Shapes: B batch, T text length, D embedding size, S image side. Every backend offers::

    encode_image(images (B, 3, S, S) float32) -> {image repr name: (B, ...)}
    compose_query(image_repr, tokens (B, T) int64, lengths (B,) int64)
        -> (query (B, D) float32 unit rows, {text repr name: (B, ...)})
    correct(ref_repr, cand_repr, text_repr) -> (B,)      (models with a correction network)

Tensors come back on the engine's device, float32.

* ``torch``: ``ART_DIR/checkpoint.pt`` through ``pipeline.checkpoint.load_model``. On a
  GPU each network runs as a CUDA graph captured per batch bucket (1, 2, 4, ..., 64)
  and text-length bucket (8, 16, 32, 64): a batch is padded up to its bucket (copies
  of its first row; the LSTM text encoder reads the step at ``lengths - 1``, so pad
  tokens after a text never change it), copied into the graph's static inputs and
  replayed -- one launch instead of hundreds of small kernels. The query graphs are
  captured with cuDNN off: on the H100 (torch 2.11) the query graph's capture was
  invalidated, and its cuDNN LSTM is the likely culprit, while torch's own LSTM kernels
  are plain launches a graph can hold (not yet re-measured on a GPU). A
  capture that fails leaves that bucket and every later one eager (a failed capture can
  leave the graphs' shared memory pool in a state later captures trip over).
* ``onnxruntime``: ``export.runtime.OnnxRuntimeModel`` (CUDA provider on a GPU when
  onnxruntime-gpu is installed, else CPU).
* ``tensorrt``: ``export.trt.TensorRTModel`` (engines built by ``python -m export.trt``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)

Reprs = dict[str, torch.Tensor]
BACKENDS = ("torch", "onnxruntime", "tensorrt")
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
LENGTH_BUCKETS = (8, 16, 32, 64)


def create_backend(
    name: str, art_dir: str | Path, arts: dict[str, Any], device: torch.device, **options: Any
):
    """The backend called ``name`` over one artifact directory."""
    if name == "torch":
        return TorchBackend(art_dir, arts, device, **options)
    if name == "onnxruntime":
        return OnnxRuntimeBackend(art_dir, arts, device, **options)
    if name == "tensorrt":
        return TensorRTBackend(art_dir, arts, device, **options)
    raise ValueError(f"unknown backend {name!r}; expected one of {BACKENDS}")


def bucket(size: int, buckets: Sequence[int]) -> int | None:
    """Smallest bucket >= size, or None when size is larger than every bucket."""
    return next((b for b in buckets if b >= size), None)


class TorchBackend:
    """Eager torch model, with CUDA graphs per (batch, text length) bucket on a GPU."""

    name = "torch"

    def __init__(
        self,
        art_dir: str | Path,
        arts: dict[str, Any],
        device: torch.device,
        cuda_graphs: bool | None = None,
    ):
        from pipeline.checkpoint import load_model

        self.device = torch.device(device)
        self.model, _, _ = load_model(
            Path(art_dir) / arts["checkpoint"]["file"],
            device=self.device,
            expect_model=arts["model_name"],
            sha256=arts["checkpoint"]["sha256"],
        )
        self.image_repr_names = list(arts["image_repr_names"])
        self.text_repr_names = list(arts["text_repr_names"])
        self.max_text_len = int(arts["tokenizer"]["max_text_len"])
        self.image_size = int(arts["preprocess"]["crop"])
        self.cuda_graphs = self.device.type == "cuda" if cuda_graphs is None else bool(cuda_graphs)
        if self.cuda_graphs and self.device.type != "cuda":
            raise ValueError("cuda_graphs=True needs a CUDA device, got " + str(self.device))
        self.length_buckets = tuple(
            sorted({min(b, self.max_text_len) for b in LENGTH_BUCKETS} | {self.max_text_len})
        )
        if _text_repr_grows_with_length(arts):  # padding would change it: one graph per T
            self.length_buckets = tuple(range(1, self.max_text_len + 1))
        self._graphs: dict[tuple, CapturedGraph | None] = {}
        self._pool = torch.cuda.graph_pool_handle() if self.cuda_graphs else None
        self.describe = "torch eager" + (" + CUDA graphs" if self.cuda_graphs else "")

    # -- the three entry points ------------------------------------------------------------
    def encode_image(self, images: torch.Tensor) -> Reprs:
        images = images.to(self.device, torch.float32)
        out = self._run(("image", None), self._image_fn, [images])
        return dict(zip(self.image_repr_names, out))

    def compose_query(
        self, image_repr: Mapping[str, torch.Tensor], tokens: torch.Tensor, lengths: torch.Tensor
    ) -> tuple[torch.Tensor, Reprs]:
        reprs = [image_repr[n].to(self.device, torch.float32) for n in self.image_repr_names]
        tokens, lengths = tokens.to(self.device), lengths.to(self.device)
        length = bucket(tokens.shape[1], self.length_buckets) if self.cuda_graphs else None
        if length is not None and length > tokens.shape[1]:
            tokens = torch.nn.functional.pad(tokens, (0, length - tokens.shape[1]))
        out = self._run(("query", length), self._query_fn, [*reprs, tokens, lengths])
        return out[0], dict(zip(self.text_repr_names, out[1:]))

    def correct(
        self,
        ref_repr: Mapping[str, torch.Tensor],
        cand_repr: Mapping[str, torch.Tensor],
        text_repr: Mapping[str, torch.Tensor],
    ) -> torch.Tensor:
        with torch.inference_mode():
            return self.model.correct(
                self._tuple(ref_repr, self.image_repr_names),
                self._tuple(cand_repr, self.image_repr_names),
                self._tuple(text_repr, self.text_repr_names),
            ).float()

    # -- the networks as functions of tensors (what a graph captures) ------------------------
    def _image_fn(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(t.float() for t in self.model.encode_image(images))

    def _query_fn(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        count = len(self.image_repr_names)
        image_repr, (tokens, lengths) = tuple(inputs[:count]), inputs[count:]
        text_repr = self.model.encode_text(tokens, lengths)
        return (self.model.compose(image_repr, text_repr).float(), *(t.float() for t in text_repr))

    def _tuple(self, reprs: Mapping[str, torch.Tensor], names: list[str]) -> tuple:
        return tuple(reprs[n].to(self.device, torch.float32) for n in names)

    def _run(
        self, key: tuple, fn: Callable, inputs: list[torch.Tensor]
    ) -> tuple[torch.Tensor, ...]:
        batch = len(inputs[0])
        size = bucket(batch, BATCH_BUCKETS) if self.cuda_graphs else None
        if size is None or key[0] == "query" and key[1] is None:
            with torch.inference_mode():
                return fn(*inputs)
        graph_key = (*key, size)
        if graph_key not in self._graphs:
            if None in self._graphs.values():  # a capture failed: capture nothing more
                self._graphs[graph_key] = None
            else:
                padded = [_pad_batch(x, size) for x in inputs]
                self._graphs[graph_key] = CapturedGraph.try_capture(
                    fn, padded, self._pool, graph_key, cudnn=key[0] != "query"
                )
        graph = self._graphs[graph_key]
        if graph is None:  # capture failed once: this bucket runs eagerly
            with torch.inference_mode():
                return fn(*inputs)
        return tuple(t[:batch].clone() for t in graph([_pad_batch(x, size) for x in inputs]))

    def warmup(self, batch_sizes: Sequence[int] = BATCH_BUCKETS) -> None:
        """Capture the graphs of ``batch_sizes`` (every text-length bucket) ahead of traffic."""
        if not self.cuda_graphs:
            return
        side = self.image_size
        for batch in batch_sizes:
            images = torch.zeros((batch, 3, side, side), device=self.device)
            image_repr = self.encode_image(images)
            for length in self.length_buckets:
                tokens = torch.ones((batch, length), dtype=torch.long, device=self.device)
                lengths = torch.full((batch,), length, dtype=torch.long, device=self.device)
                self.compose_query(image_repr, tokens, lengths)


def _text_repr_grows_with_length(arts: dict[str, Any]) -> bool:
    """True when a text representation has a text-length axis (per-token features)."""
    outputs = arts["graphs"].get("text_encoder", {}).get("outputs", {})
    return any(isinstance(d, str) and d != "batch" for shape in outputs.values() for d in shape[1:])


class CapturedGraph:
    """``fn`` captured as one CUDA graph at fixed input shapes.

    Calling it copies the inputs into the graph's static inputs, replays the graph and
    returns its static outputs (overwritten by the next replay: callers copy them).
    All graphs of a backend share one memory pool; they replay one at a time.
    """

    def __init__(self, fn: Callable, example_inputs: list[torch.Tensor], pool, cudnn: bool = True):
        with torch.inference_mode(), torch.backends.cudnn.flags(enabled=cudnn):
            self.static_inputs = [x.clone() for x in example_inputs]
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm up (cuDNN autotuning, lazy inits) off-graph
                for _ in range(3):
                    fn(*self.static_inputs)
            torch.cuda.current_stream().wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph, pool=pool):
                self.static_outputs = fn(*self.static_inputs)

    @classmethod
    def try_capture(
        cls, fn: Callable, example_inputs: list[torch.Tensor], pool, key: tuple, cudnn: bool = True
    ) -> CapturedGraph | None:
        """The captured graph, or None (logged) when ``fn`` cannot be captured."""
        try:
            graph = cls(fn, example_inputs, pool, cudnn=cudnn)
        except RuntimeError as err:  # an op that cannot be captured: fall back to eager
            first_line = str(err).strip().splitlines()[0] if str(err).strip() else repr(err)
            log.warning(
                "CUDA graph capture of %s failed (%s); it and every bucket not yet captured "
                "run eagerly",
                key,
                first_line,
            )
            return None
        log.info("captured CUDA graph %s", key)
        return graph

    def __call__(self, inputs: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        with torch.inference_mode():
            for static, value in zip(self.static_inputs, inputs):
                static.copy_(value)
            self.graph.replay()
        return self.static_outputs


def _pad_batch(x: torch.Tensor, size: int) -> torch.Tensor:
    """Pad dim 0 to ``size`` with copies of row 0 (valid inputs: no NaN in padded rows)."""
    if len(x) == size:
        return x
    return torch.cat([x, x[:1].expand(size - len(x), *x.shape[1:])], dim=0)


class _NumpyBackend:
    """Adapter of an ``export.runtime`` model (numpy in/out) to the torch-tensor API."""

    def __init__(self, runtime, arts: dict[str, Any], device: torch.device):
        self.runtime = runtime
        self.device = torch.device(device)
        self.image_repr_names = list(arts["image_repr_names"])
        self.text_repr_names = list(arts["text_repr_names"])

    def encode_image(self, images: torch.Tensor) -> Reprs:
        return self._tensors(self.runtime.encode_image(_numpy(images)))

    def compose_query(
        self, image_repr: Mapping[str, torch.Tensor], tokens: torch.Tensor, lengths: torch.Tensor
    ) -> tuple[torch.Tensor, Reprs]:
        text_np = (
            self.runtime.encode_text(_numpy(tokens, np.int64), _numpy(lengths, np.int64))
            if self.text_repr_names
            else {}
        )  # image_only reads no text
        image_np = {n: _numpy(v) for n, v in image_repr.items()}
        query = self.runtime.compose(image_np, text_np)
        return self._tensor(query), self._tensors(text_np)

    def correct(self, ref_repr, cand_repr, text_repr) -> torch.Tensor:
        return self._tensor(
            self.runtime.correct(
                {n: _numpy(v) for n, v in ref_repr.items()},
                {n: _numpy(v) for n, v in cand_repr.items()},
                {n: _numpy(v) for n, v in text_repr.items()},
            )
        )

    def warmup(self, batch_sizes: Sequence[int] = ()) -> None:
        """Nothing to capture: ONNX Runtime and TensorRT plan their work at load time."""

    def _tensor(self, array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32)).to(self.device)

    def _tensors(self, arrays: Mapping[str, np.ndarray]) -> Reprs:
        return {n: self._tensor(a) for n, a in arrays.items()}


class OnnxRuntimeBackend(_NumpyBackend):
    """The ONNX graphs in ONNX Runtime: CUDA provider on a GPU device, else CPU."""

    name = "onnxruntime"

    def __init__(
        self, art_dir: str | Path, arts: dict[str, Any], device: torch.device, threads: int = 0
    ):
        import onnxruntime as ort

        from export.runtime import OnnxRuntimeModel

        device = torch.device(device)
        providers = ["CPUExecutionProvider"]
        if device.type == "cuda":
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise RuntimeError(
                    "backend onnxruntime on a CUDA device needs onnxruntime-gpu "
                    "(pip install 'composed-retrieval[gpu]'); this onnxruntime has "
                    f"{ort.get_available_providers()}"
                )
            providers = [
                ("CUDAExecutionProvider", {"device_id": device.index or 0}),
                "CPUExecutionProvider",
            ]
        super().__init__(
            OnnxRuntimeModel(art_dir, providers=providers, threads=threads), arts, device
        )
        self.describe = f"onnxruntime ({'CUDA' if device.type == 'cuda' else 'CPU'} provider)"


class TensorRTBackend(_NumpyBackend):
    """TensorRT engines built by ``python -m export.trt`` (needs TensorRT and a GPU)."""

    name = "tensorrt"

    def __init__(self, art_dir: str | Path, arts: dict[str, Any], device: torch.device):
        if torch.device(device).type != "cuda":
            raise RuntimeError(f"backend tensorrt needs a CUDA device, got {device}")
        from export.trt import TensorRTModel

        super().__init__(TensorRTModel(art_dir), arts, device)
        self.describe = "tensorrt"


def _numpy(x: torch.Tensor, dtype=np.float32) -> np.ndarray:
    return np.ascontiguousarray(x.detach().cpu().numpy(), dtype=dtype)

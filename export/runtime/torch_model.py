"""The torch backend: ``ART_DIR/checkpoint.pt`` in eager torch, CUDA graphs on a GPU.

The checkpoint is loaded weights-only after its sha256 is checked against the one
``artifacts.json`` records (``pipeline.checkpoint.load_model``). On a GPU the image
encoder and the text encoder + composer run as CUDA graphs captured per batch bucket
(1, 2, 4, ..., 64) and text-length bucket (8, 16, 32, 64) (``cuda_graphs``); the LSTM
text encoder reads the step at ``lengths - 1``, so pad tokens after a text never change
it. The query graphs are captured with cuDNN off: on the H100 (torch 2.11) the query
graph's capture was invalidated, and its cuDNN LSTM is the likely culprit, while
torch's own LSTM kernels are plain launches a graph can hold (not yet re-measured on a
GPU). A capture that fails leaves that bucket and every later one eager (a failed
capture can leave the graphs' shared memory pool in a state later captures trip over).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch

from export.artifacts import Artifacts
from export.runtime.base import GraphRuntime, Reprs
from export.runtime.cuda_graphs import (
    BATCH_BUCKETS,
    LENGTH_BUCKETS,
    CapturedGraph,
    bucket,
    pad_batch,
)


class TorchModel(GraphRuntime):
    """Eager torch model, with CUDA graphs per (batch, text length) bucket on a GPU."""

    name = "torch"

    def __init__(
        self,
        artifacts: Artifacts,
        device: str | torch.device = "cpu",
        cuda_graphs: bool | None = None,
    ):
        from pipeline.checkpoint import load_model

        super().__init__(artifacts, device)
        self.model, _, _ = load_model(
            artifacts.checkpoint_file,
            device=self.device,
            expect_model=artifacts.model_name,
            sha256=artifacts.checkpoint_sha256,
        )
        self.image_size = artifacts.image_size
        self.cuda_graphs = self.device.type == "cuda" if cuda_graphs is None else bool(cuda_graphs)
        if self.cuda_graphs and self.device.type != "cuda":
            raise ValueError("cuda_graphs=True needs a CUDA device, got " + str(self.device))
        self.length_buckets = tuple(
            sorted({min(b, self.max_text_len) for b in LENGTH_BUCKETS} | {self.max_text_len})
        )
        if _text_repr_grows_with_length(artifacts):  # padding would change it: one per T
            self.length_buckets = tuple(range(1, self.max_text_len + 1))
        self._graphs: dict[tuple, CapturedGraph | None] = {}
        self._pool = torch.cuda.graph_pool_handle() if self.cuda_graphs else None
        self.describe = "torch eager" + (" + CUDA graphs" if self.cuda_graphs else "")

    # -- the model contract ------------------------------------------------------------------
    def encode_image(self, images: torch.Tensor) -> Reprs:
        images = images.to(self.device, torch.float32)
        out = self._run(("image", None), self._image_fn, [images])
        return dict(zip(self.image_repr_names, out))

    def encode_text(self, tokens: torch.Tensor, lengths: torch.Tensor) -> Reprs:
        if not self.text_repr_names:
            return {}
        with torch.inference_mode():
            out = self.model.encode_text(tokens.to(self.device), lengths.to(self.device))
        return {n: t.float() for n, t in zip(self.text_repr_names, out)}

    def compose(self, image_repr: Mapping, text_repr: Mapping) -> torch.Tensor:
        with torch.inference_mode():
            return self.model.compose(
                self._tuple(image_repr, self.image_repr_names),
                self._tuple(text_repr, self.text_repr_names),
            ).float()

    def compose_query(
        self, image_repr: Mapping[str, torch.Tensor], tokens: torch.Tensor, lengths: torch.Tensor
    ) -> tuple[torch.Tensor, Reprs]:
        """Text encoder + composer in one call (one CUDA graph on a GPU)."""
        reprs = [image_repr[n].to(self.device, torch.float32) for n in self.image_repr_names]
        tokens, lengths = tokens.to(self.device), lengths.to(self.device)
        length = bucket(tokens.shape[1], self.length_buckets) if self.cuda_graphs else None
        if length is not None and length > tokens.shape[1]:
            tokens = torch.nn.functional.pad(tokens, (0, length - tokens.shape[1]))
        out = self._run(("query", length), self._query_fn, [*reprs, tokens, lengths])
        return out[0], dict(zip(self.text_repr_names, out[1:]))

    def embed_target(self, image_repr: Mapping) -> torch.Tensor:
        with torch.inference_mode():
            return self.model.embed_target(self._tuple(image_repr, self.image_repr_names)).float()

    def correct(self, ref_repr: Mapping, cand_repr: Mapping, text_repr: Mapping) -> torch.Tensor:
        if not self.has_correction:
            raise self._no_correction()
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
        # representations may hold integers (text lengths): keep their dtype
        return tuple(
            reprs[n].to(self.device, torch.float32 if reprs[n].is_floating_point() else None)
            for n in names
        )

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
                padded = [pad_batch(x, size) for x in inputs]
                self._graphs[graph_key] = CapturedGraph.try_capture(
                    fn, padded, self._pool, graph_key, cudnn=key[0] != "query"
                )
        graph = self._graphs[graph_key]
        if graph is None:  # capture failed once: this bucket runs eagerly
            with torch.inference_mode():
                return fn(*inputs)
        return tuple(t[:batch].clone() for t in graph([pad_batch(x, size) for x in inputs]))

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


def _text_repr_grows_with_length(artifacts: Artifacts) -> bool:
    """True when a text representation has a text-length axis (per-token features)."""
    spec = artifacts.graphs.get("text_encoder")
    outputs = spec.outputs if spec is not None else {}
    return any(isinstance(d, str) and d != "batch" for shape in outputs.values() for d in shape[1:])

"""The runtime's contract: an exported model behind one torch-tensor API.

Shapes: B batch, T text length, D embedding size, S image side. Every backend offers::

    encode_image(images (B, 3, S, S) float32) -> {image repr name: (B, ...)}
    encode_text(tokens (B, T) int64, lengths (B,) int64) -> {text repr name: (B, ...)}
    compose(image_repr, text_repr) -> (B, D) unit rows
    compose_query(image_repr, tokens, lengths) -> (query (B, D), text_repr)
    embed_target(image_repr) -> (B, D) unit rows
    correct(ref_repr, cand_repr, text_repr) -> (B,)       (models with a correction network)
    query(images, tokens, lengths) -> (B, D)               (encode both, then compose)

Inputs may live anywhere; outputs are float32 tensors on the runtime's ``device``.
Representation dicts are keyed by the model's repr names (``feature``); graph tensors
are named ``<role>_<name>`` (``repr_feature``), and ``ExportedGraphs`` is the one place
that maps between the two. ``tokenize`` applies the export's tokenizer rules.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from export.artifacts import ArtifactError, Artifacts
from pipeline.models.export_wrappers import graph_tensor_names

Reprs = dict[str, torch.Tensor]
BACKENDS = ("torch", "onnxruntime", "tensorrt")
# The precisions each backend serves, its default first (TensorRT's default is fp16 when
# the engine listing has fp16 engines for every graph).
PRECISIONS = {"torch": ("fp32",), "onnxruntime": ("fp32", "int8"), "tensorrt": ("fp32", "fp16")}
TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "int64": torch.int64}


class GraphRuntime:
    """What every backend shares: the artifacts, the device, tokenisation, ``query``."""

    name = "runtime"

    def __init__(self, artifacts: Artifacts, device: str | torch.device = "cpu"):
        self.artifacts = artifacts
        self.device = torch.device(device)
        self.model_name = artifacts.model_name
        self.embed_dim = artifacts.embed_dim
        self.image_repr_names = list(artifacts.image_repr_names)
        self.text_repr_names = list(artifacts.text_repr_names)
        self.has_correction = artifacts.has_correction
        self.max_text_len = artifacts.max_text_len
        self.describe = self.name

    def tokenize(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Texts -> ``tokens`` (B, T) int64 and ``lengths`` (B,) int64 (export's rules)."""
        return self.artifacts.vocab.encode(list(texts), max_len=self.max_text_len)

    def query(
        self, images: torch.Tensor, tokens: torch.Tensor, lengths: torch.Tensor
    ) -> torch.Tensor:
        """The whole query path: encode reference images, compose with the texts -> (B, D)."""
        return self.compose_query(self.encode_image(images), tokens, lengths)[0]

    def compose_query(
        self, image_repr: Mapping[str, torch.Tensor], tokens: torch.Tensor, lengths: torch.Tensor
    ) -> tuple[torch.Tensor, Reprs]:
        """(query (B, D), text representation) for image representations and texts."""
        text_repr = self.encode_text(tokens, lengths)
        return self.compose(image_repr, text_repr), text_repr

    def warmup(self, batch_sizes: Sequence[int] = ()) -> None:
        """Prepare ``batch_sizes`` before traffic (CUDA graphs); nothing by default."""

    def _no_correction(self) -> ArtifactError:
        return ArtifactError(
            f"{self.artifacts.dir}: model {self.model_name!r} has no correction network"
        )

    # the model contract, implemented by each backend
    def encode_image(self, images: torch.Tensor) -> Reprs:
        raise NotImplementedError

    def encode_text(self, tokens: torch.Tensor, lengths: torch.Tensor) -> Reprs:
        raise NotImplementedError

    def compose(self, image_repr: Mapping, text_repr: Mapping) -> torch.Tensor:
        raise NotImplementedError

    def embed_target(self, image_repr: Mapping) -> torch.Tensor:
        raise NotImplementedError

    def correct(self, ref_repr: Mapping, cand_repr: Mapping, text_repr: Mapping) -> torch.Tensor:
        raise NotImplementedError


class ExportedGraphs(GraphRuntime):
    """A backend that runs the exported graph files: subclasses implement
    ``_run(graph, feeds)`` with ``feeds`` / outputs keyed by graph tensor names."""

    def encode_image(self, images: torch.Tensor) -> Reprs:
        out = self._run("image_encoder", {"images": images})
        return self._parts(out, "repr", self.image_repr_names)

    def encode_text(self, tokens: torch.Tensor, lengths: torch.Tensor) -> Reprs:
        if not self.text_repr_names:  # a model that reads no text has no text encoder
            return {}
        out = self._run("text_encoder", {"tokens": tokens, "lengths": lengths})
        return self._parts(out, "text", self.text_repr_names)

    def compose(self, image_repr: Mapping, text_repr: Mapping) -> torch.Tensor:
        feeds = self._feeds("composer", repr=image_repr, text=text_repr)
        return self._run("composer", feeds)["query"]

    def embed_target(self, image_repr: Mapping) -> torch.Tensor:
        return self._run("target_head", self._feeds("target_head", repr=image_repr))["target"]

    def correct(self, ref_repr: Mapping, cand_repr: Mapping, text_repr: Mapping) -> torch.Tensor:
        if not self.has_correction:
            raise self._no_correction()
        feeds = self._feeds("correction", ref=ref_repr, cand=cand_repr, text=text_repr)
        return self._run("correction", feeds)["score"]

    def _parts(self, out: Reprs, role: str, names: list[str]) -> Reprs:
        return {n: out[t] for n, t in zip(names, graph_tensor_names(role, names))}

    def _feeds(self, graph: str, **reprs: Mapping[str, torch.Tensor]) -> Reprs:
        """Feeds of the representation inputs ``graph`` declares. A graph takes only the
        parts its step reads (``text_only``'s composer has no image input), so unread
        parts may be absent from the dicts."""
        feeds = {}
        for tensor in self.artifacts.graph(graph).inputs:
            role, part = tensor.split("_", 1)
            values = reprs[role]
            if part not in values:
                raise KeyError(
                    f"{graph} needs {role} representation {part!r}; got keys {sorted(values)}"
                )
            feeds[tensor] = values[part]
        return feeds

    def _run(self, graph: str, feeds: Reprs) -> Reprs:
        raise NotImplementedError

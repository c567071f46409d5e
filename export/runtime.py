"""Run exported artifacts: the model contract of ``pipeline.models.base`` with numpy in/out.

``OnnxRuntimeModel(art_dir)`` runs the ONNX graphs in ONNX Runtime; ``TorchArtifactModel``
runs ``ART_DIR/checkpoint.pt`` in eager torch behind the same methods (export.index's
``--backend torch``, serving's torch backend, the latency bench). Shapes: B batch,
T text length, D embedding size, S image side::

    encode_image(images float32 (B, 3, S, S)) -> {repr name: array (B, ...)}
    encode_text(tokens int64 (B, T), lengths int64 (B,)) -> {repr name: array}
    compose(image_repr, text_repr) -> (B, D) unit rows
    embed_target(image_repr) -> (B, D) unit rows
    correct(ref_repr, cand_repr, text_repr) -> (B,)    (models with has_correction)

Representation dicts are keyed by the model's repr names (``image_repr_names``,
``text_repr_names``), e.g. ``{"feature": ...}``; the ``repr_``/``text_`` prefixes are
graph tensor names only.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from export.artifacts import (
    ArtifactError,
    graph_file,
    image_repr_inputs,
    load_artifacts,
    load_vocab,
    text_repr_inputs,
)
from pipeline.checkpoint import sha256_mismatch

log = logging.getLogger(__name__)

# ONNX Runtime's type strings for the dtypes artifacts.json records.
ORT_TYPES = {"float32": "tensor(float)", "int64": "tensor(int64)", "float16": "tensor(float16)"}
Arrays = dict[str, np.ndarray]


class ArtifactModel:
    """Shared part of every backend: metadata, tokenisation and the repr-dict plumbing."""

    def __init__(self, art_dir: str | Path):
        self.arts = load_artifacts(art_dir)
        self.art_dir = Path(self.arts["dir"])
        self.model_name: str = self.arts["model_name"]
        self.embed_dim: int = int(self.arts["embed_dim"])
        self.image_repr_names: list[str] = list(self.arts["image_repr_names"])
        self.text_repr_names: list[str] = list(self.arts["text_repr_names"])
        self.has_correction: bool = bool(self.arts["has_correction"])
        self.preprocess: dict[str, Any] = dict(self.arts["preprocess"])
        self.vocab = load_vocab(self.arts)
        self.max_text_len = int(self.arts["tokenizer"]["max_text_len"])

    def tokenize(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Texts -> ``tokens`` (B, T) int64 and ``lengths`` (B,) int64, with the export's rules."""
        tokens, lengths = self.vocab.encode(list(texts), max_len=self.max_text_len)
        return tokens.numpy(), lengths.numpy()

    def query(self, images: np.ndarray, tokens: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        """The whole query path: encode reference images and texts, compose -> (B, D)."""
        return self.compose(self.encode_image(images), self.encode_text(tokens, lengths))

    # The four graph entry points; subclasses implement ``_run``.
    def encode_image(self, images: np.ndarray) -> Arrays:
        out = self._run("image_encoder", {"images": _f32(images)})
        return {
            n: out[k]
            for n, k in zip(self.image_repr_names, image_repr_inputs(self.image_repr_names))
        }

    def encode_text(self, tokens: np.ndarray, lengths: np.ndarray) -> Arrays:
        if not self.text_repr_names:  # a model that reads no text has no text encoder
            return {}
        out = self._run(
            "text_encoder",
            {
                "tokens": np.ascontiguousarray(tokens, dtype=np.int64),
                "lengths": np.ascontiguousarray(lengths, dtype=np.int64),
            },
        )
        return {
            n: out[k] for n, k in zip(self.text_repr_names, text_repr_inputs(self.text_repr_names))
        }

    def compose(
        self, image_repr: Mapping[str, np.ndarray], text_repr: Mapping[str, np.ndarray]
    ) -> np.ndarray:
        return self._run("composer", self._feeds("composer", repr=image_repr, text=text_repr))[
            "query"
        ]

    def embed_target(self, image_repr: Mapping[str, np.ndarray]) -> np.ndarray:
        return self._run("target_head", self._feeds("target_head", repr=image_repr))["target"]

    def correct(
        self,
        ref_repr: Mapping[str, np.ndarray],
        cand_repr: Mapping[str, np.ndarray],
        text_repr: Mapping[str, np.ndarray],
    ) -> np.ndarray:
        if not self.has_correction:
            raise ArtifactError(
                f"{self.art_dir}: model {self.model_name!r} has no correction graph"
            )
        feeds = self._feeds("correction", ref=ref_repr, cand=cand_repr, text=text_repr)
        return self._run("correction", feeds)["score"]

    def _feeds(self, graph: str, **reprs: Mapping[str, np.ndarray]) -> Arrays:
        """Feeds for the representation inputs ``graph`` declares in artifacts.json.

        A graph takes only the parts its step reads (``text_only``'s composer has no image
        input), so unread parts may be absent from the dicts.
        """
        feeds = {}
        info = self.arts["graphs"][graph]
        for name in info["inputs"]:
            role, part = name.split("_", 1)
            values = reprs[role]
            if part not in values:
                raise KeyError(
                    f"{graph} needs {role} representation {part!r}; got keys {sorted(values)}"
                )
            # representations may hold integers too (e.g. text lengths)
            feeds[name] = np.ascontiguousarray(values[part], dtype=info["dtypes"][name])
        return feeds

    def _run(self, graph: str, feeds: Arrays) -> Arrays:
        raise NotImplementedError


class OnnxRuntimeModel(ArtifactModel):
    """The exported graphs in ONNX Runtime sessions (one per graph).

    ``providers`` defaults to CUDA when onnxruntime-gpu has it, else CPU; the TensorRT
    execution provider is never picked implicitly (export.trt builds engines explicitly).
    ``threads`` caps intra-op threads (0: ONNX Runtime's default, all cores).
    """

    def __init__(
        self, art_dir: str | Path, providers: Sequence[str] | None = None, threads: int = 0
    ):
        import onnxruntime as ort

        super().__init__(art_dir)
        if providers is None:
            available = ort.get_available_providers()
            providers = [
                p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available
            ]
        self.providers = list(providers)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        self.sessions = {}
        for graph, info in self.arts["graphs"].items():
            file = graph_file(self.arts, graph)
            if "sha256" in info and (problem := sha256_mismatch(file, info["sha256"])):
                raise ArtifactError(problem)
            try:
                session = ort.InferenceSession(str(file), options, providers=self.providers)
            except Exception as err:  # ORT raises its own exception types for bad files
                raise ArtifactError(f"{file}: ONNX Runtime cannot load it ({err})") from err
            check_session_io(session, info, file)
            self.sessions[graph] = session
        self._outputs = {g: [o.name for o in s.get_outputs()] for g, s in self.sessions.items()}

    def _run(self, graph: str, feeds: Arrays) -> Arrays:
        session = self.sessions.get(graph)
        if session is None:
            raise ArtifactError(f"{self.art_dir}: no {graph!r} graph")
        values = session.run(self._outputs[graph], feeds)
        return dict(zip(self._outputs[graph], values))


class TorchArtifactModel(ArtifactModel):
    """``ART_DIR/checkpoint.pt`` in eager torch, with the numpy API of ``OnnxRuntimeModel``."""

    def __init__(self, art_dir: str | Path, device: str = "cpu"):
        import torch

        from pipeline.checkpoint import load_model

        super().__init__(art_dir)
        self.torch = torch
        self.device = torch.device(device)
        self.model, _, _ = load_model(
            self.art_dir / self.arts["checkpoint"]["file"],
            device=self.device,
            expect_model=self.model_name,
            sha256=self.arts["checkpoint"]["sha256"],
        )

    def _tensors(self, reprs: Mapping[str, np.ndarray], names: list[str]) -> tuple:
        return tuple(
            self.torch.from_numpy(np.ascontiguousarray(reprs[n])).to(self.device) for n in names
        )

    def _numpy(self, tensors, names: list[str]) -> Arrays:
        return {n: t.detach().cpu().numpy() for n, t in zip(names, tensors)}

    def encode_image(self, images: np.ndarray) -> Arrays:
        with self.torch.inference_mode():
            out = self.model.encode_image(self.torch.from_numpy(_f32(images)).to(self.device))
        return self._numpy(out, self.image_repr_names)

    def encode_text(self, tokens: np.ndarray, lengths: np.ndarray) -> Arrays:
        if not self.text_repr_names:
            return {}
        t = self.torch.as_tensor(np.asarray(tokens, dtype=np.int64), device=self.device)
        n = self.torch.as_tensor(np.asarray(lengths, dtype=np.int64), device=self.device)
        with self.torch.inference_mode():
            out = self.model.encode_text(t, n)
        return self._numpy(out, self.text_repr_names)

    def compose(self, image_repr, text_repr) -> np.ndarray:
        with self.torch.inference_mode():
            out = self.model.compose(
                self._tensors(image_repr, self.image_repr_names),
                self._tensors(text_repr, self.text_repr_names),
            )
        return out.float().cpu().numpy()

    def embed_target(self, image_repr) -> np.ndarray:
        with self.torch.inference_mode():
            out = self.model.embed_target(self._tensors(image_repr, self.image_repr_names))
        return out.float().cpu().numpy()

    def correct(self, ref_repr, cand_repr, text_repr) -> np.ndarray:
        if not self.has_correction:
            raise ArtifactError(
                f"{self.art_dir}: model {self.model_name!r} has no correction network"
            )
        with self.torch.inference_mode():
            out = self.model.correct(
                self._tensors(ref_repr, self.image_repr_names),
                self._tensors(cand_repr, self.image_repr_names),
                self._tensors(text_repr, self.text_repr_names),
            )
        return out.float().cpu().numpy()


def open_runtime(art_dir: str | Path, backend: str = "onnxruntime", **kwargs: Any) -> ArtifactModel:
    """``onnxruntime`` | ``torch`` | ``tensorrt`` backend over one artifact directory."""
    if backend == "onnxruntime":
        return OnnxRuntimeModel(art_dir, **kwargs)
    if backend == "torch":
        return TorchArtifactModel(art_dir, **kwargs)
    if backend == "tensorrt":
        from export.trt import TensorRTModel

        return TensorRTModel(art_dir, **kwargs)
    raise ValueError(f"unknown backend {backend!r}; expected onnxruntime, torch or tensorrt")


def check_session_io(session, info: dict[str, Any], file: Path) -> None:
    """Raise ``ArtifactError`` unless the graph's inputs/outputs are those of artifacts.json
    (names, ranks, element types, fixed dims)."""
    for kind, declared, actual in (
        ("inputs", info["inputs"], session.get_inputs()),
        ("outputs", info["outputs"], session.get_outputs()),
    ):
        names = {a.name: a for a in actual}
        if set(names) != set(declared):
            raise ArtifactError(
                f"{file}: graph {kind} are {sorted(names)}, "
                f"artifacts.json expects {sorted(declared)}"
            )
        for name, shape in declared.items():
            arg = names[name]
            want_type = ORT_TYPES.get(info["dtypes"].get(name, "float32"))
            if arg.type != want_type:
                raise ArtifactError(
                    f"{file}: {kind[:-1]} {name!r} has type {arg.type}, "
                    f"artifacts.json expects {want_type}"
                )
            if len(arg.shape) != len(shape) or any(
                isinstance(want, int) and got != want for got, want in zip(arg.shape, shape)
            ):
                raise ArtifactError(
                    f"{file}: {kind[:-1]} {name!r} has shape {arg.shape}, "
                    f"artifacts.json expects {shape}"
                )


def _f32(array: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(array, dtype=np.float32)

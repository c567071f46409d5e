"""Recall parity: the exported graphs must rank a dataset exactly as the checkpoint does.

``verify_recall`` runs ``pipeline.evaluate.evaluate_model`` twice over the same gallery
and queries: once with the PyTorch model, once with ``RuntimeModule`` -- the ONNX Runtime
graphs behind the model contract (torch tensors in and out) -- and requires every
reported recall to be equal.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from export.artifacts import load_artifacts, load_vocab
from export.runtime import ArtifactModel, OnnxRuntimeModel

log = logging.getLogger(__name__)


class RecallMismatch(AssertionError):
    """ONNX Runtime's recalls differ from the checkpoint's."""


class RuntimeModule(nn.Module):
    """An ``ArtifactModel`` (numpy backend) behind ``ComposedRetrievalModel``'s torch API,
    so evaluation code written for the PyTorch model runs the exported graphs unchanged.

    Tensors go to and come back from the CPU; representation tuples follow
    ``image_repr_names`` / ``text_repr_names``.
    """

    def __init__(self, runtime: ArtifactModel):
        super().__init__()
        self.runtime = runtime
        self.model_name = runtime.model_name
        self.embed_dim = runtime.embed_dim
        self.image_repr_names = tuple(runtime.image_repr_names)
        self.text_repr_names = tuple(runtime.text_repr_names)
        self.has_correction = runtime.has_correction
        if "loss_scale" in runtime.arts:  # composition softmax scale of CCNet re-ranking
            self.loss_scale = torch.tensor(float(runtime.arts["loss_scale"]))

    def _tuple(self, arrays: dict[str, np.ndarray], names: tuple[str, ...]) -> tuple:
        return tuple(torch.from_numpy(arrays[n]) for n in names)

    def _dict(self, tensors: tuple, names: tuple[str, ...]) -> dict[str, np.ndarray]:
        return {n: t.detach().cpu().numpy() for n, t in zip(names, tensors)}

    def encode_image(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.runtime.encode_image(images.detach().float().cpu().numpy())
        return self._tuple(out, self.image_repr_names)

    def encode_text(self, tokens: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.runtime.encode_text(tokens.cpu().numpy(), lengths.cpu().numpy())
        return self._tuple(out, self.text_repr_names)

    def compose(self, image_repr: tuple, text_repr: tuple) -> torch.Tensor:
        return torch.from_numpy(
            self.runtime.compose(
                self._dict(image_repr, self.image_repr_names),
                self._dict(text_repr, self.text_repr_names),
            )
        )

    def embed_target(self, image_repr: tuple) -> torch.Tensor:
        return torch.from_numpy(
            self.runtime.embed_target(self._dict(image_repr, self.image_repr_names))
        )

    def correct(self, ref_repr: tuple, cand_repr: tuple, text_repr: tuple) -> torch.Tensor:
        return torch.from_numpy(
            self.runtime.correct(
                self._dict(ref_repr, self.image_repr_names),
                self._dict(cand_repr, self.image_repr_names),
                self._dict(text_repr, self.text_repr_names),
            )
        )


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
    from pipeline.evaluate import evaluate_model

    arts = load_artifacts(art_dir)
    runtime = OnnxRuntimeModel(art_dir, providers=["CPUExecutionProvider"], threads=threads)
    vocab = load_vocab(arts)
    pre = arts["preprocess"]
    size = image_size or int(pre["crop"])
    common = dict(
        eval_name=eval_set,
        image_size=size,
        mean=pre["mean"],
        std=pre["std"],
        batch_size=batch_size,
        device="cpu",
    )
    with torch.inference_mode():
        reference = evaluate_model(model, vocab, data, **common)
        exported = evaluate_model(RuntimeModule(runtime), vocab, data, **common)
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

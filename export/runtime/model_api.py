"""A runtime behind ``ComposedRetrievalModel``'s tuple-of-tensors API (``RuntimeModule``):
evaluation (``pipeline.evaluate``) and CCNet's re-ranking run exported graphs with the
code written for the PyTorch model."""

from __future__ import annotations

import torch
from torch import nn

from export.runtime.base import GraphRuntime


class RuntimeModule(nn.Module):
    """A ``GraphRuntime`` behind ``ComposedRetrievalModel``'s tuple-of-tensors API, so
    evaluation code written for the PyTorch model runs the exported graphs unchanged.
    Representation tuples follow ``image_repr_names`` / ``text_repr_names``."""

    def __init__(self, runtime: GraphRuntime):
        super().__init__()
        self.runtime = runtime
        self.model_name = runtime.model_name
        self.embed_dim = runtime.embed_dim
        self.image_repr_names = tuple(runtime.image_repr_names)
        self.text_repr_names = tuple(runtime.text_repr_names)
        self.has_correction = runtime.has_correction
        # evaluation reads the model's device from its parameters
        self.anchor = nn.Parameter(torch.zeros(1, device=runtime.device), requires_grad=False)
        scale = runtime.artifacts.loss_scale
        if scale is not None:  # composition softmax scale of CCNet re-ranking
            self.loss_scale = torch.tensor(scale)

    def _tuple(self, reprs: dict[str, torch.Tensor], names: tuple[str, ...]) -> tuple:
        return tuple(reprs[n] for n in names)

    def _dict(self, tensors: tuple, names: tuple[str, ...]) -> dict[str, torch.Tensor]:
        return dict(zip(names, tensors))

    def encode_image(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self._tuple(self.runtime.encode_image(images), self.image_repr_names)

    def encode_text(self, tokens: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self._tuple(self.runtime.encode_text(tokens, lengths), self.text_repr_names)

    def compose(self, image_repr: tuple, text_repr: tuple) -> torch.Tensor:
        return self.runtime.compose(
            self._dict(image_repr, self.image_repr_names),
            self._dict(text_repr, self.text_repr_names),
        )

    def embed_target(self, image_repr: tuple) -> torch.Tensor:
        return self.runtime.embed_target(self._dict(image_repr, self.image_repr_names))

    def correct(self, ref_repr: tuple, cand_repr: tuple, text_repr: tuple) -> torch.Tensor:
        return self.runtime.correct(
            self._dict(ref_repr, self.image_repr_names),
            self._dict(cand_repr, self.image_repr_names),
            self._dict(text_repr, self.text_repr_names),
        )

"""The contract every composed-retrieval model follows (DESIGN.md: one registry,
tensors in, tensors out, compose from stored image representations).

Shapes: B batch, T text length, D embedding size.

* ``encode_image(images (B, 3, H, W) float) -> tuple[Tensor, ...]``: the image
  representation, named by ``image_repr_names``; computed once per catalogue image
  and reusable for composing queries (serving stores it).
* ``encode_text(tokens (B, T) int64, lengths (B,) int64) -> tuple[Tensor, ...]``:
  the text representation, named by ``text_repr_names``.
* ``compose(image_repr, text_repr) -> (B, D)``: the query embedding, L2-normalised.
* ``embed_target(image_repr) -> (B, D)``: a catalogue image's embedding, L2-normalised.
* ``correct(ref_repr, cand_repr, text_repr) -> (B,)`` (only when ``has_correction``):
  CCNet's correction-network logit for (reference, candidate, text) triples.
* ``forward(ref_images, tokens, lengths, target_images) -> dict`` with ``query``
  (B, D), ``target`` (B, D) and, for models with a correction network,
  ``correction_logits`` (B, B): entry [i, j] scores candidate j for query i
  (the diagonal holds the true targets). Models also return ``loss_scale`` (a scalar
  parameter: the learned scale s of ``pipeline.losses``, logits ``s^2 * cos``).

Scores are dot products of unit vectors; the loss owns the temperature (kept in the model
as ``loss_scale`` so optimisers and checkpoints see it). ``text_repr_names`` may be empty
(``image_only`` reads no text; ``encode_text`` then returns ``()``).
"""

from __future__ import annotations

import torch
from torch import nn

Repr = tuple[torch.Tensor, ...]


class ComposedRetrievalModel(nn.Module):
    """Base class: subclasses implement the encoders, ``compose`` and ``embed_target``."""

    image_repr_names: tuple[str, ...] = ("feature",)
    text_repr_names: tuple[str, ...] = ("feature",)
    has_correction: bool = False
    embed_dim: int = 512

    def encode_image(self, images: torch.Tensor) -> Repr:
        raise NotImplementedError

    def encode_text(self, tokens: torch.Tensor, lengths: torch.Tensor) -> Repr:
        raise NotImplementedError

    def compose(self, image_repr: Repr, text_repr: Repr) -> torch.Tensor:
        raise NotImplementedError

    def embed_target(self, image_repr: Repr) -> torch.Tensor:
        raise NotImplementedError

    def correct(self, ref_repr: Repr, cand_repr: Repr, text_repr: Repr) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} has no correction network")

    def forward(
        self,
        ref_images: torch.Tensor,
        tokens: torch.Tensor,
        lengths: torch.Tensor,
        target_images: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        ref_repr = self.encode_image(ref_images)
        tgt_repr = self.encode_image(target_images)
        text_repr = self.encode_text(tokens, lengths)
        return {"query": self.compose(ref_repr, text_repr), "target": self.embed_target(tgt_repr)}

"""Shared skeleton of the TIRG-family models (Vo et al., CVPR 2019, and its baselines).

An image encoder (CNN + linear, ``image_encoder.ImageEncoder``), a text encoder (LSTM,
``text_encoder.LSTMTextEncoder``) and a composer head that subclasses implement in
``combine``. A catalogue image's target embedding is its normalised global feature, as in
the TIRG code (``extract_img_feature`` + ``NormalizationLayer``).

The model also owns the loss scale (TIRG's ``NormalizationLayer(normalize_scale=4.0,
learn_scale=True)``) so optimisers see it and checkpoints keep it; ``forward`` returns it
as ``outputs["loss_scale"]`` for ``pipeline.losses.compute_loss``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.models.base import ComposedRetrievalModel, Repr
from pipeline.models.checks import check_images, check_repr, check_same_batch, check_text
from pipeline.models.image_encoder import ImageEncoder
from pipeline.models.text_encoder import LSTMTextEncoder


def check_positive(**values: float) -> None:
    """Raise ValueError naming any size/probability argument out of range."""
    for name, value in values.items():
        if name.endswith("dropout"):
            if not 0.0 <= value < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {value}")
        elif not (isinstance(value, int) and value > 0):
            raise ValueError(f"{name} must be a positive int, got {value!r}")


class EncoderComposerModel(ComposedRetrievalModel):
    """Image encoder + LSTM text encoder + ``combine`` (implemented by subclasses).

    Representations: image ``("feature",)`` (B, D), or ``("map",)``, the last conv map
    (B, C, h, w), for composers that edit the map (the target is then
    ``image_encoder.project(map)``, the same pooling + linear head); text ``("feature",)``
    (B, D), or ``()`` for a model that reads no text.
    """

    image_repr_names: tuple[str, ...] = ("feature",)
    text_repr_names: tuple[str, ...] = ("feature",)

    def __init__(
        self,
        vocab_size: int,
        embed_dim: int = 512,
        image_backbone: str = "resnet18",
        pretrained_path: str | None = None,
        word_dim: int = 512,
        text_hidden_dim: int = 512,
        text_dropout: float = 0.1,
        loss_scale_init: float = 4.0,
        learn_loss_scale: bool = True,
    ):
        super().__init__()
        check_positive(
            vocab_size=vocab_size,
            embed_dim=embed_dim,
            word_dim=word_dim,
            text_hidden_dim=text_hidden_dim,
            text_dropout=text_dropout,
        )
        if vocab_size < 2:
            raise ValueError(f"vocab_size must be >= 2 (<pad>, <unk>), got {vocab_size}")
        self.vocab_size = vocab_size
        self.embed_dim = embed_dim
        self.image_encoder = ImageEncoder(embed_dim, image_backbone, pretrained_path)
        self.text_encoder = self.build_text_encoder(
            vocab_size, embed_dim, word_dim, text_hidden_dim, text_dropout
        )
        self.loss_scale = nn.Parameter(
            torch.tensor(float(loss_scale_init)), requires_grad=bool(learn_loss_scale)
        )

    def build_text_encoder(
        self, vocab_size: int, embed_dim: int, word_dim: int, hidden_dim: int, dropout: float
    ) -> nn.Module | None:
        if not self.text_repr_names:
            return None
        return LSTMTextEncoder(vocab_size, embed_dim, word_dim, hidden_dim, dropout)

    # -- contract ------------------------------------------------------------------------
    def encode_image(self, images: torch.Tensor) -> Repr:
        """images (B, 3, H, W) -> (feature (B, D),) or (map (B, C, h, w),)."""
        check_images(images)
        feature, feature_map = self.image_encoder(images)
        parts = {"feature": feature, "map": feature_map}
        return tuple(parts[name] for name in self.image_repr_names)

    def encode_text(self, tokens: torch.Tensor, lengths: torch.Tensor) -> Repr:
        """tokens (B, T), lengths (B,) -> (feature (B, D),) or () for image-only models."""
        check_text(tokens, lengths, self.vocab_size)
        if self.text_encoder is None:
            return ()
        return (self.text_encoder(tokens, lengths),)

    def compose(self, image_repr: Repr, text_repr: Repr) -> torch.Tensor:
        """-> query (B, D), L2-normalised."""
        check_repr(image_repr, self.image_repr_names, "image_repr")
        check_repr(text_repr, self.text_repr_names, "text_repr")
        check_same_batch(image_repr=image_repr[0], text_repr=text_repr[0] if text_repr else None)
        return F.normalize(self.combine(image_repr, text_repr), dim=1)

    def embed_target(self, image_repr: Repr) -> torch.Tensor:
        """-> target (B, D), L2-normalised global image feature."""
        check_repr(image_repr, self.image_repr_names, "image_repr")
        if self.image_repr_names[0] == "feature":
            return F.normalize(image_repr[0], dim=1)
        return F.normalize(self.image_encoder.project(image_repr[0]), dim=1)

    def forward(
        self,
        ref_images: torch.Tensor,
        tokens: torch.Tensor,
        lengths: torch.Tensor,
        target_images: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        """-> {"query": (B, D), "target": (B, D), "loss_scale": ()}."""
        check_same_batch(
            ref_images=ref_images, tokens=tokens, lengths=lengths, target_images=target_images
        )
        outputs = super().forward(ref_images, tokens, lengths, target_images)
        outputs["loss_scale"] = self.loss_scale
        return outputs

    def combine(self, image_repr: Repr, text_repr: Repr) -> torch.Tensor:
        """Unnormalised query (B, D); implemented by each composer."""
        raise NotImplementedError

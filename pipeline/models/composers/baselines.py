"""The simplest composers of the TIRG paper (Sec. 4, baselines), as in its released code
(img_text_composition_models.py: SimpleModelImageOnly, SimpleModelTextOnly, Concat)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.models.base import Repr
from pipeline.models.checks import check_images, check_same_batch
from pipeline.models.encoder_composer import EncoderComposerModel
from pipeline.models.registry import register_model


@register_model("image_only")
class ImageOnly(EncoderComposerModel):
    """Query = the reference image's feature; the text is validated but ignored
    (``text_repr_names`` is empty, so the model has no text encoder)."""

    text_repr_names = ()

    def combine(self, image_repr: Repr, text_repr: Repr) -> torch.Tensor:
        return image_repr[0]


@register_model("text_only")
class TextOnly(EncoderComposerModel):
    """Query = the modification text's feature; the reference image is ignored."""

    def combine(self, image_repr: Repr, text_repr: Repr) -> torch.Tensor:
        return text_repr[0]

    def forward(
        self,
        ref_images: torch.Tensor,
        tokens: torch.Tensor,
        lengths: torch.Tensor,
        target_images: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        """-> {"query": (B, D), "target": (B, D), "loss_scale": ()}.

        The reference images are checked but never encoded, as in the TIRG code
        (``SimpleModelTextOnly.compose_img_text`` reads only the text): encoding them
        would cost a third of the step and fold them into batch norm's running
        statistics, which the target embeddings use at evaluation.
        """
        check_images(ref_images, "ref_images")
        check_same_batch(
            ref_images=ref_images, tokens=tokens, lengths=lengths, target_images=target_images
        )
        query = F.normalize(self.combine((), self.encode_text(tokens, lengths)), dim=1)
        target = self.embed_target(self.encode_image(target_images))
        return {"query": query, "target": target, "loss_scale": self.loss_scale}


@register_model("concat")
class Concat(EncoderComposerModel):
    """Query = MLP([f_img, f_txt]) (TIRG code ``Concat``: BN-ReLU-FC-BN-ReLU-Dropout-FC)."""

    def __init__(
        self,
        vocab_size: int,
        embed_dim: int = 512,
        image_backbone: str = "resnet18",
        pretrained_path: str | None = None,
        composer_dropout: float = 0.1,
        **common,
    ):
        super().__init__(vocab_size, embed_dim, image_backbone, pretrained_path, **common)
        d = embed_dim
        self.composer = nn.Sequential(
            nn.BatchNorm1d(2 * d),
            nn.ReLU(),
            nn.Linear(2 * d, 2 * d),
            nn.BatchNorm1d(2 * d),
            nn.ReLU(),
            nn.Dropout(composer_dropout),
            nn.Linear(2 * d, d),
        )

    def combine(self, image_repr: Repr, text_repr: Repr) -> torch.Tensor:
        return self.composer(torch.cat([image_repr[0], text_repr[0]], dim=1))

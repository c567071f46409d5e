"""MRN baseline of the TIRG paper: Kim et al., "Multimodal Residual Learning for Visual QA"
(Multimodal Residual Networks), NIPS 2016.

Learning block (Sec. 3): ``H_l = H_{l-1} W_q^(l) + F^(l)(H_{l-1}, v)`` with
``F(q, v) = tanh(q W_1) * tanh(tanh(v W_2) W_3)`` (element-wise product), ``H_0 = q``,
stacked ``depth`` = 3 times as in the paper. ``q`` is the text feature, ``v`` the image
feature; ``H_L`` is the query.
"""

from __future__ import annotations

import torch
from torch import nn

from pipeline.models.base import Repr
from pipeline.models.encoder_composer import EncoderComposerModel, check_positive
from pipeline.models.registry import register_model


class MultimodalResidualBlock(nn.Module):
    """(H_{l-1} (B, D), v (B, D)) -> H_l (B, D)."""

    def __init__(self, dim: int):
        super().__init__()
        self.shortcut = nn.Linear(dim, dim)  # W_q: linear shortcut (q and H differ in space)
        self.text = nn.Linear(dim, dim)  # W_1
        self.image = nn.Sequential(nn.Linear(dim, dim), nn.Tanh(), nn.Linear(dim, dim))  # W_2, W_3

    def forward(self, hidden: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        joint = torch.tanh(self.text(hidden)) * torch.tanh(self.image(image))
        return self.shortcut(hidden) + joint


@register_model("mrn")
class MRN(EncoderComposerModel):
    """image (B, D), text (B, D) -> query (B, D)."""

    def __init__(
        self,
        vocab_size: int,
        embed_dim: int = 512,
        image_backbone: str = "resnet18",
        pretrained_path: str | None = None,
        depth: int = 3,
        **common,
    ):
        super().__init__(vocab_size, embed_dim, image_backbone, pretrained_path, **common)
        check_positive(depth=depth)
        self.blocks = nn.ModuleList(MultimodalResidualBlock(embed_dim) for _ in range(depth))

    def combine(self, image_repr: Repr, text_repr: Repr) -> torch.Tensor:
        hidden, image = text_repr[0], image_repr[0]
        for block in self.blocks:
            hidden = block(hidden, image)
        return hidden

"""Relationship baseline of the TIRG paper: Santoro et al., "A simple neural network module
for relational reasoning", NIPS 2017.

Eq. 1 (with the question): ``RN(O, q) = f_phi( sum_{i,j} g_theta(o_i, o_j, q) )``. Objects
are the locations of the last conv map (a 1x1 conv reduces them to ``object_dim`` channels)
tagged with their (y, x) coordinates, as in the paper's CLEVR model; ``q`` is the text
feature. ``g_theta`` and ``f_phi`` are 2-layer ReLU MLPs. Two choices that keep results
identical in kind but make the module affordable: the first ``g_theta`` layer is linear in
``[o_i, o_j, q]``, so it is applied per object and broadcast over pairs (the same function
as applying it per pair), and the pair sum is a mean so its scale does not grow with the
map size (the next linear layer absorbs a constant factor).

Batch norm, as the TIRG code puts before its composers' layers (BN-ReLU-FC): on
``g_theta``'s first pre-activation (per pair), on the pooled relations and on ``f_phi``'s
hidden layer. From random weights with SGD the module barely learned without it
(CSS medium preset, seed 0, 300 iterations, docs/reproduce.md: R@1 4.4 without, 8.2
with the first, 10.6 with all three).
"""

from __future__ import annotations

import torch
from torch import nn

from pipeline.models.base import Repr
from pipeline.models.encoder_composer import EncoderComposerModel, check_positive
from pipeline.models.registry import register_model


def coordinate_grid(height: int, width: int, like: torch.Tensor) -> torch.Tensor:
    """(h * w, 2) coordinates in [-1, 1] of the locations of an (h, w) map, row-major."""
    ys = torch.linspace(-1.0, 1.0, height, device=like.device, dtype=like.dtype)
    xs = torch.linspace(-1.0, 1.0, width, device=like.device, dtype=like.dtype)
    return torch.stack(torch.meshgrid(ys, xs, indexing="ij"), dim=-1).reshape(-1, 2)


@register_model("relationship")
class Relationship(EncoderComposerModel):
    """map (B, C, h, w), text (B, D) -> query (B, D), Eq. 1."""

    image_repr_names = ("map",)

    def __init__(
        self,
        vocab_size: int,
        embed_dim: int = 512,
        image_backbone: str = "resnet18",
        pretrained_path: str | None = None,
        object_dim: int = 256,
        relation_dim: int = 256,
        **common,
    ):
        super().__init__(vocab_size, embed_dim, image_backbone, pretrained_path, **common)
        check_positive(object_dim=object_dim, relation_dim=relation_dim)
        obj = object_dim + 2
        self.reduce = nn.Sequential(
            nn.Conv2d(self.image_encoder.channels, object_dim, 1), nn.ReLU()
        )
        self.g_first = nn.Linear(obj, relation_dim)  # o_i part of g's first layer
        self.g_second = nn.Linear(obj, relation_dim, bias=False)  # o_j part
        self.g_text = nn.Linear(embed_dim, relation_dim, bias=False)  # q part
        self.g_norm = nn.BatchNorm1d(relation_dim)
        self.g_rest = nn.Sequential(nn.ReLU(), nn.Linear(relation_dim, relation_dim), nn.ReLU())
        self.f = nn.Sequential(
            nn.BatchNorm1d(relation_dim),
            nn.Linear(relation_dim, embed_dim),
            nn.BatchNorm1d(embed_dim),
            nn.ReLU(),
            nn.Linear(embed_dim, embed_dim),
        )

    def combine(self, image_repr: Repr, text_repr: Repr) -> torch.Tensor:
        feature_map, text = image_repr[0], text_repr[0]
        objects = self.reduce(feature_map).flatten(2).transpose(1, 2)  # (B, N, object_dim)
        coords = coordinate_grid(feature_map.shape[2], feature_map.shape[3], objects)
        objects = torch.cat([objects, coords.expand(objects.shape[0], -1, -1)], dim=2)
        pairs = (
            self.g_first(objects)[:, :, None]
            + self.g_second(objects)[:, None, :]
            + self.g_text(text)[:, None, None]
        )  # (B, N, N, relation_dim)
        pairs = self.g_norm(pairs.flatten(0, 2)).unflatten(0, pairs.shape[:3])
        relations = self.g_rest(pairs).mean(dim=(1, 2))
        return self.f(relations)

"""TIRG: Text Image Residual Gating (Vo et al., "Composing Text and Image for Image
Retrieval - An Empirical Odyssey", CVPR 2019).

Eq. 1-3: ``phi_xt = w_g * f_gate(phi_x, phi_t) + w_r * f_res(phi_x, phi_t)`` with
``f_gate = sigmoid(W_g2 * ReLU(W_g1 * [phi_x, phi_t])) * phi_x`` and
``f_res = W_r2 * ReLU(W_r1 * [phi_x, phi_t])``. Layer shapes follow the released code
(img_text_composition_models.py, ``TIRG`` and ``TIRGLastConv``): the gate MLP is
BN-ReLU-FC, the residual MLP BN-ReLU-FC-ReLU-FC, and ``w_g, w_r`` start at 1 and 10.
"""

from __future__ import annotations

import torch
from torch import nn

from pipeline.models.base import Repr
from pipeline.models.encoder_composer import EncoderComposerModel
from pipeline.models.registry import register_model


def gate_and_residual(joint_dim: int, dim: int) -> tuple[nn.Sequential, nn.Sequential]:
    """TIRG's two MLPs over a joint feature (B, joint_dim) -> (B, dim), as the released
    code builds them: gate BN-ReLU-FC, residual BN-ReLU-FC(2 dim)-ReLU-FC. CCNet's
    expert composers (Eq. 5-7) use the same pair over [x, t, fusion(x, t)]."""
    gate = nn.Sequential(nn.BatchNorm1d(joint_dim), nn.ReLU(), nn.Linear(joint_dim, dim))
    residual = nn.Sequential(
        nn.BatchNorm1d(joint_dim),
        nn.ReLU(),
        nn.Linear(joint_dim, 2 * dim),
        nn.ReLU(),
        nn.Linear(2 * dim, dim),
    )
    return gate, residual


def gated_residual(
    x: torch.Tensor,
    joint: torch.Tensor,
    gate: nn.Module,
    residual: nn.Module,
    w_g: torch.Tensor,
    w_r: torch.Tensor,
) -> torch.Tensor:
    """Eq. 1: ``w_g * sigmoid(gate(joint)) * x + w_r * residual(joint)``; x (B, D) with
    joint (B, J), or a map x (B, C, h, w) with joint (B, J, h, w) (``tirg_lastconv``)."""
    return w_g * torch.sigmoid(gate(joint)) * x + w_r * residual(joint)


class _GateResidualWeights(nn.Module):
    """The learnable scalars w_g, w_r of Eq. 1 (frozen when ``learn_weights`` is False)."""

    def __init__(self, w_g_init: float, w_r_init: float, learn_weights: bool):
        super().__init__()
        self.w_g = nn.Parameter(torch.tensor(float(w_g_init)), requires_grad=bool(learn_weights))
        self.w_r = nn.Parameter(torch.tensor(float(w_r_init)), requires_grad=bool(learn_weights))


def conv_branch(joint: int, out: int) -> nn.Sequential:
    """``tirg_lastconv``'s gate or residual: BN-Conv3x3-ReLU-Conv3x3, (B, joint, h, w) ->
    (B, out, h, w)."""
    return nn.Sequential(
        nn.BatchNorm2d(joint),
        nn.Conv2d(joint, joint, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(joint, out, 3, padding=1),
    )


@register_model("tirg")
class TIRG(EncoderComposerModel):
    """TIRG on the global features: (B, D) image, (B, D) text -> query (B, D), Eq. 1-3."""

    def __init__(
        self,
        vocab_size: int,
        embed_dim: int = 512,
        image_backbone: str = "resnet18",
        pretrained_path: str | None = None,
        w_g_init: float = 1.0,
        w_r_init: float = 10.0,
        learn_weights: bool = True,
        **common,
    ):
        super().__init__(vocab_size, embed_dim, image_backbone, pretrained_path, **common)
        self.weights = _GateResidualWeights(w_g_init, w_r_init, learn_weights)
        self.gate, self.residual = gate_and_residual(2 * embed_dim, embed_dim)

    def combine(self, image_repr: Repr, text_repr: Repr) -> torch.Tensor:
        image, text = image_repr[0], text_repr[0]
        joint = torch.cat([image, text], dim=1)
        return gated_residual(
            image, joint, self.gate, self.residual, self.weights.w_g, self.weights.w_r
        )


@register_model("tirg_lastconv")
class TIRGLastConv(EncoderComposerModel):
    """TIRG applied to the last conv map (TIRG code ``TIRGLastConv``): the text feature
    (B, D) is tiled over the (h, w) locations of the map (B, C, h, w); gate and residual are
    BN-Conv3x3-ReLU-Conv3x3 stacks over [map, text]; the edited map
    ``w_g * sigmoid(gate) * map + w_r * res`` goes through the image encoder's own pooling
    and projection, so queries and targets share that head."""

    image_repr_names = ("map",)

    def __init__(
        self,
        vocab_size: int,
        embed_dim: int = 512,
        image_backbone: str = "resnet18",
        pretrained_path: str | None = None,
        w_g_init: float = 1.0,
        w_r_init: float = 10.0,
        learn_weights: bool = True,
        **common,
    ):
        super().__init__(vocab_size, embed_dim, image_backbone, pretrained_path, **common)
        c, joint = self.image_encoder.channels, self.image_encoder.channels + embed_dim
        self.weights = _GateResidualWeights(w_g_init, w_r_init, learn_weights)
        self.gate = conv_branch(joint, c)
        self.residual = conv_branch(joint, c)

    def combine(self, image_repr: Repr, text_repr: Repr) -> torch.Tensor:
        feature_map, text = image_repr[0], text_repr[0]
        tiled = text[:, :, None, None].expand(-1, -1, feature_map.shape[2], feature_map.shape[3])
        joint = torch.cat([feature_map, tiled], dim=1)
        edited = gated_residual(
            feature_map, joint, self.gate, self.residual, self.weights.w_g, self.weights.w_r
        )
        return self.image_encoder.project(edited)

"""Parameter-hashing baseline of the TIRG paper: Noh et al., "Image Question Answering using
Convolutional Neural Network with Dynamic Parameter Prediction" (DPPnet), CVPR 2016.

A dynamic fully connected layer maps the image feature with weights predicted from the
text (Sec. 3.3, Eq. 4-5): the text predicts ``K`` candidate weights ``p(t)``, and the
(D x D) weight matrix is hashed from them, ``W_ij = xi(i, j) * p_{psi(i, j)}(t)``, with
``psi`` a fixed hash onto [0, K) and ``xi`` a fixed +-1 sign hash; the query is
``W(t) f_img / sqrt(D) + b`` (the 1/sqrt(D) keeps the output scale of an initialised
linear layer). The hashes are drawn once from ``hash_seed`` and stored as buffers, so a
checkpoint carries them.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from pipeline.models.base import Repr
from pipeline.models.encoder_composer import EncoderComposerModel, check_positive
from pipeline.models.registry import register_model


@register_model("param_hashing")
class ParamHashing(EncoderComposerModel):
    """image (B, D), text (B, D) -> query (B, D) = W(text) image + b."""

    def __init__(
        self,
        vocab_size: int,
        embed_dim: int = 512,
        image_backbone: str = "resnet18",
        pretrained_path: str | None = None,
        hashed_params: int = 4096,
        hash_seed: int = 0,
        **common,
    ):
        super().__init__(vocab_size, embed_dim, image_backbone, pretrained_path, **common)
        check_positive(hashed_params=hashed_params)
        d = embed_dim
        self.predict = nn.Linear(d, hashed_params)  # p(t): the K candidate weights
        self.bias = nn.Parameter(torch.zeros(d))
        gen = torch.Generator().manual_seed(int(hash_seed))
        self.register_buffer("hash_index", torch.randint(0, hashed_params, (d * d,), generator=gen))
        self.register_buffer(
            "hash_sign", torch.randint(0, 2, (d * d,), generator=gen).float() * 2 - 1
        )

    def combine(self, image_repr: Repr, text_repr: Repr) -> torch.Tensor:
        image, text = image_repr[0], text_repr[0]
        d = image.shape[1]
        weights = (self.predict(text)[:, self.hash_index] * self.hash_sign).view(-1, d, d)
        return torch.bmm(weights, image.unsqueeze(2)).squeeze(2) / math.sqrt(d) + self.bias

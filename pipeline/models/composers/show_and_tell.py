"""Show-and-Tell baseline of the TIRG paper: Vinyals et al., "Show and Tell: A Neural Image
Caption Generator", CVPR 2015.

Eq. 10-12: ``x_{-1} = CNN(I)`` (here the image feature through ``W_e``), ``x_t = W_e S_t``,
``p_{t+1} = LSTM(x_t)``: an LSTM reads the image first and then the words; its hidden state
after the last word (step ``lengths``, gathered, no packing) is projected to the query. The
text representation is therefore the word embeddings (B, T, E) plus the lengths: the
words can only be read together with the image.
"""

from __future__ import annotations

import torch
from torch import nn

from pipeline.models.base import Repr
from pipeline.models.checks import check_text
from pipeline.models.encoder_composer import EncoderComposerModel
from pipeline.models.registry import register_model
from pipeline.models.text_encoder import last_valid_step
from pipeline.vocab import PAD_ID


@register_model("show_and_tell")
class ShowAndTell(EncoderComposerModel):
    """image (B, D), words (B, T, E), lengths (B,) -> query (B, D)."""

    text_repr_names = ("words", "lengths")

    def __init__(
        self,
        vocab_size: int,
        embed_dim: int = 512,
        image_backbone: str = "resnet18",
        pretrained_path: str | None = None,
        word_dim: int = 512,
        text_hidden_dim: int = 512,
        text_dropout: float = 0.1,
        **common,
    ):
        super().__init__(
            vocab_size,
            embed_dim,
            image_backbone,
            pretrained_path,
            word_dim=word_dim,
            text_hidden_dim=text_hidden_dim,
            text_dropout=text_dropout,
            **common,
        )
        self.image_in = nn.Linear(embed_dim, word_dim)  # W_e for the image step x_{-1}
        self.lstm = nn.LSTM(word_dim, text_hidden_dim, batch_first=True)
        self.out = nn.Sequential(nn.Dropout(text_dropout), nn.Linear(text_hidden_dim, embed_dim))

    def build_text_encoder(
        self, vocab_size: int, embed_dim: int, word_dim: int, hidden_dim: int, dropout: float
    ) -> nn.Module:
        return nn.Embedding(vocab_size, word_dim, padding_idx=PAD_ID)

    def encode_text(self, tokens: torch.Tensor, lengths: torch.Tensor) -> Repr:
        """tokens (B, T), lengths (B,) -> (words (B, T, E), lengths (B,))."""
        check_text(tokens, lengths, self.vocab_size)
        # the copy makes lengths a graph output of its own in exported text encoders
        return self.text_encoder(tokens), lengths.clone()

    def combine(self, image_repr: Repr, text_repr: Repr) -> torch.Tensor:
        words, lengths = text_repr
        steps = torch.cat([self.image_in(image_repr[0]).unsqueeze(1), words], dim=1)
        hidden, _ = self.lstm(steps)  # (B, T + 1, H); step 0 read the image
        return self.out(last_valid_step(hidden, lengths + 1))

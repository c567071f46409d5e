"""Text encoders over padded token ids + lengths (tensors only, so they export to ONNX).

The LSTM encoder follows the TIRG code (TextLSTMModel): word embedding -> LSTM -> the
hidden state at the last valid step -> dropout -> linear. The last valid step is
gathered at ``lengths - 1`` instead of packing sequences: the LSTM is unidirectional,
so padding after a text's end cannot change its earlier steps.
"""

from __future__ import annotations

import torch
from torch import nn

from pipeline.vocab import PAD_ID


def last_valid_step(steps: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """steps (B, T, H), lengths (B,) in [1, T] -> steps[b, lengths[b] - 1] (B, H)."""
    index = (lengths - 1).clamp(min=0).view(-1, 1, 1).expand(-1, 1, steps.shape[2])
    return steps.gather(1, index).squeeze(1)


class LSTMTextEncoder(nn.Module):
    """tokens (B, T) int64, lengths (B,) int64 -> text feature (B, D)."""

    def __init__(
        self,
        vocab_size: int,
        embed_dim: int = 512,
        word_dim: int = 512,
        hidden_dim: int = 512,
        dropout: float = 0.1,
    ):
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, word_dim, padding_idx=PAD_ID)
        self.lstm = nn.LSTM(word_dim, hidden_dim, batch_first=True)
        self.fc = nn.Sequential(nn.Dropout(dropout), nn.Linear(hidden_dim, embed_dim))

    def forward(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        steps, _ = self.lstm(self.embedding(tokens))
        return self.fc(last_valid_step(steps, lengths))

"""Word vocabulary and tokenizer that travel with every checkpoint.

Models take token ids and lengths, never strings (so they export to ONNX); this module
is the only place text becomes tensors. Rules: lower-case, split punctuation off words,
ids 0 = padding, 1 = unknown word. An empty text encodes as one unknown token so every
query has at least one valid step.
"""

from __future__ import annotations

import itertools
import json
import re
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch

PAD, UNK = "<pad>", "<unk>"
PAD_ID, UNK_ID = 0, 1
TOKEN_PATTERN = r"[a-z0-9]+|[^a-z0-9\s]"
_TOKEN_RE = re.compile(TOKEN_PATTERN)


def tokenize(text: str) -> list[str]:
    """Lower-case and split into words and single punctuation marks."""
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    return _TOKEN_RE.findall(text.lower())


class Vocabulary:
    """Word <-> id map built from training texts."""

    def __init__(self, words: Iterable[str]):
        self.words: list[str] = [PAD, UNK]
        seen = set(self.words)
        for word in words:
            if word not in seen:
                self.words.append(word)
                seen.add(word)
        self.index = {w: i for i, w in enumerate(self.words)}

    @classmethod
    def build(cls, texts: Iterable[str], min_count: int = 1) -> Vocabulary:
        """Vocabulary of every token seen at least ``min_count`` times, most frequent first."""
        counts = Counter(tok for text in texts for tok in tokenize(text))
        ranked = sorted(
            (w for w, c in counts.items() if c >= min_count), key=lambda w: (-counts[w], w)
        )
        return cls(ranked)

    def __len__(self) -> int:
        return len(self.words)

    def encode_ids(self, text: str) -> list[int]:
        """Token ids of one text (``[UNK_ID]`` for an empty text)."""
        ids = [self.index.get(tok, UNK_ID) for tok in tokenize(text)]
        return ids or [UNK_ID]

    def encode(
        self, texts: list[str], max_len: int | None = None, pad_to: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch of texts -> ``tokens`` (B, T) int64, ``lengths`` (B,) int64.

        Texts longer than ``max_len`` are truncated; ``pad_to`` fixes T (>= longest).
        """
        if isinstance(texts, str):
            raise TypeError("encode() takes a list of texts, got a single str")
        if not texts:
            raise ValueError("encode() got an empty list of texts")
        seqs = [self.encode_ids(t) for t in texts]
        if max_len is not None:
            if max_len < 1:
                raise ValueError(f"max_len must be >= 1, got {max_len}")
            seqs = [s[:max_len] for s in seqs]
        width = max(len(s) for s in seqs)
        if pad_to is not None:
            if pad_to < width:
                raise ValueError(f"pad_to={pad_to} is shorter than the longest text ({width})")
            width = pad_to
        # one flat fill instead of a tensor per row: evaluation encodes ~10^5 texts
        lengths = np.fromiter(map(len, seqs), dtype=np.int64, count=len(seqs))
        tokens = np.full((len(seqs), width), PAD_ID, dtype=np.int64)
        flat = itertools.chain.from_iterable(seqs)
        tokens[np.arange(width) < lengths[:, None]] = np.fromiter(
            flat, np.int64, int(lengths.sum())
        )
        return torch.from_numpy(tokens), torch.from_numpy(lengths)

    def decode(self, ids: Iterable[int]) -> str:
        return " ".join(self.words[i] for i in ids if i != PAD_ID)

    def to_dict(self) -> dict:
        return {
            "words": self.words,
            "token_pattern": TOKEN_PATTERN,
            "lowercase": True,
            "pad_id": PAD_ID,
            "unk_id": UNK_ID,
        }

    @classmethod
    def from_dict(cls, data: dict) -> Vocabulary:
        words = data["words"]
        if words[:2] != [PAD, UNK]:
            raise ValueError("vocabulary must start with <pad>, <unk>")
        return cls(words[2:])

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict()))

    @classmethod
    def load(cls, path: str | Path) -> Vocabulary:
        return cls.from_dict(json.loads(Path(path).read_text()))

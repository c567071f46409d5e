"""Pre-trained word vectors (GloVe or word2vec *text* format) from a local file."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

log = logging.getLogger(__name__)


def load_word_vectors(
    path: str | Path, words: list[str], dim: int, init: torch.Tensor
) -> torch.Tensor:
    """Rows of ``init`` (V, dim) replaced by the file's vectors for the words it has.

    ``path``: lines ``word v_1 ... v_dim`` (GloVe; a word2vec ``count dim`` header line is
    skipped). Words missing from the file keep their ``init`` row.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"word_vectors_path: no word-vector file at {path}")
    if len(words) != init.shape[0]:
        raise ValueError(f"vocab_words has {len(words)} words but vocab_size is {init.shape[0]}")
    index = {w: i for i, w in enumerate(words)}
    table = init.clone()
    found = 0
    with open(path, encoding="utf-8", errors="replace") as fh:
        for line_no, line in enumerate(fh):
            parts = line.rstrip().split(" ")
            if line_no == 0 and len(parts) == 2 and all(p.isdigit() for p in parts):
                continue  # word2vec header
            if parts[0] not in index:
                continue
            if len(parts) - 1 != dim:
                raise ValueError(
                    f"word_vectors_path {path} line {line_no + 1}: {len(parts) - 1} "
                    f"values, expected word_dim={dim}"
                )
            table[index[parts[0]]] = torch.tensor([float(v) for v in parts[1:]])
            found += 1
    log.info("word vectors: %d of %d vocabulary words found in %s", found, len(words), path)
    return table

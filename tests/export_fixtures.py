"""Tiny checkpoints and shard datasets for the export tests (32 px images, embed_dim 32).

``tiny_checkpoint(dir, name)`` saves a random-weight checkpoint of registered model
``name`` with the smallest sizes its constructor accepts; ``tiny_dataset(dir)`` writes a
gallery of 12 images whose queries hit by id (so rankings, not just labels, decide R@K).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from shard_fixtures import write_dataset

from pipeline.checkpoint import save_checkpoint
from pipeline.models import accepted_kwargs, create_model
from pipeline.vocab import Vocabulary

IMAGE_SIZE = 32
EMBED_DIM = 32
SMALL_SIZES = {
    "embed_dim": EMBED_DIM,
    "expert_dim": EMBED_DIM,
    "word_dim": 16,
    "text_hidden_dim": 16,
    "image_backbone": "resnet18",
    "object_dim": 16,
    "relation_dim": 16,
    "mutan_rank": 2,
    "hashed_params": 64,
    "depth": 1,
}
ID_PROTOCOL = {"name": "css", "ks": [1, 2, 5], "hit": "id", "exclude_reference": True}
TEXTS = [
    "make it color0",
    "turn it color1",
    "add shape2",
    "remove the red circle",
    "put a blue square left",
]


def limit_threads() -> None:
    """The test box has 2 shared cores."""
    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")


def tiny_vocab() -> Vocabulary:
    return Vocabulary.build(TEXTS)


def tiny_checkpoint(directory: Path, name: str, seed: int = 0) -> Path:
    """A checkpoint directory of model ``name`` with random weights."""
    vocab = tiny_vocab()
    accepted = accepted_kwargs(name)
    kwargs = {k: v for k, v in SMALL_SIZES.items() if k in accepted}
    torch.manual_seed(seed)
    model = create_model(name, vocab_size=len(vocab), **kwargs)
    config = {
        "name": f"export-test-{name}",
        "model": {"name": name, **kwargs},
        "image": {"size": IMAGE_SIZE},
    }
    return save_checkpoint(directory, model, vocab, config)


def tiny_dataset(directory: Path, gallery_size: int = 12) -> Path:
    """Shards with ``gallery_size`` gallery images (shards of 4) and 8 id-hit queries."""
    path = write_dataset(
        directory,
        explicit_groups=1,
        derived_groups=False,
        gallery_size=gallery_size,
        gallery_shard_size=4,
        query_count=8,
        image_size=IMAGE_SIZE,
        protocol=ID_PROTOCOL,
    )
    assert (
        json.loads((path / "manifest.json").read_text())["splits"]["gallery"]["samples"]
        == gallery_size
    )
    return path


def cached_export(tmp_path_factory, name: str, image_size: int | None = None) -> tuple[Path, Path]:
    """``(ART_DIR, checkpoint dir)`` of a tiny ``name`` model, exported once per test session
    (a finished ART_DIR under the session's base temp dir is reused). Tests that write into
    ART_DIR copy it first."""
    from export.onnx import export_artifacts

    base = tmp_path_factory.getbasetemp() / "export-cache" / name
    art, ckpt = base / "art", base / "ckpt"
    if not (art / "artifacts.json").is_file():
        tiny_checkpoint(ckpt, name)
        export_artifacts(
            ckpt,
            art,
            image_size=image_size,
            threads=1,
            parity_batches=(1, 3),
            parity_lengths=(1, 5),
        )
    return art, ckpt

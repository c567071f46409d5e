"""A random-weight model exported to an artifact directory, for benches on machines
without a trained run (nothing is downloaded)."""

from __future__ import annotations

from pathlib import Path

import torch


def random_artifacts(
    out: Path, model_name: str, image_size: int, embed_dim: int = 512, threads: int = 0
) -> Path:
    """Export a random-weight ``model_name`` (vocabulary of 998 words; ``embed_dim`` is
    CCNet's D per expert) to ``out/artifacts``
    (its checkpoint in ``out/checkpoint``); returns the artifact directory."""
    from export.onnx import export_artifacts
    from pipeline.checkpoint import save_checkpoint
    from pipeline.models import create_model, size_kwarg
    from pipeline.vocab import Vocabulary

    vocab = Vocabulary([f"word{i}" for i in range(998)])
    torch.manual_seed(0)
    model = create_model(model_name, vocab_size=len(vocab), **{size_kwarg(model_name): embed_dim})
    config = {
        "name": f"bench-{model_name}",
        "model": {"name": model_name},
        "image": {"size": image_size},
    }
    save_checkpoint(out / "checkpoint", model, vocab, config)
    export_artifacts(
        out / "checkpoint",
        out / "artifacts",
        threads=threads,
        parity_batches=(1, 2),
        parity_lengths=(1, 4),
    )
    return out / "artifacts"

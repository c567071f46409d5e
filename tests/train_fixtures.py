"""Tiny run configs for the training tests (32 px images, D = 32, a few steps)."""

from __future__ import annotations

from pathlib import Path

import torch

from pipeline.checkpoint import load_checkpoint
from pipeline.config import load_config, resolve_run_paths
from pipeline.distributed import LocalContext
from pipeline.loop import train_loop

ROOT = Path(__file__).resolve().parent.parent


def tiny_config(data: Path, out: Path, *overrides: str, model: str = "tirg") -> dict:
    """``configs/css_<model>.yaml`` shrunk to seconds of CPU work per run."""
    return resolve_run_paths(
        load_config(
            ROOT / "configs" / f"css_{model}.yaml",
            [
                f"data={data}",
                f"out={out}",
                "model.embed_dim=32",
                "image.size=32",
                "train.batch_size=8",
                "train.batches_per_epoch=5",
                "train.steps=8",
                "train.threads=1",
                "train.loader_workers=0",
                "train.shuffle_buffer=20",
                "train.channels_last=false",
                "train.amp=false",
                "train.use_gpu=false",
                "train.log_every=2",
                "train.checkpoint_every=2",
                "train.num_to_keep=10",
                "train.cpus_per_worker=0.9",
                "optim.name=adam",
                "optim.lr=1e-3",
                "eval.batch_size=16",
                *overrides,
            ],
        )
    )


def final_weights(config: dict) -> dict[str, torch.Tensor]:
    """Train ``config`` in process; the state dict of its last checkpoint."""
    context = LocalContext(config["train"]["storage_path"], config["train"]["run_name"])
    train_loop(config, context=context)
    return load_checkpoint(context.checkpoints()[-1])["model"]

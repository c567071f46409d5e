"""What a run trains with: the model from the registry, the optimiser with its two
parameter groups (trunk at ``backbone_lr_mult`` x lr), the LR schedule, the seed."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from pipeline.vocab import Vocabulary


def is_backbone_parameter(name: str) -> bool:
    """CNN trunk weights, trained at ``backbone_lr_mult`` x lr as in the TIRG code (its
    ResNet-18 trunk gets 0.1 x lr, the projection and composer the full lr)."""
    return "backbone" in name.split(".")


def build_optimizer(
    model: nn.Module, optim: dict[str, Any], capturable: bool = False
) -> torch.optim.Optimizer:
    """SGD / Adam / AdamW over two parameter groups: trunk (lr x mult) and the rest.
    ``capturable``: Adam's state on the device, so a CUDA graph can replay its step
    (``pipeline.step_graph``; SGD's step is capturable as it is)."""
    trunk, rest = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (trunk if is_backbone_parameter(name) else rest).append(param)
    lr = float(optim["lr"])
    groups = [{"params": rest, "lr": lr}]
    if trunk:
        groups.append({"params": trunk, "lr": lr * float(optim["backbone_lr_mult"])})
    weight_decay = float(optim["weight_decay"])
    if optim["name"] == "sgd":
        return torch.optim.SGD(
            groups, lr=lr, momentum=float(optim["momentum"]), weight_decay=weight_decay
        )
    betas = tuple(float(b) for b in optim["betas"])
    cls = torch.optim.AdamW if optim["name"] == "adamw" else torch.optim.Adam
    extra = {"capturable": True} if capturable else {}
    return cls(groups, lr=lr, betas=betas, weight_decay=weight_decay, **extra)


def lr_factor(step: int, optim: dict[str, Any], decay_steps: int) -> float:
    """Multiplier of the base lr after ``step`` optimiser steps.

    step: gamma ** floor(step / decay_steps) (TIRG's code: x0.1 every
    ``--learning_rate_decay_frequency`` iterations, by default never; CCNet: x0.95 after
    every epoch, ``decay_steps: epoch``); exponential: gamma ** (step / decay_steps), the
    same decay spread over the steps; constant: 1.
    A linear warm-up over ``warmup_steps`` multiplies all three.
    """
    warmup = int(optim["warmup_steps"])
    factor = min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0
    gamma = float(optim["gamma"])
    if optim["schedule"] == "step":
        factor *= gamma ** (step // decay_steps)
    elif optim["schedule"] == "exponential":
        factor *= gamma ** (step / decay_steps)
    return factor


def build_scheduler(
    optimizer: torch.optim.Optimizer, optim: dict[str, Any], batches_per_epoch: int
) -> torch.optim.lr_scheduler.LambdaLR:
    decay = optim["decay_steps"]
    decay_steps = batches_per_epoch if decay == "epoch" else int(decay)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, optim, decay_steps)
    )


def build_model(config: dict[str, Any], vocab: Vocabulary) -> nn.Module:
    from pipeline.models import create_model

    kwargs = {k: v for k, v in config["model"].items() if k != "name"}
    if kwargs.get("word_vectors_path"):  # CCNet: pretrained vectors are looked up by word
        kwargs["vocab_words"] = list(vocab.words)
    return create_model(config["model"]["name"], vocab_size=len(vocab), **kwargs)


def seed_everything(seed: int) -> None:
    """Same initial weights on every rank (DDP also broadcasts rank 0's)."""
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)

"""The training loop: one function for one process, Ray Train workers and Tune trials.

``train_loop(config, context=...)`` builds the model from the registry, streams this
rank's (reference, text, target) triplets from the shards, and optimises the configured
loss for ``train.steps`` steps. Every ``checkpoint_every`` steps (and at the end) rank
0 writes a checkpoint (weights, optimiser, scheduler, step, vocabulary, resolved config)
and the context persists it; every ``eval_every`` steps (and at the end) rank 0 runs
the dataset's evaluation protocol and the recalls go into the same report, so Ray Tune
can stop bad trials on them. A restarted run (worker failure, or the same command again)
restores the newest checkpoint and continues at its step, skipping the batches of the
current epoch that it already trained on, so it ends at the same step count.

What differs between one process and Ray is behind ``pipeline.distributed.RunContext``;
this module never imports Ray.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.checkpoint import load_checkpoint, save_checkpoint
from pipeline.distributed import LocalContext, RunContext, scratch_dir
from pipeline.vocab import Vocabulary

log = logging.getLogger(__name__)

BatchSource = Callable[[int], Iterable[dict[str, Any]]]


def local_context(config: dict[str, Any]) -> LocalContext:
    """The in-process context for a resolved config (``pipeline.config.resolve_run_paths``)."""
    train = config["train"]
    return LocalContext(
        train["storage_path"],
        train["run_name"],
        use_gpu=train["use_gpu"],
        num_to_keep=train["num_to_keep"],
    )


def is_backbone_parameter(name: str) -> bool:
    """CNN trunk weights, trained at ``backbone_lr_mult`` x lr as in the TIRG code (its
    ResNet-18 trunk gets 0.1 x lr, the projection and composer the full lr)."""
    return "backbone" in name.split(".")


def build_optimizer(model: nn.Module, optim: dict[str, Any]) -> torch.optim.Optimizer:
    """SGD / Adam / AdamW over two parameter groups: trunk (lr x mult) and the rest."""
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
    return cls(groups, lr=lr, betas=betas, weight_decay=weight_decay)


def lr_factor(step: int, optim: dict[str, Any], decay_steps: int) -> float:
    """Multiplier of the base lr after ``step`` optimiser steps.

    step: gamma ** floor(step / decay_steps) (TIRG: x0.1 every 50k iterations);
    exponential: gamma ** (step / decay_steps) (CCNet: x0.95 per epoch); constant: 1.
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


def inject_fault(config: dict[str, Any], rank: int, step: int) -> None:
    """``fault_injection: {step, rank}``: that rank's process dies once at that step.

    A marker file in the run directory makes it happen only on the first attempt, so
    the restarted workers run through (tests of ``FailureConfig(max_failures)``).
    """
    fault = config.get("fault_injection")
    if not fault or step != fault["step"] or rank != fault.get("rank", 0):
        return
    marker = Path(config["out"]) / f"fault-injected-rank{rank}-step{step}"
    if marker.exists():
        return
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text("the training process of this rank was killed here once\n")
    log.warning("fault_injection: rank %d exits at step %d", rank, step)
    os._exit(17)  # like a killed worker: no exception, no cleanup


class TrainState:
    """Loss/throughput accumulated between two log lines or reports.

    The loss is summed on the device: reading it back every step would make the host
    wait for the GPU each step, so it is read only when logged or checked.
    """

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.loss_sum: torch.Tensor | float = 0.0
        self.batches, self.samples, self.start = 0, 0, time.perf_counter()

    def add(self, loss: torch.Tensor, samples: int) -> None:
        self.loss_sum = self.loss_sum + loss.detach().float()
        self.batches += 1
        self.samples += samples

    @property
    def loss(self) -> float:
        return float(self.loss_sum) / max(self.batches, 1)

    @property
    def samples_per_s(self) -> float:
        return self.samples / max(time.perf_counter() - self.start, 1e-9)


class TimeLimit:
    """``train.time_limit_s``: has this run's wall-clock training budget been spent?

    Counted from the start of this attempt's loop. With several ranks the ranks agree
    (any rank out of time stops all) every ``sync_every`` steps, so that no rank waits
    in a collective that the others never reach.
    """

    def __init__(self, seconds: float | None, context: RunContext, sync_every: int = 20):
        self.deadline = None if seconds is None else time.monotonic() + float(seconds)
        self.context, self.sync_every = context, sync_every

    def spent(self, step: int) -> bool:
        if self.deadline is None:
            return False
        if self.context.world_size == 1:
            return time.monotonic() >= self.deadline
        if step % self.sync_every:
            return False
        return self.context.mean_over_ranks(float(time.monotonic() >= self.deadline)) > 0


def check_finite(state: TrainState, step: int, rank: int) -> None:
    value = state.loss
    if not math.isfinite(value):
        raise FloatingPointError(
            f"loss is {value} in the {state.batches} steps up to step {step} on rank {rank}"
        )


def evaluate(
    model: nn.Module, vocab: Vocabulary, config: dict[str, Any], device: torch.device
) -> dict[str, float]:
    """The dataset's evaluation protocol (rank 0 only); the model is back in train mode after."""
    from pipeline.evaluate import evaluate_model

    image, ev = config["image"], config["eval"]
    was_training = model.training
    model.eval()
    try:
        metrics = evaluate_model(
            model,
            vocab,
            config["data"],
            eval_name=ev["eval_set"],
            image_size=image["size"],
            mean=image["mean"],
            std=image["std"],
            batch_size=ev["batch_size"],
            device=device,
            rerank_top=ev["rerank_top"],
            grid_png=ev["grid_png"],
        )
    finally:
        model.train(was_training)
    return {k: float(v) if isinstance(v, (int, float)) else v for k, v in metrics.items()}


def recall_line(recalls: dict[str, Any]) -> str:
    """``"R@1 12.30  R@5 40.10 ..."``: the protocol's recalls of one evaluation, for the log."""
    return "  ".join(f"{key} {value:.2f}" for key, value in recalls.items() if key.startswith("R@"))


def shard_batches(
    config: dict[str, Any], vocab: Vocabulary, context: RunContext, batches_per_epoch: int
) -> BatchSource:
    """This rank's training batches of one epoch, streamed from the shards."""
    from pipeline.data import triplet_loader

    train, image = config["train"], config["image"]

    def epoch_batches(epoch: int) -> Iterable[dict[str, Any]]:
        return triplet_loader(
            config["data"],
            vocab,
            batch_size=train["batch_size"],
            image_size=image["size"],
            rank=context.rank,
            world_size=context.world_size,
            seed=int(train["seed"]),
            epoch=epoch,
            loader_workers=train["loader_workers"],
            shuffle_buffer=train["shuffle_buffer"],
            batches_per_epoch=batches_per_epoch,
            mean=image["mean"],
            std=image["std"],
            augment=image["augment"],
            device=context.device,
            max_text_len=train["max_text_len"],
            triplets_per_group=train["triplets_per_group"],
        )

    return epoch_batches


def train_loop(
    config: dict[str, Any],
    *,
    context: RunContext | None = None,
    vocab: Vocabulary | dict | None = None,
    batch_source: BatchSource | None = None,
) -> dict[str, Any]:
    """Train ``config`` (resolved: ``pipeline.config.resolve_run_paths``) to
    ``train.steps`` steps; returns the last reported metrics (``step``, ``loss``, R@K).

    ``vocab`` (a Vocabulary or its ``to_dict``) is rebuilt from the training shards
    when not given (deterministic, so every worker gets the same one).
    ``batch_source(epoch)`` yields the epoch's batches (dicts with ``ref_images``,
    ``target_images`` (B, 3, S, S), ``tokens`` (B, T), ``lengths`` (B,)); the default
    streams this rank's shards (``shard_batches``); the throughput bench feeds
    synthetic tensors to time the model alone.
    """
    from pipeline.data import build_vocabulary, default_batches_per_epoch
    from pipeline.losses import compute_loss

    context = context or local_context(config)
    train, optim = config["train"], config["optim"]
    rank, world, device = context.rank, context.world_size, context.device
    if train["threads"]:
        torch.set_num_threads(int(train["threads"]))
    if isinstance(vocab, dict):
        vocab = Vocabulary.from_dict(vocab)
    vocab = vocab or build_vocabulary(config["data"])

    seed_everything(int(train["seed"]))
    model = build_model(config, vocab).to(device)
    channels_last = bool(train["channels_last"])
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, optim)
    batches_per_epoch = train["batches_per_epoch"] or default_batches_per_epoch(
        config["data"], train["batch_size"], world
    )
    scheduler = build_scheduler(optimizer, optim, batches_per_epoch)
    batch_source = batch_source or shard_batches(config, vocab, context, batches_per_epoch)

    step, metrics = 0, {}
    with context.latest_checkpoint() as directory:
        if directory is not None:
            payload = load_checkpoint(directory, map_location=device)
            model.load_state_dict(payload["model"])
            optimizer.load_state_dict(payload["optimizer"])
            scheduler.load_state_dict(payload["scheduler"])
            step, metrics = int(payload["step"]), dict(payload["metrics"])
            log.info("rank %d: resumed from %s at step %d", rank, directory, step)

    total = int(train["steps"])
    if step >= total:
        return metrics  # the same command after a finished run: nothing left to do
    ddp_model = context.wrap_model(model)
    model.train()
    use_amp = bool(train["amp"]) and device.type == "cuda"
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if use_amp else nullcontext()
    writer = tensorboard_writer(config) if context.is_main else None
    loss_cfg = {k: v for k, v in config["loss"].items() if k != "name"}
    log_every, eval_every = int(train["log_every"]), int(train["eval_every"])
    checkpoint_every = int(train["checkpoint_every"])
    interval, since_report = TrainState(), TrainState()
    check_every = log_every or 100  # steps between reading the loss back (NaN check)
    time_limit = TimeLimit(train["time_limit_s"], context)

    while step < total:
        epoch, done_in_epoch = divmod(step, batches_per_epoch)
        yielded = 0
        for index, batch in enumerate(batch_source(epoch)):
            yielded = index + 1
            if index < done_in_epoch:
                continue  # trained on before the restore
            if index >= batches_per_epoch or step >= total:
                break
            ref, tgt = batch["ref_images"].to(device), batch["target_images"].to(device)
            if channels_last:
                ref = ref.contiguous(memory_format=torch.channels_last)
                tgt = tgt.contiguous(memory_format=torch.channels_last)
            tokens, lengths = batch["tokens"].to(device), batch["lengths"].to(device)
            with autocast:
                outputs = ddp_model(ref, tokens, lengths, tgt)
                loss, loss_logs = compute_loss(outputs, config["loss"]["name"], **loss_cfg)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if optim["grad_clip"]:
                nn.utils.clip_grad_norm_(model.parameters(), float(optim["grad_clip"]))
            optimizer.step()
            scheduler.step()
            step += 1
            inject_fault(config, rank, step)

            interval.add(loss, ref.shape[0])
            since_report.add(loss, ref.shape[0])
            if time_limit.spent(step) and step < total:
                log.info(
                    "rank %d: train.time_limit_s=%s spent at step %d of %d; ending the run here",
                    rank,
                    train["time_limit_s"],
                    step,
                    total,
                )
                total = step
            if step % check_every == 0 or step == total:
                check_finite(interval, step, rank)
            lr = optimizer.param_groups[0]["lr"]
            if context.is_main and log_every and (step % log_every == 0 or step == total):
                log.info(
                    "step %d/%d  loss %.4f  %.1f samples/s/worker  lr %.3g",
                    step,
                    total,
                    interval.loss,
                    interval.samples_per_s,
                    lr,
                )
                writer.add_scalar("train/loss", interval.loss, step)
                writer.add_scalar("train/samples_per_s", interval.samples_per_s * world, step)
                writer.add_scalar("train/lr", lr, step)
                for key, val in loss_logs.items():
                    writer.add_scalar(f"train/{key}", float(val), step)
                interval.reset()

            last = step == total
            do_eval = (last and config["eval"]["at_end"]) or (eval_every and step % eval_every == 0)
            do_checkpoint = last or (checkpoint_every and step % checkpoint_every == 0)
            if do_eval or do_checkpoint:
                metrics = {
                    "step": step,
                    "epoch": epoch,
                    "lr": lr,
                    "loss": context.mean_over_ranks(since_report.loss),
                    "samples_per_s": since_report.samples_per_s * world,
                }
                since_report.reset()
                if do_eval and context.is_main:
                    recalls = evaluate(model, vocab, config, device)
                    metrics.update(recalls)
                    log.info("step %d/%d  eval %s", step, total, recall_line(recalls))
                    for key, val in recalls.items():
                        if isinstance(val, float):
                            writer.add_scalar(f"eval/{key}", val, step)
                report(
                    context,
                    metrics,
                    model,
                    vocab,
                    config,
                    optimizer,
                    scheduler,
                    with_checkpoint=do_checkpoint,
                )
                since_report.start = time.perf_counter()  # evaluation is not training time
        if step < total and yielded < batches_per_epoch:
            raise RuntimeError(
                f"epoch {epoch} yielded {yielded} batches on rank {rank}, "
                f"expected {batches_per_epoch} (every rank must get as many)"
            )
    if writer is not None:
        writer.close()
    return metrics


def report(
    context: RunContext,
    metrics: dict[str, Any],
    model: nn.Module,
    vocab: Vocabulary,
    config: dict[str, Any],
    optimizer,
    scheduler,
    *,
    with_checkpoint: bool,
) -> None:
    """Report on every rank; rank 0 attaches a checkpoint when one is due."""
    if not (with_checkpoint and context.is_main):
        context.report(metrics)
        return
    with scratch_dir() as directory:
        save_checkpoint(
            directory,
            model,
            vocab,
            config,
            optimizer=optimizer,
            scheduler=scheduler,
            step=int(metrics["step"]),
            metrics=metrics,
        )
        context.report(metrics, checkpoint_dir=directory)


def tensorboard_writer(config: dict[str, Any]):
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(log_dir=str(Path(config["out"]) / "tb"))

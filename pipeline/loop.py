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
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.checkpoint import load_checkpoint, restore_rng_state, save_checkpoint
from pipeline.distributed import LocalContext, RunContext, scratch_dir
from pipeline.optimization import build_model, build_optimizer, build_scheduler, seed_everything
from pipeline.run_control import TimeLimit, TrainState, check_finite, inject_fault
from pipeline.step_graph import (
    EagerStep,
    GraphedStep,
    build_stepper,
    graph_unsupported,
    optimizer_step,
    step_inputs,
)
from pipeline.train_eval import TrainingEvaluator, recall_line
from pipeline.vocab import Vocabulary

log = logging.getLogger(__name__)

# (epoch, skip) -> the epoch's batches from index ``skip`` on (earlier ones: trained)
BatchSource = Callable[[int, int], Iterable[dict[str, Any]]]


def local_context(config: dict[str, Any]) -> LocalContext:
    """The in-process context for a resolved config (``pipeline.config.resolve_run_paths``)."""
    train = config["train"]
    return LocalContext(
        train["storage_path"],
        train["run_name"],
        use_gpu=train["use_gpu"],
        num_to_keep=train["num_to_keep"],
    )


def shard_batches(
    config: dict[str, Any], vocab: Vocabulary, context: RunContext, batches_per_epoch: int
) -> BatchSource:
    """This rank's training batches of an epoch, streamed from the shards; a resumed
    epoch starts at its first untrained batch without decoding the ones before."""
    from pipeline.data import triplet_loader

    train, image = config["train"], config["image"]

    loader = None

    def epoch_batches(epoch: int, skip: int = 0) -> Iterable[dict[str, Any]]:
        nonlocal loader
        if loader is None:
            loader = make_loader(epoch)
        return loader.epoch_batches(epoch, skip)

    def make_loader(epoch: int):
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
            image_cache=train["image_cache"],
            image_cache_gb=train["image_cache_gb"],
            progress=context.is_main,
        )

    return epoch_batches


@dataclass
class Run:
    """Everything one attempt of a run trains with (``build_run``)."""

    config: dict[str, Any]
    context: RunContext
    vocab: Vocabulary
    model: nn.Module
    ddp_model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    batches_per_epoch: int
    batch_source: BatchSource
    autocast: Any
    writer: Any
    evaluator: TrainingEvaluator
    stepper: EagerStep | GraphedStep | None = None  # set by ``train_loop`` after a restore


def build_run(
    config: dict[str, Any],
    context: RunContext,
    vocab: Vocabulary | dict | None,
    batch_source: BatchSource | None,
) -> Run:
    """Model (seeded, on the device), optimiser, LR schedule and this rank's batches."""
    from pipeline.shard_groups import build_vocabulary, default_batches_per_epoch

    train, optim = config["train"], config["optim"]
    if train["threads"]:
        torch.set_num_threads(int(train["threads"]))
    if isinstance(vocab, dict):
        vocab = Vocabulary.from_dict(vocab)
    vocab = vocab or build_vocabulary(config["data"])
    seed_everything(int(train["seed"]))
    model = build_model(config, vocab).to(context.device)
    if train["channels_last"]:
        model = model.to(memory_format=torch.channels_last)
    graphs = graph_unsupported(context.device, context.world_size, train["step_graph"]) is None
    optimizer = build_optimizer(model, optim, capturable=graphs)
    batches_per_epoch = train["batches_per_epoch"] or default_batches_per_epoch(
        config["data"], train["batch_size"], context.world_size
    )
    device_type = context.device.type
    use_amp = bool(train["amp"]) and (device_type == "cuda" or cpu_bf16_autocast(train))
    return Run(
        config=config,
        context=context,
        vocab=vocab,
        model=model,
        ddp_model=model,  # wrapped for DDP after a restore (``train_loop``)
        optimizer=optimizer,
        scheduler=build_scheduler(optimizer, optim, batches_per_epoch),
        batches_per_epoch=batches_per_epoch,
        batch_source=batch_source or shard_batches(config, vocab, context, batches_per_epoch),
        # a CUDA graph replays the casts, so autocast must not cache them across steps
        autocast=torch.autocast(device_type, dtype=torch.bfloat16, cache_enabled=not graphs)
        if use_amp
        else nullcontext(),
        writer=tensorboard_writer(config) if context.is_main else None,
        evaluator=TrainingEvaluator(config, context.device, progress=context.is_main),
    )


def cpu_bf16_supported() -> bool:
    """Whether oneDNN runs bf16 natively on this CPU (AVX-512 BF16 or AMX)."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def cpu_bf16_autocast(train: dict[str, Any]) -> bool:
    """``train.amp_on_cpu``, where this CPU has native bf16. Elsewhere (AVX2 only: Zen 3,
    older Xeons) oneDNN's bf16 LSTM cannot be built at all ("could not create a primitive
    descriptor") and the emulated convolutions are slower than float32, so the run trains
    in float32 and one log line says why."""
    if not train["amp_on_cpu"]:
        return False
    if cpu_bf16_supported():
        return True
    log.warning(
        "train.amp_on_cpu: this CPU has no native bf16 (AVX-512 BF16 / AMX); training in float32"
    )
    return False


def restore(run: Run) -> tuple[int, dict[str, Any]]:
    """(step, metrics) of the newest checkpoint, its weights and optimiser state loaded;
    (0, {}) for a fresh run."""
    with run.context.latest_checkpoint() as directory:
        if directory is None:
            return 0, {}
        payload = load_checkpoint(directory, map_location=run.context.device)
        run.model.load_state_dict(payload["model"])
        run.optimizer.load_state_dict(payload["optimizer"])
        run.scheduler.load_state_dict(payload["scheduler"])
        restore_rng_state(payload.get("rng"))
        step = int(payload["step"])
        log.info("rank %d: resumed from %s at step %d", run.context.rank, directory, step)
        return step, dict(payload["metrics"])


def make_stepper(run: Run) -> EagerStep | GraphedStep:
    """The run's step function (``pipeline.step_graph``): eager or one CUDA graph."""
    train = run.config["train"]
    return build_stepper(
        optimizer_step(
            run.model,
            run.ddp_model,
            run.optimizer,
            run.autocast,
            run.config["loss"],
            run.config["optim"]["grad_clip"],
        ),
        step_inputs(run.context.device, bool(train["channels_last"])),
        run.optimizer,
        device=run.context.device,
        world_size=run.context.world_size,
        setting=train["step_graph"],
        batch_size=int(train["batch_size"]),
        max_text_len=train["max_text_len"],
    )


def train_step(run: Run, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, Any], int]:
    """One optimiser step on ``batch`` (eager or a graph replay) and the LR schedule's
    step; (loss, loss logs, batch size), nothing read back."""
    loss, loss_logs, size = run.stepper(batch)
    run.scheduler.step()
    return loss, loss_logs, size


def log_progress(
    run: Run, step: int, total: int, interval: TrainState, loss_logs: dict[str, Any]
) -> None:
    """Rank 0's progress line and TensorBoard scalars (reads the loss back)."""
    lr = run.optimizer.param_groups[0]["lr"]
    log.info(
        "step %d/%d  loss %.4f  %.1f samples/s/worker  lr %.3g",
        step,
        total,
        interval.loss,
        interval.samples_per_s,
        lr,
    )
    run.writer.add_scalar("train/loss", interval.loss, step)
    run.writer.add_scalar(
        "train/samples_per_s", interval.samples_per_s * run.context.world_size, step
    )
    run.writer.add_scalar("train/lr", lr, step)
    for key, val in loss_logs.items():
        run.writer.add_scalar(f"train/{key}", float(val), step)


def evaluate_and_report(
    run: Run,
    step: int,
    epoch: int,
    total: int,
    since_report: TrainState,
    *,
    with_eval: bool,
    with_checkpoint: bool,
) -> dict[str, Any]:
    """Metrics of the steps since the last report; rank 0 evaluates (``with_eval``) and
    checkpoints (``with_checkpoint``); every rank reports. Returns the metrics."""
    context = run.context
    metrics = {
        "step": step,
        "epoch": epoch,
        "lr": run.optimizer.param_groups[0]["lr"],
        "loss": context.mean_over_ranks(since_report.loss),
        "samples_per_s": since_report.samples_per_s * context.world_size,
    }
    if with_eval and context.is_main:
        recalls = run.evaluator(run.model, run.vocab)
        metrics.update(recalls)
        log.info("step %d/%d  eval %s", step, total, recall_line(recalls))
        for key, val in recalls.items():
            if isinstance(val, float):
                run.writer.add_scalar(f"eval/{key}", val, step)
    report(
        context,
        metrics,
        run.model,
        run.vocab,
        run.config,
        run.optimizer,
        run.scheduler,
        with_checkpoint=with_checkpoint,
    )
    return metrics


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
    ``batch_source(epoch, skip)`` yields the epoch's batches from index ``skip`` on
    (dicts with ``ref_images``, ``target_images`` (B, 3, S, S), ``tokens`` (B, T),
    ``lengths`` (B,)); the default streams this rank's shards (``shard_batches``); the
    throughput bench feeds synthetic tensors to time the model alone.

    Reads top to bottom: build, restore, then per step: train, log, evaluate +
    checkpoint + report when due.
    """
    context = context or local_context(config)
    run = build_run(config, context, vocab, batch_source)
    step, metrics = restore(run)
    train = config["train"]
    total = int(train["steps"])
    if step >= total:
        return metrics  # the same command after a finished run: nothing left to do
    run.ddp_model = context.wrap_model(run.model)
    run.model.train()
    run.stepper = make_stepper(run)
    log_every, eval_every = int(train["log_every"]), int(train["eval_every"])
    checkpoint_every = int(train["checkpoint_every"])
    interval, since_report = TrainState(), TrainState()
    check_every = log_every or 100  # steps between reading the loss back (NaN check)
    time_limit = TimeLimit(train["time_limit_s"], context)
    per_epoch = run.batches_per_epoch

    while step < total:
        epoch, done_in_epoch = divmod(step, per_epoch)
        yielded = done_in_epoch  # the trained batches are skipped, not decoded
        for batch in run.batch_source(epoch, done_in_epoch):
            if yielded >= per_epoch or step >= total:
                break
            yielded += 1
            loss, loss_logs, size = train_step(run, batch)
            step += 1
            inject_fault(config, context.rank, step)
            interval.add(loss, size)
            since_report.add(loss, size)
            if time_limit.spent(step) and step < total:
                log.info(
                    "rank %d: train.time_limit_s=%s spent at step %d of %d; ending the run here",
                    context.rank,
                    train["time_limit_s"],
                    step,
                    total,
                )
                total = step
            if step % check_every == 0 or step == total:
                check_finite(interval, step, context.rank)
            if context.is_main and log_every and (step % log_every == 0 or step == total):
                log_progress(run, step, total, interval, loss_logs)
                interval.reset()
            last = step == total
            with_eval = (last and config["eval"]["at_end"]) or bool(
                eval_every and step % eval_every == 0
            )
            with_checkpoint = last or bool(checkpoint_every and step % checkpoint_every == 0)
            if with_eval or with_checkpoint:
                metrics = evaluate_and_report(
                    run,
                    step,
                    epoch,
                    total,
                    since_report,
                    with_eval=with_eval,
                    with_checkpoint=with_checkpoint,
                )
                since_report.reset()  # evaluation is not training time
        if step < total and yielded < per_epoch:
            raise RuntimeError(
                f"epoch {epoch} yielded {yielded} batches on rank {context.rank}, "
                f"expected {per_epoch} (every rank must get as many)"
            )
    if run.writer is not None:
        run.writer.close()
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

"""One training step: eager, or the whole step replayed as one CUDA graph.

At the papers' batch of 32 a ResNet-18 step is a few ms of GPU work spread over
hundreds of small kernels, so an eager step is bound by the host launching them.
``GraphedStep`` captures forward, loss, backward, gradient clipping and the optimiser
step once per text-length bucket (``torch.cuda.graph``, after warm-up steps on a side
stream) and then replays it over static input buffers: one launch per step, and no
host sync inside it (the loss is read back only at log and check steps, as eagerly).

``train.step_graph``: ``auto`` (graph on CUDA, eager elsewhere), ``true``, ``false``.
Whatever keeps a run from a graph -- a CPU device, DDP over several ranks, a batch of
another size, a capture error -- makes that run (or that batch) eager, with one log
line that says why. What the graph keeps out:

* the LR schedule runs on the host after each step, as eagerly; the optimiser's
  learning rates are constants of a capture, so a changed LR re-captures the graphs
  (a step decay does that a few times per run; a schedule that changes every step
  would re-capture every step, so past ``MAX_RECAPTURES`` the run goes eager);
* soft triplet's random negatives come from the CUDA generator, whose graph-safe
  philox offsets advance on every replay: the run stays seeded (not bit-equal to an
  eager run, whose draws interleave differently).

Adam and AdamW are built with ``capturable=True`` for graph runs (their step count
lives on the device). Text is padded to a bucket of ``LENGTH_BUCKET`` tokens: the text
encoders read the last valid step (``last_valid_step``) or mask by length, so padding
leaves the outputs unchanged.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

log = logging.getLogger("pipeline.loop")

LENGTH_BUCKET = 8  # text lengths are padded up to a multiple of this
WARMUP_STEPS = 3  # eager steps on a side stream before the first capture (cuDNN, lazy init)
MAX_RECAPTURES = 20  # LR changes that may re-capture before the run goes eager

StepResult = tuple[torch.Tensor, dict[str, Any], int]


def graph_unsupported(device: torch.device, world_size: int, setting: Any) -> str | None:
    """Why this run's steps cannot be one CUDA graph (None: they can)."""
    if setting is False:
        return "train.step_graph=false"
    if device.type != "cuda":
        return f"the device is {device.type}: CUDA graphs need a CUDA device"
    if world_size > 1:
        return f"DDP over {world_size} ranks: its gradient all-reduce is not captured here"
    return None


def padded_length(length: int, limit: int | None) -> int:
    """``length`` rounded up to a multiple of ``LENGTH_BUCKET`` (at most ``limit``)."""
    bucket = -(-length // LENGTH_BUCKET) * LENGTH_BUCKET
    return min(bucket, limit) if limit else bucket


class EagerStep:
    """The step as plain PyTorch calls; ``step_fn(ref, tokens, lengths, tgt)`` does the
    forward, loss, backward and optimiser step and returns ``(loss, logs)``."""

    def __init__(self, step_fn: Callable, prepare: Callable):
        self.step_fn, self.prepare = step_fn, prepare

    def __call__(self, batch: dict[str, Any]) -> StepResult:
        inputs = self.prepare(batch)
        loss, logs = self.step_fn(*inputs)
        return loss, logs, inputs[0].shape[0]


class GraphedStep:
    """The step as CUDA graphs, one per padded text length (see the module docstring).

    ``step_fn`` is the eager step; ``optimizer`` is read for the LRs a capture bakes
    in. Captures go through the module's ``cuda_capture`` (tests replace it with a
    stand-in that runs ``fn`` on each replay, to check the bookkeeping on a CPU).
    """

    def __init__(
        self,
        step_fn: Callable,
        prepare: Callable,
        optimizer: torch.optim.Optimizer,
        batch_size: int,
        max_text_len: int | None,
        warmup: int = WARMUP_STEPS,
    ):
        self.step_fn, self.prepare, self.optimizer = step_fn, prepare, optimizer
        self.batch_size, self.max_text_len = batch_size, max_text_len
        self.capture = cuda_capture
        self.warmup_left = warmup
        self.graphs: dict[int, tuple[list[torch.Tensor], Callable, Any]] = {}
        self.captured_lrs: tuple[float, ...] | None = None
        self.recaptures = 0
        self.disabled: str | None = None

    def __call__(self, batch: dict[str, Any]) -> StepResult:
        ref, tokens, lengths, tgt = self.prepare(batch)
        size = ref.shape[0]
        if self.disabled or size != self.batch_size or self.warmup_left > 0:
            if size != self.batch_size and not self.disabled:
                log.debug("a batch of %d (not %d) runs eagerly", size, self.batch_size)
            loss, logs = self._eager(ref, tokens, lengths, tgt)
            return loss, logs, size
        length = padded_length(tokens.shape[1], self.max_text_len)
        tokens = _pad_tokens(tokens, length)
        lrs = tuple(float(group["lr"]) for group in self.optimizer.param_groups)
        if lrs != self.captured_lrs and self.graphs:
            self.recaptures += 1
            if self.recaptures > MAX_RECAPTURES:
                self._disable(f"the LR changed {self.recaptures} times (each change re-captures)")
                loss, logs = self.step_fn(ref, tokens, lengths, tgt)
                return loss, logs, size
            self.graphs.clear()
        if length not in self.graphs:
            if not self._capture(length, (ref, tokens, lengths, tgt)):
                loss, logs = self.step_fn(ref, tokens, lengths, tgt)
                return loss, logs, size
            self.captured_lrs = lrs
        static_inputs, replay, outputs = self.graphs[length]
        for static, value in zip(static_inputs, (ref, tokens, lengths, tgt)):
            static.copy_(value, non_blocking=True)
        replay()
        loss, logs = outputs
        return loss, logs, size

    def _eager(self, *inputs: torch.Tensor):
        """An eager step; the warm-up ones run on a side stream, as ``torch.cuda.graph``
        wants (cuDNN autotuning and lazy state off the capturing stream)."""
        warming = self.warmup_left > 0 and not self.disabled
        self.warmup_left -= 1
        if not (warming and torch.cuda.is_available()):
            return self.step_fn(*inputs)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            result = self.step_fn(*inputs)
        torch.cuda.current_stream().wait_stream(side)
        return result

    def _capture(self, length: int, example: tuple[torch.Tensor, ...]) -> bool:
        static_inputs = [x.clone() for x in example]
        try:
            # grads allocated by the capture (not accumulated into another graph's)
            self.optimizer.zero_grad(set_to_none=True)
            replay, outputs = self.capture(self.step_fn, static_inputs)
        except RuntimeError as err:
            message = str(err).strip().splitlines()[0] if str(err).strip() else repr(err)
            self._disable(f"capture failed: {message}")
            self.optimizer.zero_grad(set_to_none=True)
            return False
        self.graphs[length] = (static_inputs, replay, outputs)
        log.info("train.step_graph: captured the training step (text length %d)", length)
        return True

    def _disable(self, why: str) -> None:
        self.disabled = why
        self.graphs.clear()
        log.warning("train.step_graph: eager from here on: %s", why)


def cuda_capture(fn: Callable, static_inputs: list[torch.Tensor]) -> tuple[Callable, Any]:
    """``fn(*static_inputs)`` captured as one CUDA graph: (replay, its static outputs).
    Capturing runs nothing, so the caller replays once for the step it captured on."""
    graph = torch.cuda.CUDAGraph()
    torch.cuda.synchronize()
    with torch.cuda.graph(graph):
        outputs = fn(*static_inputs)
    return graph.replay, outputs


def _pad_tokens(tokens: torch.Tensor, length: int) -> torch.Tensor:
    """(B, T) -> (B, length) with padding id 0 (T <= length)."""
    if tokens.shape[1] >= length:
        return tokens[:, :length]
    return nn.functional.pad(tokens, (0, length - tokens.shape[1]), value=0)


def step_inputs(device: torch.device, channels_last: bool) -> Callable:
    """``fn(batch) -> (ref, tokens, lengths, target)`` on ``device``."""

    def prepare(batch: dict[str, Any]) -> tuple[torch.Tensor, ...]:
        ref, tgt = batch["ref_images"].to(device), batch["target_images"].to(device)
        if channels_last:
            ref = ref.contiguous(memory_format=torch.channels_last)
            tgt = tgt.contiguous(memory_format=torch.channels_last)
        return ref, batch["tokens"].to(device), batch["lengths"].to(device), tgt

    return prepare


def optimizer_step(
    model: nn.Module,
    ddp_model: nn.Module,
    optimizer: torch.optim.Optimizer,
    autocast: Any,
    loss: dict[str, Any],
    grad_clip: float | None,
) -> Callable:
    """``fn(ref, tokens, lengths, target) -> (loss, loss logs)``: forward, loss, backward,
    clipping and the optimiser step, with nothing read back (what a graph captures)."""
    from pipeline.losses import compute_loss

    loss_name = loss["name"]
    loss_cfg = {k: v for k, v in loss.items() if k != "name"}

    def step(ref, tokens, lengths, tgt):
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            outputs = ddp_model(ref, tokens, lengths, tgt)
            value, logs = compute_loss(outputs, loss_name, **loss_cfg)
        value.backward()
        if grad_clip:
            nn.utils.clip_grad_norm_(model.parameters(), float(grad_clip))
        optimizer.step()
        return value.detach(), logs

    return step


def build_stepper(
    step_fn: Callable,
    prepare: Callable,
    optimizer: torch.optim.Optimizer,
    *,
    device: torch.device,
    world_size: int,
    setting: Any,
    batch_size: int,
    max_text_len: int | None,
) -> EagerStep | GraphedStep:
    """The run's step: ``GraphedStep`` where ``train.step_graph`` and the run allow it,
    else ``EagerStep`` (one log line says why when a graph was asked for or automatic)."""
    why = graph_unsupported(device, world_size, setting)
    if why is None:
        log.info(
            "train.step_graph: the whole step as a CUDA graph (eager for %d warm-up steps)",
            WARMUP_STEPS,
        )
        return GraphedStep(step_fn, prepare, optimizer, batch_size, max_text_len)
    if setting is not False:
        log.info("train.step_graph: eager steps (%s)", why)
    return EagerStep(step_fn, prepare)

"""Watching a training run: the loss and throughput between reports (read back only
when logged), the wall-clock budget ranks agree on, the NaN check, and the fault
injection the failure-recovery tests use."""

from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path
from typing import Any

import torch

from pipeline.distributed import RunContext

log = logging.getLogger("pipeline.loop")


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

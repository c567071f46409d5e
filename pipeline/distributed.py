"""Where the training loop runs: the small differences between one process and Ray Train.

``pipeline.loop.train_loop`` talks to a ``RunContext`` only: its rank and world size,
its device, how it restores the latest checkpoint, how it reports metrics (with an
optional checkpoint directory) and how it wraps the model for data parallelism.

* ``LocalContext``: one process, no Ray (Ray is never imported on this path, so the
  loop runs on a machine with only torch). Checkpoints go to
  ``<storage_path>/<run_name>/checkpoint_<step>``; the newest one is restored.
* ``RayContext``: one Ray Train worker. Ray has already set up the process group
  (gloo on CPU, nccl on GPU); reports go through ``ray.train.report`` and restores
  through ``ray.train.get_checkpoint`` (the latest checkpoint of this run name, after a
  worker failure or when the same command is run again).

A Ray Tune trial plugs in by subclassing ``RunContext`` with ``ray.tune.report``.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from pipeline.checkpoint import CHECKPOINT_FILE

log = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "checkpoint_"


def pick_device(use_gpu: str | bool, local_rank: int = 0) -> torch.device:
    """``cuda:<local_rank>`` when asked for (or ``auto`` and one is present), else CPU."""
    if use_gpu is True and not torch.cuda.is_available():
        raise RuntimeError("train.use_gpu is true but torch sees no CUDA device")
    if use_gpu is True or (use_gpu == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def checkpoint_dir_name(step: int) -> str:
    return f"{CHECKPOINT_PREFIX}{step:08d}"


class RunContext:
    """Interface between the training loop and whatever runs it."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @contextmanager
    def latest_checkpoint(self) -> Iterator[Path | None]:
        """A local directory holding the newest checkpoint of this run, or None."""
        yield None

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None = None) -> None:
        """Record metrics; ``checkpoint_dir`` (rank 0 only) is persisted, then may be deleted.
        Every rank calls this the same number of times."""
        raise NotImplementedError

    def wrap_model(self, model: nn.Module) -> nn.Module:
        """The module to train: DDP over the process group when there is more than one rank."""
        if self.world_size > 1:
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            # static_graph: baselines leave some parameters unused (e.g. image_only's text
            # encoder); DDP then needs to know the used set does not change between steps.
            return nn.parallel.DistributedDataParallel(
                model, device_ids=device_ids, static_graph=True
            )
        return model

    def mean_over_ranks(self, value: float) -> float:
        """Average of a scalar over all ranks (every rank must call it)."""
        if self.world_size == 1 or not dist.is_initialized():
            return value
        tensor = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor)
        return float(tensor.item()) / self.world_size


class LocalContext(RunContext):
    """One process, checkpoints kept under ``<storage_path>/<run_name>`` (a local path)."""

    def __init__(
        self,
        storage_path: str | Path,
        run_name: str,
        *,
        use_gpu: str | bool = "auto",
        num_to_keep: int = 2,
    ):
        if "://" in str(storage_path):
            raise ValueError(
                f"the in-process loop (--workers 0) keeps checkpoints on local disk; "
                f"train.storage_path {storage_path!r} is a URI"
            )
        self.run_dir = Path(storage_path) / run_name
        self.device = pick_device(use_gpu)
        self.num_to_keep = num_to_keep
        self.reports: list[dict[str, Any]] = []
        self.last_checkpoint: Path | None = None

    def checkpoints(self) -> list[Path]:
        """Finished checkpoint directories of this run, oldest first."""
        if not self.run_dir.is_dir():
            return []
        found = [
            p for p in self.run_dir.glob(f"{CHECKPOINT_PREFIX}*") if (p / CHECKPOINT_FILE).is_file()
        ]
        return sorted(found, key=lambda p: p.name)

    @contextmanager
    def latest_checkpoint(self) -> Iterator[Path | None]:
        found = self.checkpoints()
        yield found[-1] if found else None

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None = None) -> None:
        self.reports.append(dict(metrics))
        if checkpoint_dir is None:
            return
        target = self.run_dir / checkpoint_dir_name(int(metrics["step"]))
        staging = self.run_dir / f".staging-{target.name}"
        shutil.rmtree(staging, ignore_errors=True)
        shutil.copytree(checkpoint_dir, staging)
        shutil.rmtree(target, ignore_errors=True)
        staging.rename(target)  # a crash never leaves a half-written checkpoint_*
        self.last_checkpoint = target
        for old in self.checkpoints()[: -self.num_to_keep]:
            shutil.rmtree(old, ignore_errors=True)


class RayContext(RunContext):
    """One Ray Train (V2) worker; only valid inside ``TorchTrainer``'s worker function."""

    def __init__(self):
        import ray.train
        import ray.train.torch

        context = ray.train.get_context()
        self.rank = context.get_world_rank()
        self.world_size = context.get_world_size()
        self.device = ray.train.torch.get_device()
        self._train = ray.train

    @contextmanager
    def latest_checkpoint(self) -> Iterator[Path | None]:
        checkpoint = self._train.get_checkpoint()
        if checkpoint is None:
            yield None
            return
        with checkpoint.as_directory() as directory:
            yield Path(directory)

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None = None) -> None:
        if checkpoint_dir is None:
            self._train.report(metrics)
            return
        checkpoint = self._train.Checkpoint.from_directory(str(checkpoint_dir))
        self._train.report(
            metrics,
            checkpoint=checkpoint,
            checkpoint_dir_name=checkpoint_dir_name(int(metrics["step"])),
        )


@contextmanager
def scratch_dir(prefix: str = "ckpt-") -> Iterator[Path]:
    """A temporary directory removed afterwards (checkpoints are staged here)."""
    with tempfile.TemporaryDirectory(prefix=prefix) as directory:
        yield Path(directory)

"""Training images resident on the device: every image of the split decoded once.

``train.image_cache``:

* ``none``: stream and decode the shards every epoch (``pipeline.data``), the path for
  data that does not fit and the one that reads nothing up front;
* ``device``: decode each image of the training split once into one uint8 tensor
  (N, 3, S, S) on the training device (host memory on a CPU run, GPU memory on a GPU),
  after the resize and centre crop of ``ImagePreprocess.square``; each step then
  gathers its rows by index, normalises and augments on the device
  (``pipeline.device_batches.preprocess_cached``);
* ``auto`` (default): ``device`` when N x 3 x S x S bytes fit the budget, else stream,
  with one log line that says which and why.

Budget: ``train.image_cache_gb`` when set, else half the free memory of the GPU
(``torch.cuda.mem_get_info``) or a quarter of the host's available memory on a CPU run.
Every rank caches the whole split (its shards change every epoch).

The cache keeps each shard's samples as the streaming reader sees them (key, group,
image rows, error), so the readers draw the same triplets from the same groups in the
same order whichever way the images come (``TripletStream._groups``). Two things
differ: a cached image is stored at the training size, so an augmentation crop is cut
from that square rather than from the original picture, and a resize is quantised to
uint8 once (within 0.5/255 of the streamed value; CSS renders at the training size are
not resized at all).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import torch
from tqdm import tqdm

from pipeline.device_batches import preprocess_cached
from pipeline.images import ImagePreprocess, decode_image
from pipeline.shard_groups import GroupSample, read_group_samples

log = logging.getLogger(__name__)

CACHE_MODES = ("none", "device", "auto")


def cache_bytes(images: int, size: int) -> int:
    """Bytes of a cache of ``images`` uint8 (3, size, size) pictures."""
    return int(images) * 3 * int(size) * int(size)


def cache_budget(device: torch.device, budget_gb: float | None = None) -> int:
    """Bytes the cache may take on ``device`` (see the module docstring)."""
    if budget_gb is not None:
        return int(float(budget_gb) * 1e9)
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return free // 2
    return host_available_bytes() // 4


def host_available_bytes() -> int:
    """MemAvailable of /proc/meminfo (Linux), else physical memory."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def wants_cache(
    mode: str,
    images: int,
    size: int,
    device: torch.device,
    budget_gb: float | None = None,
    *,
    key: str = "train.image_cache",
    otherwise: str = "streaming from the shards (set train.image_cache_gb to raise it)",
) -> bool:
    """Whether ``key`` = ``mode`` caches ``images`` pictures of ``size``; says so in one
    log line (``otherwise``: what the run does instead when ``auto`` does not fit)."""
    if mode not in CACHE_MODES:
        raise ValueError(f"{key} must be one of {CACHE_MODES}, got {mode!r}")
    if mode == "none":
        return False
    need = cache_bytes(images, size)
    budget = cache_budget(device, budget_gb)
    what = f"{images} images x 3x{size}x{size} uint8 = {need / 1e6:.0f} MB"
    if need <= budget:
        log.info("%s: %s on %s (budget %.0f MB)", key, what, device, budget / 1e6)
        return True
    if mode == "device":
        log.warning(
            "%s=device: %s exceeds the budget of %.0f MB on %s; caching anyway",
            key,
            what,
            budget / 1e6,
            device,
        )
        return True
    log.info(
        "%s=auto: %s exceeds the budget of %.0f MB on %s: %s",
        key,
        what,
        budget / 1e6,
        device,
        otherwise,
    )
    return False


@dataclass
class ImageCache:
    """``images`` (N, 3, S, S) uint8 on the device, and per shard path its samples in
    tar order with each member's row in ``images`` (-1: it did not decode)."""

    images: torch.Tensor
    samples: dict[str, list[GroupSample]]

    @classmethod
    def build(
        cls,
        shards: list[str],
        preprocess: ImagePreprocess,
        device: torch.device,
        expected_images: int,
        progress: bool = False,
    ) -> ImageCache:
        """Decode every image of ``shards`` once (``expected_images``: the manifest's
        count, which sizes the tensor up front; more are appended)."""
        size = preprocess.size
        images = torch.empty(expected_images, 3, size, size, dtype=torch.uint8, device=device)
        extra: list[torch.Tensor] = []
        rows = 0
        samples: dict[str, list[GroupSample]] = {}
        bar = tqdm(
            total=expected_images,
            desc="image cache",
            unit="img",
            mininterval=2.0,
            disable=not progress,
        )
        for shard in shards:
            records: list[GroupSample] = []
            for key, group, datas, error in read_group_samples([shard]):
                indices = []
                for data in datas:
                    try:
                        square = square_uint8(data, preprocess, device)
                    except ValueError as err:
                        log.debug("image cache: %s: an image did not decode: %s", key, err)
                        indices.append(-1)
                        continue
                    if rows < expected_images:
                        images[rows] = square
                    else:
                        extra.append(square)
                    indices.append(rows)
                    rows += 1
                    bar.update(1)
                records.append((key, group, indices, error))
            samples[shard] = records
        bar.close()
        if extra:
            images = torch.cat([images, torch.stack(extra)])
        return cls(images=images[:rows], samples=samples)

    def batch(self, batch: dict[str, Any], preprocess: ImagePreprocess, rng) -> dict[str, Any]:
        """An index batch of ``TripletStream`` -> the training batch on the cache's
        device (``ref_images``/``target_images`` (B, 3, S, S) float32, tokens on it too)."""
        device = self.images.device
        ref_index = batch.pop("ref_index").to(device, non_blocking=True)
        target_index = batch.pop("target_index").to(device, non_blocking=True)
        both = preprocess_cached(self.images[torch.cat([ref_index, target_index])], preprocess, rng)
        size = ref_index.shape[0]
        batch["ref_images"], batch["target_images"] = both[:size], both[size:]
        batch["tokens"] = batch["tokens"].to(device, non_blocking=True)
        batch["lengths"] = batch["lengths"].to(device, non_blocking=True)
        return batch


def square_uint8(data: bytes, preprocess: ImagePreprocess, device: torch.device) -> torch.Tensor:
    """Encoded bytes -> uint8 (3, S, S) on ``device``: decoded (nvJPEG on CUDA), resized
    and centre-cropped, rounded. Raises ``ValueError`` for an undecodable image."""
    square = preprocess.square(decode_image(data, device))
    return square.mul_(255.0).round_().clamp_(0, 255).to(torch.uint8)

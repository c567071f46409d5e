"""A gallery split resident on the device, so repeated evaluations decode it once.

``eval.image_cache`` (``none`` | ``device`` | ``auto``, default ``auto``): the training
loop's evaluations (every ``train.eval_every`` steps and at the end) read the gallery
from one uint8 tensor (N, 3, S, S) on the evaluation device instead of decoding its
shards each time (on a GPU the whole evaluation then runs there in one pass: images,
embeddings, query composition and ranking). ``auto`` caches when the tensor fits the
budget of ``pipeline.image_cache.cache_budget`` (half the free GPU memory, or a quarter
of the host's available memory, measured when the first evaluation starts).

Each image is stored after the resize and centre crop of ``ImagePreprocess.square``,
rounded to uint8 (a gallery rendered at the evaluation size, as CSS is, is stored
exactly), and normalised per batch on the device.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from pipeline.gallery_data import iter_gallery_samples
from pipeline.image_cache import square_uint8, wants_cache
from pipeline.images import IMAGENET_MEAN, IMAGENET_STD, ImagePreprocess
from shards.manifest import load_manifest


@dataclass
class GalleryCache:
    """``images`` (N, 3, S, S) uint8 on the device, with each row's gallery ``ids`` and
    ``metas`` in shard order (the order ``gallery_data.gallery_loader`` yields)."""

    dataset_dir: str
    split: str
    ids: list[str]
    metas: list[dict[str, Any]]
    images: torch.Tensor

    @property
    def size(self) -> int:
        return int(self.images.shape[-1])

    @classmethod
    def build(
        cls,
        dataset_dir: str | Path,
        split: str,
        size: int,
        device: str | torch.device,
        progress: bool = False,
    ) -> GalleryCache:
        """Decode every image of gallery ``split`` once (nvJPEG for JPEG on CUDA). A
        corrupt image raises ``ValueError`` naming its id, as the streaming reader does."""
        device = torch.device(device)
        preprocess = ImagePreprocess(size)
        expected = gallery_images(dataset_dir, split)
        images = torch.empty(expected, 3, size, size, dtype=torch.uint8, device=device)
        extra: list[torch.Tensor] = []
        ids: list[str] = []
        metas: list[dict[str, Any]] = []
        samples = iter_gallery_samples(dataset_dir, split)
        bar = tqdm(samples, total=expected, desc="gallery cache", unit="img", disable=not progress)
        for meta, data, _ in bar:
            try:
                square = square_uint8(data, preprocess, device)
            except ValueError as err:
                raise ValueError(f"gallery image {meta['id']!r} in {dataset_dir}: {err}") from err
            row = len(ids)
            if row < expected:
                images[row] = square
            else:  # the manifest undercounted: keep going rather than lose images
                extra.append(square)
            ids.append(str(meta["id"]))
            metas.append(meta)
        if not ids:
            raise ValueError(f"gallery split {split!r} of {dataset_dir} is empty")
        if extra:
            images = torch.cat([images, torch.stack(extra)])
        return cls(str(dataset_dir), split, ids, metas, images[: len(ids)])

    def batches(
        self, batch_size: int, mean=IMAGENET_MEAN, std=IMAGENET_STD
    ) -> Iterator[tuple[list[str], torch.Tensor, list[dict[str, Any]]]]:
        """``(ids, images (B, 3, S, S) float32 normalised on the device, metas)`` in row
        order: what ``gallery_loader`` yields for the same split."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        preprocess = ImagePreprocess(self.size, mean, std)
        for start in range(0, len(self.ids), batch_size):
            rows = slice(start, start + batch_size)
            pixels = self.images[rows].float().div_(255.0)
            yield self.ids[rows], preprocess.normalise(pixels), self.metas[rows]

    def check_matches(self, dataset_dir: str | Path, split: str, size: int) -> None:
        """Raise ``ValueError`` unless this cache holds ``split`` of ``dataset_dir`` at ``size``."""
        held = (Path(self.dataset_dir).resolve(), self.split, self.size)
        if held != (Path(dataset_dir).resolve(), split, int(size)):
            raise ValueError(
                f"the gallery cache holds {self.split!r} of {self.dataset_dir} at "
                f"{self.size} px, not {split!r} of {dataset_dir} at {size} px"
            )


def gallery_images(dataset_dir: str | Path, split: str) -> int:
    """The manifest's image count of gallery ``split``."""
    info = load_manifest(dataset_dir)["splits"].get(split) or {}
    if info.get("kind") != "gallery":
        raise ValueError(f"split {split!r} of {dataset_dir} is not a 'gallery' split")
    return int(info.get("images") or info.get("samples") or 0)


def maybe_gallery_cache(
    mode: str,
    dataset_dir: str | Path,
    split: str,
    size: int,
    device: str | torch.device,
    progress: bool = False,
) -> GalleryCache | None:
    """The cache ``eval.image_cache`` = ``mode`` asks for, or None (one log line says which)."""
    device = torch.device(device)
    images = gallery_images(dataset_dir, split)
    otherwise = "decoding the gallery shards at every evaluation"
    if not wants_cache(mode, images, size, device, key="eval.image_cache", otherwise=otherwise):
        return None
    return GalleryCache.build(dataset_dir, split, size, device, progress=progress)

"""Gallery images from a shard dataset's gallery split, in shard order, for evaluation
and the gallery index: decoded batches (``gallery_loader``) or raw bytes."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset

from pipeline.images import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImagePreprocess,
    decode_image,
    decode_images,
    predecode_for_gpu,
)
from pipeline.shard_groups import image_entry, loader_worker
from shards.manifest import load_manifest, shard_paths


def iter_gallery_samples(
    dataset_dir: str | Path, split: str = "gallery"
) -> Iterator[tuple[dict[str, Any], bytes, str]]:
    """``(meta, image bytes, ext)`` of every gallery sample in shard order."""
    manifest = load_manifest(dataset_dir)
    if manifest["splits"].get(split, {}).get("kind") != "gallery":
        raise ValueError(f"split {split!r} of {dataset_dir} is not a 'gallery' split")
    for sample in wds.tarfile_samples(
        [{"url": p} for p in shard_paths(dataset_dir, manifest, split)]
    ):
        meta = json.loads(sample["json"])
        data, ext = image_entry(sample, "img")
        yield meta, data, ext


class GalleryStream(IterableDataset):
    """Gallery batches in shard order: worker ``w`` of ``W`` builds batches ``w, w+W, ...``
    so the DataLoader's round-robin returns batch 0, 1, 2, ... (each worker reads every
    shard's bytes but decodes only its own batches)."""

    def __init__(
        self,
        dataset_dir: str,
        split: str,
        batch_size: int,
        preprocess: ImagePreprocess,
        decode_on_worker: bool = True,
    ):
        super().__init__()
        self.dataset_dir, self.split = dataset_dir, split
        self.batch_size = batch_size
        self.preprocess = preprocess
        self.decode_on_worker = decode_on_worker

    def __iter__(self):
        worker, num_workers = loader_worker()
        batch: list[tuple[dict, bytes]] = []
        index = 0
        for meta, data, _ in iter_gallery_samples(self.dataset_dir, self.split):
            if (index // self.batch_size) % num_workers == worker:
                batch.append((meta, data))
            index += 1
            if index % self.batch_size == 0 and batch:
                yield self._collate(batch)
                batch = []
        if batch:
            yield self._collate(batch)

    def _collate(self, batch: list[tuple[dict, bytes]]):
        ids = [str(meta["id"]) for meta, _ in batch]
        metas = [meta for meta, _ in batch]
        if not self.decode_on_worker:
            try:
                return ids, [predecode_for_gpu(data) for _, data in batch], metas
            except ValueError as err:
                raise ValueError(f"gallery image in {self.dataset_dir}: {err}") from err
        images = []
        for meta, data in batch:
            try:
                images.append(self.preprocess(decode_image(data)))
            except ValueError as err:
                raise ValueError(
                    f"gallery image {meta['id']!r} in {self.dataset_dir}: {err}"
                ) from err
        return ids, torch.stack(images), metas


def gallery_loader(
    dataset_dir: str | Path,
    split: str = "gallery",
    *,
    batch_size: int,
    image_size: int,
    loader_workers: int = 0,
    mean=IMAGENET_MEAN,
    std=IMAGENET_STD,
    device: str | torch.device = "cpu",
) -> Iterator[tuple[list[str], torch.Tensor, list[dict]]]:
    """``(ids, images (B, 3, S, S) float32, metas)`` batches, every gallery image once, in
    shard order. A corrupt gallery image raises ``ValueError`` naming its id (a gallery
    must be complete; converters skip bad images before writing)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = torch.device(device)
    preprocess = ImagePreprocess(image_size, mean, std)
    stream = GalleryStream(
        str(dataset_dir), split, batch_size, preprocess, decode_on_worker=device.type != "cuda"
    )
    loader = DataLoader(stream, batch_size=None, num_workers=loader_workers)
    for ids, images, metas in loader:
        if device.type == "cuda":
            images = torch.stack([preprocess(img) for img in decode_images(images, device)])
        yield ids, images, metas


def read_gallery_bytes(
    dataset_dir: str | Path, split: str = "gallery", ids=None
) -> dict[str, tuple[bytes, str]]:
    """``{id: (encoded bytes, ext)}`` of a gallery split (only ``ids`` when given)."""
    wanted = None if ids is None else {str(i) for i in ids}
    out = {}
    for meta, data, ext in iter_gallery_samples(dataset_dir, split):
        gid = str(meta["id"])
        if wanted is None or gid in wanted:
            out[gid] = (bytes(data), ext)
    if wanted is not None and len(out) < len(wanted):
        missing = sorted(wanted - out.keys())[:5]
        raise KeyError(f"gallery split {split!r} of {dataset_dir} has no image(s) {missing}")
    return out

"""Streaming training triplets from WebDataset shards (gallery images:
``pipeline.gallery_data``; group scans and reader splits: ``pipeline.shard_groups``).

Distributed streaming follows open_clip's WebDataset reader:

1. every epoch the shard list is shuffled with a seed of ``(seed, epoch)`` -- the
   same order on every rank;
2. the shuffled list is split by node (``rank::world_size``), then by DataLoader
   worker (``worker::num_workers``), so readers read disjoint shards;
3. each reader draws the triplets of its groups (``pipeline.triplets``, afresh every
   epoch), passes them through a shuffle buffer (of single triplets, or with
   ``triplets_per_group`` = k of runs of k triplets of one group, which then share a
   batch), decodes, preprocesses and batches;
4. each reader repeats its shards endlessly and the loader stops after exactly
   ``batches_per_epoch`` batches, so every rank yields the same number of batches
   whatever the shard sizes (an uneven rank would hang DDP).

Few shards: with fewer shards than readers (``world_size x loader_workers``) a shard
split would leave readers idle. ``split_by="auto"`` (default) then falls back to a
*sample* split -- every reader streams all shards and keeps every R-th group (R the
number of readers) -- and logs a warning; ``split_by="shards"`` raises instead (open_clip's
assertion), ``split_by="samples"`` always splits samples. Tiny test datasets need the
fallback; real datasets should have many more shards than readers.

Decoding: on CPU the DataLoader workers decode and preprocess. When ``device`` is
CUDA the workers pass JPEG bytes on and the main process decodes them in one batched
nvJPEG call and preprocesses on the GPU, which frees the few CPU cores of a GPU node;
formats nvJPEG cannot read (PNG, as the CSS shards use) are decoded in the workers
(``pipeline.images.predecode_for_gpu``), in parallel with the step.

Corrupt samples (bad JSON, an image that does not decode) are skipped; each reader
logs a warning with the count per epoch.
"""

from __future__ import annotations

import json
import logging
import random
from collections import Counter
from collections.abc import Iterator
from itertools import count, islice
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
from pipeline.shard_groups import (
    default_batches_per_epoch,
    group_runs,
    image_entry,
    loader_worker,
    reader_shards,
)
from pipeline.triplets import draw_triplets
from pipeline.vocab import Vocabulary
from shards.manifest import load_manifest, shard_paths

log = logging.getLogger(__name__)


class TripletStream(IterableDataset):
    """One reader's endless stream of batches for one epoch (runs on a DataLoader worker).

    Yields dicts with ``texts``, ``tokens``, ``lengths``, ``ref_ids``, ``target_ids`` and
    either decoded ``ref_images``/``target_images`` (B, 3, S, S) or, when
    ``decode_on_worker`` is False, ``ref_data``/``target_data``: per image, JPEG bytes
    (for one batched nvJPEG call on the GPU) or a uint8 tensor the worker decoded (PNG).
    """

    def __init__(
        self,
        shards: list[str],
        vocab: Vocabulary,
        *,
        batch_size: int,
        preprocess: ImagePreprocess,
        rank: int,
        world_size: int,
        seed: int,
        epoch: int,
        shuffle_buffer: int,
        split_by: str,
        max_text_len: int | None,
        decode_on_worker: bool,
        triplets_per_group: int = 1,
        skip_batches: int = 0,
    ):
        super().__init__()
        self.shards = shards
        self.vocab = vocab
        self.batch_size = batch_size
        self.preprocess = preprocess
        self.rank, self.world_size = rank, world_size
        self.seed, self.epoch = seed, epoch
        self.shuffle_buffer = shuffle_buffer
        self.split_by = split_by
        self.max_text_len = max_text_len
        self.decode_on_worker = decode_on_worker
        self.triplets_per_group = triplets_per_group
        self.skip_batches = skip_batches  # of the whole loader (all workers), see __iter__

    def __iter__(self):
        worker, num_workers = loader_worker()
        shards, stride, offset = reader_shards(
            self.shards,
            seed=self.seed,
            epoch=self.epoch,
            rank=self.rank,
            world_size=self.world_size,
            worker=worker,
            num_workers=num_workers,
            split_by=self.split_by,
        )
        where = f"rank {self.rank} worker {worker} epoch {self.epoch}"
        if stride > 1 and worker == 0:
            log.warning(
                "%d shard(s) for %d readers: %s splits samples, not shards",
                len(self.shards),
                stride,
                where,
            )
        skipped: Counter = Counter()
        reader_seed = f"{self.seed}-{self.epoch}-{self.rank}-{worker}"
        triplets = self._triplets(shards, stride, offset, skipped, where)
        per_group = self.triplets_per_group
        if per_group > 1:  # shuffle runs of one group's triplets, so they share a batch
            runs = group_runs(triplets, per_group, random.Random(f"runs-{reader_seed}"))
            if self.shuffle_buffer > 1:
                size = max(2, self.shuffle_buffer // per_group)  # about as many triplets
                runs = wds.shuffle(size, initial=size, rng=random.Random(f"buffer-{reader_seed}"))(
                    runs
                )
            triplets = (triplet for run in runs for triplet in run)
        elif self.shuffle_buffer > 1:
            triplets = wds.shuffle(
                self.shuffle_buffer,
                initial=self.shuffle_buffer,
                rng=random.Random(f"buffer-{reader_seed}"),
            )(triplets)
        # The DataLoader takes batch i from worker i % W: this worker's share of the
        # batches to skip (already trained on before a restore) is drawn, not decoded.
        own_skip = len(range(worker, self.skip_batches, num_workers))
        triplets = iter(triplets)
        for _ in range(own_skip * self.batch_size):
            next(triplets)
        drawn = own_skip * self.batch_size
        try:
            batch: list[dict[str, Any]] = []
            for triplet in triplets:
                drawn += 1
                # a seed per triplet: skipped triplets leave later crops as they were
                crop_rng = random.Random(f"crop-{reader_seed}-{drawn}")
                try:
                    self._prepare_images(triplet, crop_rng)
                except ValueError as err:
                    skipped["undecodable image"] += 1
                    log.debug(
                        "%s: skipping triplet %s -> %s: %s",
                        where,
                        triplet["ref_id"],
                        triplet["target_id"],
                        err,
                    )
                    continue
                batch.append(triplet)
                if len(batch) == self.batch_size:
                    yield self._collate(batch)
                    batch = []
        finally:
            if skipped:
                log.warning(
                    "%s: skipped %d corrupt sample(s): %s",
                    where,
                    sum(skipped.values()),
                    dict(skipped),
                )

    def _triplets(
        self, shards: list[str], stride: int, offset: int, skipped: Counter, where: str
    ) -> Iterator[dict[str, Any]]:
        """Endless passes over the reader's groups, each drawing fresh triplets."""
        for repeat in count():
            produced = 0
            index = -1
            samples = wds.tarfile_samples(
                [{"url": s} for s in shards], handler=wds.warn_and_continue
            )
            for sample in samples:
                index += 1
                if index % stride != offset:
                    continue
                key = sample.get("__key__")
                try:
                    group = json.loads(sample["json"])
                    drawn = draw_triplets(
                        group, random.Random(f"{self.seed}-{self.epoch}-{repeat}-{key}")
                    )
                    images = [image_entry(sample, str(i)) for i in range(len(group["members"]))]
                except (KeyError, ValueError, TypeError, UnicodeDecodeError) as err:
                    skipped["bad group json"] += 1
                    log.debug("%s: skipping group %s: %s", where, key, err)
                    continue
                members = group["members"]
                for ref, tgt, text in drawn:
                    produced += 1
                    yield {
                        "ref_bytes": images[ref][0],
                        "target_bytes": images[tgt][0],
                        "ref_id": str(members[ref].get("id", f"{key}/{ref}")),
                        "target_id": str(members[tgt].get("id", f"{key}/{tgt}")),
                        "text": text,
                        "group": key,
                    }
            if produced == 0:
                raise ValueError(
                    f"{where}: no triplets in its share of {len(shards)} shard(s) "
                    f"(stride {stride}); the dataset has fewer usable groups than readers"
                )

    def _prepare_images(self, triplet: dict[str, Any], crop_rng: random.Random) -> None:
        """CPU readers decode and preprocess here (``ref_image``/``target_image``); CUDA
        readers keep JPEG bytes for nvJPEG and decode the rest (``predecode_for_gpu``).
        Raises ``ValueError`` for an undecodable image."""
        if self.decode_on_worker:
            triplet["ref_image"] = self.preprocess(decode_image(triplet["ref_bytes"]), crop_rng)
            triplet["target_image"] = self.preprocess(
                decode_image(triplet["target_bytes"]), crop_rng
            )
        else:
            triplet["ref_data"] = predecode_for_gpu(triplet.pop("ref_bytes"))
            triplet["target_data"] = predecode_for_gpu(triplet.pop("target_bytes"))

    def _collate(self, batch: list[dict[str, Any]]) -> dict[str, Any]:
        texts = [t["text"] for t in batch]
        tokens, lengths = self.vocab.encode(texts, max_len=self.max_text_len)
        out: dict[str, Any] = {
            "tokens": tokens,
            "lengths": lengths,
            "texts": texts,
            "ref_ids": [t["ref_id"] for t in batch],
            "target_ids": [t["target_id"] for t in batch],
        }
        if self.decode_on_worker:
            out["ref_images"] = torch.stack([t["ref_image"] for t in batch])
            out["target_images"] = torch.stack([t["target_image"] for t in batch])
        else:
            out["ref_data"] = [t["ref_data"] for t in batch]
            out["target_data"] = [t["target_data"] for t in batch]
        return out


class TripletLoader:
    """Iterable of exactly ``len(self)`` training batches per epoch on this rank.

    Each ``iter()`` runs the next epoch (initially the ``epoch`` argument), so ``for
    epoch ...: for batch in loader`` sees a fresh shard order and fresh triplets every
    epoch; ``epoch_batches(epoch, skip)`` runs a given epoch from batch ``skip`` on. Batches are dicts:
    ``ref_images``/``target_images`` (B, 3, S, S) float32, ``tokens`` (B, T) int64,
    ``lengths`` (B,) int64, ``texts``, ``ref_ids``, ``target_ids`` (lists of str).
    """

    def __init__(
        self,
        stream: TripletStream,
        *,
        batches_per_epoch: int,
        loader_workers: int,
        device: torch.device,
    ):
        self.stream = stream
        self.batches_per_epoch = batches_per_epoch
        self.loader_workers = loader_workers
        self.device = device
        self.epoch = stream.epoch

    def __len__(self) -> int:
        return self.batches_per_epoch

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return self.epoch_batches(self.epoch)

    def epoch_batches(self, epoch: int, skip: int = 0) -> Iterator[dict[str, Any]]:
        """Batches ``skip``..``batches_per_epoch - 1`` of ``epoch``: the ones before are
        drawn (so the rest are the same batches) but their images are never decoded --
        a resumed run skips what it trained on at the cost of reading JSON only. (A
        corrupt image among the skipped triplets, which a full pass would have dropped,
        shifts the rest of that epoch by one triplet.) Advances ``self.epoch`` past it."""
        if not 0 <= skip <= self.batches_per_epoch:
            raise ValueError(f"skip must be in 0..{self.batches_per_epoch}, got {skip}")
        self.stream.epoch, self.stream.skip_batches = epoch, skip
        self.epoch = epoch + 1
        loader = DataLoader(
            self.stream, batch_size=None, num_workers=self.loader_workers, persistent_workers=False
        )
        seed, rank = self.stream.seed, self.stream.rank
        for index, batch in enumerate(islice(loader, self.batches_per_epoch - skip), start=skip):
            if self.stream.decode_on_worker:
                yield batch
            else:  # a seed per batch, like the CPU path's per triplet: skips change nothing
                rng = random.Random(f"gpu-crop-{seed}-{epoch}-{rank}-{index}")
                yield _decode_batch_on_device(batch, self.stream.preprocess, self.device, rng)


def _decode_batch_on_device(
    batch: dict[str, Any], preprocess: ImagePreprocess, device: torch.device, rng: random.Random
) -> dict[str, Any]:
    """Decode a batch's images on ``device`` (one batched nvJPEG call for JPEGs); triplets
    with an undecodable image are dropped with a warning, so the batch may shrink."""
    size = len(batch["texts"])
    try:
        images = decode_images(batch["ref_data"] + batch["target_data"], device)
        pairs = [(images[i], images[size + i]) for i in range(size)]
    except ValueError:
        pairs = []
        for i, (ref, tgt) in enumerate(zip(batch["ref_data"], batch["target_data"])):
            try:
                pairs.append((decode_image(ref, device), decode_image(tgt, device)))
            except ValueError as err:
                pairs.append(None)
                log.warning(
                    "skipping triplet %s -> %s: %s",
                    batch["ref_ids"][i],
                    batch["target_ids"][i],
                    err,
                )
    keep = [i for i, pair in enumerate(pairs) if pair is not None]
    if not keep:
        raise ValueError(f"every image of a batch failed to decode on {device}: {batch['ref_ids']}")
    index = torch.tensor(keep, dtype=torch.long)
    return {
        "ref_images": torch.stack([preprocess(pairs[i][0], rng) for i in keep]),
        "target_images": torch.stack([preprocess(pairs[i][1], rng) for i in keep]),
        "tokens": batch["tokens"][index].to(device),
        "lengths": batch["lengths"][index].to(device),
        "texts": [batch["texts"][i] for i in keep],
        "ref_ids": [batch["ref_ids"][i] for i in keep],
        "target_ids": [batch["target_ids"][i] for i in keep],
    }


def triplet_loader(
    dataset_dir: str | Path,
    vocab: Vocabulary,
    *,
    batch_size: int,
    image_size: int,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
    epoch: int = 0,
    loader_workers: int = 0,
    shuffle_buffer: int = 1000,
    batches_per_epoch: int | None = None,
    split: str = "train",
    mean=IMAGENET_MEAN,
    std=IMAGENET_STD,
    augment: bool = False,
    device: str | torch.device = "cpu",
    max_text_len: int | None = None,
    split_by: str = "auto",
    triplets_per_group: int = 1,
) -> TripletLoader:
    """Training batches of one rank (see the module docstring for the streaming scheme).

    ``batches_per_epoch`` defaults to ``default_batches_per_epoch(...)``; pass the same
    value on every rank (it is what keeps DDP ranks in step). ``triplets_per_group`` > 1
    keeps that many triplets of one group together in a batch (``group_runs``).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if loader_workers < 0:
        raise ValueError(f"loader_workers must be >= 0, got {loader_workers}")
    if triplets_per_group < 1:
        raise ValueError(f"triplets_per_group must be >= 1, got {triplets_per_group}")
    manifest = load_manifest(dataset_dir)
    if manifest["splits"].get(split, {}).get("kind") != "groups":
        raise ValueError(
            f"split {split!r} of {dataset_dir} is not a 'groups' split: "
            f"{ {k: v['kind'] for k, v in manifest['splits'].items()} }"
        )
    if batches_per_epoch is None:
        batches_per_epoch = default_batches_per_epoch(dataset_dir, batch_size, world_size, split)
    if batches_per_epoch < 1:
        raise ValueError(f"batches_per_epoch must be >= 1, got {batches_per_epoch}")
    device = torch.device(device)
    stream = TripletStream(
        shard_paths(dataset_dir, manifest, split),
        vocab,
        batch_size=batch_size,
        preprocess=ImagePreprocess(image_size, mean, std, augment=augment),
        rank=rank,
        world_size=world_size,
        seed=seed,
        epoch=epoch,
        shuffle_buffer=shuffle_buffer,
        split_by=split_by,
        max_text_len=max_text_len,
        decode_on_worker=device.type != "cuda",
        triplets_per_group=triplets_per_group,
    )
    return TripletLoader(
        stream, batches_per_epoch=batches_per_epoch, loader_workers=loader_workers, device=device
    )


# -- gallery ------------------------------------------------------------------------------

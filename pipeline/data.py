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

Image cache (``train.image_cache``, ``pipeline.image_cache``): data that fits is decoded
once onto the training device; the readers then run in this process over the cache's
records of the same shards and yield index batches that are gathered on the device --
the same triplets in the same order as streaming, with no image decoded per epoch.
"""

from __future__ import annotations

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

from pipeline.device_batches import decode_batch_on_device
from pipeline.image_cache import ImageCache, wants_cache
from pipeline.images import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImagePreprocess,
    decode_image,
    predecode_for_gpu,
)
from pipeline.shard_groups import (
    GroupSample,
    default_batches_per_epoch,
    group_runs,
    loader_worker,
    one_run_per_group_per_batch,
    read_group_samples,
    reader_shards,
    round_robin,
    skip_triplets,
)
from pipeline.triplets import draw_triplets
from pipeline.vocab import Vocabulary
from shards.manifest import load_manifest, shard_paths

log = logging.getLogger(__name__)


IMAGE_MODES = ("decode", "gpu", "cache")


class TripletStream(IterableDataset):
    """One reader's endless stream of batches for one epoch (runs on a DataLoader worker).

    Yields dicts with ``texts``, ``tokens``, ``lengths``, ``ref_ids``, ``target_ids`` and,
    by ``image_mode``: ``"decode"``, decoded ``ref_images``/``target_images`` (B, 3, S,
    S); ``"gpu"``, ``ref_data``/``target_data``: per image, JPEG bytes (for one batched
    nvJPEG call on the GPU) or a uint8 tensor the worker decoded (PNG); ``"cache"``,
    ``ref_index``/``target_index`` (B,) int64 rows of ``cache.images``
    (``pipeline.image_cache``): the same triplets, in the same order, with no image read.
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
        image_mode: str = "decode",
        triplets_per_group: int = 1,
        skip_batches: int = 0,
        cache: ImageCache | None = None,
    ):
        super().__init__()
        if image_mode not in IMAGE_MODES:
            raise ValueError(f"image_mode must be one of {IMAGE_MODES}, got {image_mode!r}")
        if (image_mode == "cache") != (cache is not None):
            raise ValueError("image_mode 'cache' needs a cache, and only it takes one")
        self.shards = shards
        self.vocab = vocab
        self.batch_size = batch_size
        self.preprocess = preprocess
        self.rank, self.world_size = rank, world_size
        self.seed, self.epoch = seed, epoch
        self.shuffle_buffer = shuffle_buffer
        self.split_by = split_by
        self.max_text_len = max_text_len
        self.image_mode = image_mode
        self.triplets_per_group = triplets_per_group
        self.skip_batches = skip_batches  # of the whole loader (all workers), see reader_batches
        self.cache = cache

    def __iter__(self):
        return self.reader_batches(*loader_worker())

    def reader_batches(self, worker: int, num_workers: int) -> Iterator[dict[str, Any]]:
        """The batches of reader ``worker`` of ``num_workers`` (a DataLoader worker, or
        one the cache path runs in-process): of the loader's batch sequence, it makes
        batches ``worker``, ``worker + num_workers``, ..."""
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
        units = self._units(self._triplets(shards, stride, offset, skipped, where), reader_seed)
        # The DataLoader takes batch i from worker i % W: this worker's share of the
        # batches to skip (already trained on before a restore) is drawn, not decoded.
        own_skip = len(range(worker, self.skip_batches, num_workers))
        units, drawn = skip_triplets(units, own_skip * self.batch_size, self._known_unusable)
        try:
            batch: list[dict[str, Any]] = []
            for unit in units:
                first, drawn = drawn, drawn + len(unit)
                try:
                    for position, triplet in enumerate(unit, start=first + 1):
                        # a seed per triplet: skipped triplets leave later crops as they were
                        crop_rng = random.Random(f"crop-{reader_seed}-{position}")
                        self._prepare_images(triplet, crop_rng)
                except ValueError as err:  # the whole run goes, so runs stay aligned
                    skipped["undecodable image"] += len(unit)
                    log.debug("%s: skipping a run of %d triplet(s): %s", where, len(unit), err)
                    continue
                for triplet in unit:
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

    def _units(self, triplets: Iterator[dict], reader_seed: str) -> Iterator[list[dict]]:
        """Shuffled triplets, one per unit, or with ``triplets_per_group`` = k > 1
        shuffled runs of k triplets of one group (``group_runs``), so they share a batch,
        with at most one run of a group per batch (``one_run_per_group_per_batch``)."""
        per_group = self.triplets_per_group
        if per_group > 1:
            runs = group_runs(triplets, per_group, random.Random(f"runs-{reader_seed}"))
            if self.shuffle_buffer > 1:
                size = max(2, self.shuffle_buffer // per_group)  # about as many triplets
                runs = wds.shuffle(size, initial=size, rng=random.Random(f"buffer-{reader_seed}"))(
                    runs
                )
            return one_run_per_group_per_batch(runs, self.batch_size)
        if self.shuffle_buffer > 1:
            triplets = wds.shuffle(
                self.shuffle_buffer,
                initial=self.shuffle_buffer,
                rng=random.Random(f"buffer-{reader_seed}"),
            )(triplets)
        return ([triplet] for triplet in triplets)

    def _triplets(
        self, shards: list[str], stride: int, offset: int, skipped: Counter, where: str
    ) -> Iterator[dict[str, Any]]:
        """Endless passes over the reader's groups, each drawing fresh triplets."""
        for repeat in count():
            produced = 0
            for index, (key, group, images, error) in enumerate(self._groups(shards)):
                if index % stride != offset:
                    continue
                try:
                    if error:
                        raise ValueError(error)
                    drawn = draw_triplets(
                        group, random.Random(f"{self.seed}-{self.epoch}-{repeat}-{key}")
                    )
                except (KeyError, ValueError, TypeError) as err:
                    skipped["bad group json"] += 1
                    log.debug("%s: skipping group %s: %s", where, key, err)
                    continue
                members = group["members"]
                for ref, tgt, text in drawn:
                    produced += 1
                    yield {
                        "ref_image_data": images[ref],
                        "target_image_data": images[tgt],
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

    def _groups(self, shards: list[str]) -> Iterator[GroupSample]:
        """The samples of ``shards`` in order: from the cache's records, or read from the
        tar files (``read_group_samples``); the two give the same sequence."""
        if self.cache is not None:
            return (sample for shard in shards for sample in self.cache.samples[shard])
        return read_group_samples(shards)

    def _known_unusable(self, unit: list[dict[str, Any]]) -> bool:
        """Whether a full pass would drop ``unit`` (known without decoding only for the
        cache, whose records mark images that did not decode)."""
        if self.image_mode != "cache":
            return False
        return any(t["ref_image_data"] < 0 or t["target_image_data"] < 0 for t in unit)

    def _prepare_images(self, triplet: dict[str, Any], crop_rng: random.Random) -> None:
        """CPU readers decode and preprocess here (``ref_image``/``target_image``); CUDA
        readers keep JPEG bytes for nvJPEG and decode the rest (``predecode_for_gpu``);
        cache readers check the rows. Raises ``ValueError`` for an undecodable image."""
        ref, target = triplet.pop("ref_image_data"), triplet.pop("target_image_data")
        if self.image_mode == "decode":
            triplet["ref_image"] = self.preprocess(decode_image(ref), crop_rng)
            triplet["target_image"] = self.preprocess(decode_image(target), crop_rng)
        elif self.image_mode == "gpu":
            triplet["ref_data"] = predecode_for_gpu(ref)
            triplet["target_data"] = predecode_for_gpu(target)
        else:
            if ref < 0 or target < 0:
                raise ValueError("an image of the triplet did not decode when the cache was built")
            triplet["ref_index"], triplet["target_index"] = ref, target

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
        if self.image_mode == "decode":
            out["ref_images"] = torch.stack([t["ref_image"] for t in batch])
            out["target_images"] = torch.stack([t["target_image"] for t in batch])
        elif self.image_mode == "gpu":
            out["ref_data"] = [t["ref_data"] for t in batch]
            out["target_data"] = [t["target_data"] for t in batch]
        else:
            out["ref_index"] = torch.tensor([t["ref_index"] for t in batch], dtype=torch.long)
            out["target_index"] = torch.tensor([t["target_index"] for t in batch], dtype=torch.long)
        return out


class TripletLoader:
    """Iterable of exactly ``len(self)`` training batches per epoch on this rank.

    Each ``iter()`` runs the next epoch (initially the ``epoch`` argument), so ``for
    epoch ...: for batch in loader`` sees a fresh shard order and fresh triplets every
    epoch; ``epoch_batches(epoch, skip)`` runs a given epoch from batch ``skip`` on. Batches are dicts:
    ``ref_images``/``target_images`` (B, 3, S, S) float32, ``tokens`` (B, T) int64,
    ``lengths`` (B,) int64, ``texts``, ``ref_ids``, ``target_ids`` (lists of str).

    With an image cache no DataLoader runs: ``loader_workers`` readers (at least one)
    draw their index batches in this process, taken in the DataLoader's order, so the
    batches are those streaming would give, gathered from the cache on the device.
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
        a resumed run skips what it trained on at the cost of reading JSON only. (When
        streaming, a corrupt image among the skipped triplets, which a full pass would
        have dropped, shifts the rest of that epoch by one run; the cache knows its
        undecodable images, so it resumes exactly.) Advances ``self.epoch`` past it."""
        if not 0 <= skip <= self.batches_per_epoch:
            raise ValueError(f"skip must be in 0..{self.batches_per_epoch}, got {skip}")
        self.stream.epoch, self.stream.skip_batches = epoch, skip
        self.epoch = epoch + 1
        stream = self.stream
        if stream.image_mode == "cache":
            readers = max(1, self.loader_workers)
            batches = round_robin([stream.reader_batches(w, readers) for w in range(readers)], skip)
        else:
            batches = DataLoader(
                stream, batch_size=None, num_workers=self.loader_workers, persistent_workers=False
            )
        seed, rank = stream.seed, stream.rank
        for index, batch in enumerate(islice(batches, self.batches_per_epoch - skip), start=skip):
            if stream.image_mode == "decode":
                yield batch
                continue
            # a seed per batch, like the CPU path's per triplet: skips change nothing
            rng = random.Random(f"gpu-crop-{seed}-{epoch}-{rank}-{index}")
            if stream.image_mode == "gpu":
                yield decode_batch_on_device(batch, stream.preprocess, self.device, rng)
            else:
                yield stream.cache.batch(batch, stream.preprocess, rng)


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
    image_cache: str = "none",
    image_cache_gb: float | None = None,
    progress: bool = False,
) -> TripletLoader:
    """Training batches of one rank (see the module docstring for the streaming scheme).

    ``batches_per_epoch`` defaults to ``default_batches_per_epoch(...)``; pass the same
    value on every rank (it is what keeps DDP ranks in step). ``triplets_per_group`` > 1
    keeps that many triplets of one group together in a batch (``group_runs``).
    ``image_cache`` (``none``/``device``/``auto``, ``pipeline.image_cache``) decodes the
    split once onto ``device`` when it fits ``image_cache_gb`` (``progress``: a bar).
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
    shards = shard_paths(dataset_dir, manifest, split)
    preprocess = ImagePreprocess(image_size, mean, std, augment=augment)
    images = int(manifest["splits"][split].get("images", 0))
    cache, image_mode = None, "gpu" if device.type == "cuda" else "decode"
    if wants_cache(image_cache, images, image_size, device, image_cache_gb):
        cache = ImageCache.build(shards, preprocess, device, images, progress=progress)
        image_mode = "cache"
    stream = TripletStream(
        shards,
        vocab,
        batch_size=batch_size,
        preprocess=preprocess,
        rank=rank,
        world_size=world_size,
        seed=seed,
        epoch=epoch,
        shuffle_buffer=shuffle_buffer,
        split_by=split_by,
        max_text_len=max_text_len,
        image_mode=image_mode,
        triplets_per_group=triplets_per_group,
        cache=cache,
    )
    return TripletLoader(
        stream, batches_per_epoch=batches_per_epoch, loader_workers=loader_workers, device=device
    )

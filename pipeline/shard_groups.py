"""Reading a shard dataset's training groups: the vocabulary, epoch lengths, and which
shards (or samples) each reader of a distributed run takes.

``reader_shards`` is step 1-2 of ``pipeline.data``'s distributed streaming (an
epoch-seeded shard shuffle, split by node then by DataLoader worker, with a sample split
when there are fewer shards than readers); ``group_runs`` keeps ``triplets_per_group``
triplets of one group together through the shuffle buffer.
"""

from __future__ import annotations

import json
import logging
import random
import tarfile
from collections.abc import Callable, Iterable, Iterator
from itertools import chain, count
from pathlib import Path
from typing import Any

from torch.utils.data import get_worker_info

from pipeline.triplets import group_texts, triplets_per_epoch
from pipeline.vocab import Vocabulary
from shards.manifest import load_manifest, shard_paths

log = logging.getLogger(__name__)

SPLIT_MODES = ("auto", "shards", "samples")


# -- group JSON scans (vocabulary, epoch length) -----------------------------------------


def iter_group_jsons(dataset_dir: str | Path, split: str = "train") -> Iterator[dict[str, Any]]:
    """Every group JSON of a ``groups`` split, in shard order, without reading images
    into memory. Unparseable JSON is skipped with a warning."""
    manifest = load_manifest(dataset_dir)
    bad = 0
    for path in shard_paths(dataset_dir, manifest, split):
        with tarfile.open(path) as tar:
            for member in tar:
                if not member.isfile() or not member.name.endswith(".json"):
                    continue
                try:
                    group = json.loads(tar.extractfile(member).read())
                except (json.JSONDecodeError, UnicodeDecodeError):
                    bad += 1
                    continue
                yield group
    if bad:
        log.warning(
            "%s split %r: skipped %d group(s) with unreadable JSON", dataset_dir, split, bad
        )


def build_vocabulary(
    dataset_dir: str | Path, split: str = "train", min_count: int = 1
) -> Vocabulary:
    """Vocabulary of every training text: explicit pair texts and derived texts."""

    def texts():
        for group in iter_group_jsons(dataset_dir, split):
            try:
                yield from group_texts(group)
            except ValueError as err:
                log.warning("vocabulary: skipping malformed group: %s", err)

    return Vocabulary.build(texts(), min_count=min_count)


def count_triplets(dataset_dir: str | Path, split: str = "train") -> int:
    """Triplets drawn per epoch over the whole split (malformed groups count 0)."""
    total = 0
    for group in iter_group_jsons(dataset_dir, split):
        try:
            total += triplets_per_epoch(group)
        except ValueError:
            pass
    return total


def default_batches_per_epoch(
    dataset_dir: str | Path, batch_size: int, world_size: int = 1, split: str = "train"
) -> int:
    """``triplets per epoch // (batch_size * world_size)``, at least 1."""
    if batch_size < 1 or world_size < 1:
        raise ValueError(f"batch_size and world_size must be >= 1, got {batch_size}, {world_size}")
    return max(1, count_triplets(dataset_dir, split) // (batch_size * world_size))


# -- group samples (the training readers' input) -----------------------------------------

# (key, group JSON, per-member image data, error): image data are the encoded bytes of
# each member (or, in ``pipeline.image_cache``'s records, its cache row); error is a
# message when the sample is unusable (bad JSON, a missing image), else None.
GroupSample = tuple[str, Any, list, "str | None"]


def read_group_samples(shards: list[str]) -> Iterator[GroupSample]:
    """Every sample of ``shards``, in order, as ``GroupSample``s (unreadable tar members
    are skipped by webdataset with a warning)."""
    import webdataset as wds

    samples = wds.tarfile_samples([{"url": s} for s in shards], handler=wds.warn_and_continue)
    for sample in samples:
        key = sample.get("__key__")
        try:
            group = json.loads(sample["json"])
            images = [image_entry(sample, str(i))[0] for i in range(len(group["members"]))]
        except (KeyError, ValueError, TypeError, UnicodeDecodeError) as err:
            yield key, None, [], f"{type(err).__name__}: {err}"
            continue
        yield key, group, images, None


# -- shard assignment ---------------------------------------------------------------------


def reader_shards(
    shards: list[str],
    *,
    seed: int,
    epoch: int,
    rank: int,
    world_size: int,
    worker: int,
    num_workers: int,
    split_by: str = "auto",
) -> tuple[list[str], int, int]:
    """Which shards one reader streams this epoch, and which of their samples it keeps.

    Returns ``(shards, stride, offset)``: the reader keeps samples ``i`` (counted over
    its shard list) with ``i % stride == offset``; ``stride == 1`` for a shard split.
    """
    if split_by not in SPLIT_MODES:
        raise ValueError(f"split_by must be one of {SPLIT_MODES}, got {split_by!r}")
    if not 0 <= rank < world_size or not 0 <= worker < num_workers:
        raise ValueError(f"rank {rank}/{world_size} or worker {worker}/{num_workers} out of range")
    order = list(shards)
    random.Random(f"shards-{seed}-{epoch}").shuffle(order)
    readers = world_size * num_workers
    if split_by == "shards" or (split_by == "auto" and len(order) >= readers):
        if len(order) < readers:
            raise ValueError(
                f"{len(order)} shard(s) for {readers} readers ({world_size} rank(s) x "
                f"{num_workers} loader worker(s)): write more shards or use fewer workers"
            )
        return order[rank::world_size][worker::num_workers], 1, 0
    return order, readers, rank * num_workers + worker


def loader_worker() -> tuple[int, int]:
    info = get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


def image_entry(sample: dict[str, Any], name: str) -> tuple[bytes, str]:
    """The bytes and extension of ``<name>.<ext>`` in a WebDataset sample."""
    for key, value in sample.items():
        if key.startswith(name + ".") and "." not in key[len(name) + 1 :]:
            return value, key[len(name) + 1 :]
    raise KeyError(f"sample {sample.get('__key__')!r} has no image {name}.<ext>")


# -- training triplets --------------------------------------------------------------------


def group_runs(
    triplets: Iterable[dict[str, Any]], size: int, rng: random.Random
) -> Iterator[list[dict[str, Any]]]:
    """Consecutive triplets of one group (``"group"`` key), shuffled, in runs of ``size``.

    With ``train.triplets_per_group`` = k the shuffle buffer moves whole runs, so a batch
    holds k modifications of a scene: each other's targets are the hard negatives that
    only the text tells apart (in random batches about 1 % of the loss's negatives are).
    k = 2 on CSS is the TIRG authors' sampler (``generate_random_query_target``: a
    random triplet, then the same reference with a different modification), so a batch
    of 32 is 16 references x 2 modifications.

    Every triplet is kept, in exactly one run. A group with at least k triplets gives
    only runs of exactly k: its last, short run is completed with other triplets of the
    group (copies, distinct from the run's own), as the authors' sampler would draw
    them. A group with fewer than k triplets gives one shorter run.
    """
    pending: list[dict[str, Any]] = []
    for triplet in triplets:
        if pending and triplet["group"] != pending[0]["group"]:
            yield from _split_runs(pending, size, rng)
            pending = []
        pending.append(triplet)
    if pending:
        yield from _split_runs(pending, size, rng)


def _split_runs(
    group: list[dict[str, Any]], size: int, rng: random.Random
) -> Iterator[list[dict[str, Any]]]:
    rng.shuffle(group)
    runs = [group[start : start + size] for start in range(0, len(group), size)]
    last = runs[-1]
    if len(last) < size <= len(group):
        in_last = {id(t) for t in last}
        others = [t for t in group if id(t) not in in_last]
        last.extend(dict(t) for t in rng.sample(others, size - len(last)))
    yield from runs


def one_run_per_group_per_batch(
    runs: Iterable[list[dict[str, Any]]], batch_size: int, max_waiting: int = 256
) -> Iterator[list[dict[str, Any]]]:
    """``runs`` reordered so that no batch of ``batch_size`` triplets holds two runs of
    one group: a run whose group is already in the batch being filled waits (up to
    ``max_waiting`` runs) for the next batch. With k = 2 on CSS every batch is then 16
    different references x 2 modifications, as the authors' sampler draws them (a
    group's runs sit next to each other in the stream, so the shuffle buffer alone
    would often put two of them in one batch). Nothing is dropped."""
    waiting: list[list[dict[str, Any]]] = []
    in_batch: set[str] = set()
    filled = 0
    source = iter(runs)
    while True:
        run = next((w for w in waiting if w[0]["group"] not in in_batch), None)
        if run is not None:
            waiting.remove(run)
        else:
            for candidate in source:
                if candidate[0]["group"] in in_batch and len(waiting) < max_waiting:
                    waiting.append(candidate)
                    continue
                run = candidate
                break
            else:
                if not waiting:
                    return
                run = waiting.pop(0)  # the source ran dry: only repeats are left
        yield run
        in_batch.add(run[0]["group"])
        filled += len(run)
        if filled >= batch_size:  # the next batch starts (a straddling run opens it)
            filled -= batch_size
            in_batch = {run[0]["group"]} if filled else set()


def skip_triplets(
    units: Iterator[list[dict[str, Any]]], count_: int, unusable: Callable[[list], bool]
) -> tuple[Iterator[list[dict[str, Any]]], int]:
    """Draw ``count_`` usable triplets off ``units`` without preparing them: (the rest,
    with a unit cut in two kept as its tail, and how many triplets were drawn). Units
    that ``unusable`` knows a full pass would drop are drawn but do not count."""
    units = iter(units)
    kept = drawn = 0
    while kept < count_:
        unit = next(units)
        if unusable(unit):
            drawn += len(unit)
            continue
        if kept + len(unit) > count_:
            used = count_ - kept
            return chain([unit[used:]], units), drawn + used
        kept += len(unit)
        drawn += len(unit)
    return units, drawn


def round_robin(readers: list[Iterator[dict[str, Any]]], skip: int) -> Iterator[dict[str, Any]]:
    """Batch ``i`` (from ``skip`` on) from reader ``i % len(readers)``: the DataLoader's order."""
    for index in count(skip):
        yield next(readers[index % len(readers)])

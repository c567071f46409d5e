"""Atomic writer of a shard dataset directory (format: ``shards.manifest``).

Everything is written into ``<out>.partial-<pid>/`` and renamed to ``<out>`` only when
``finish()`` succeeds, so an interrupted conversion never leaves a directory that looks
complete (no ``manifest.json`` ever appears in a partial directory). Partial directories
that killed conversions left behind are removed when the next one starts
(``pipeline.partials``).
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import re
import shutil
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import webdataset as wds

from pipeline.partials import claim_partial_dir, release_owner_file
from shards.manifest import FORMAT_VERSION, MANIFEST_NAME, validate_manifest

log = logging.getLogger(__name__)
_KEY_RE = re.compile(r"^[A-Za-z0-9_-]+$")


class DatasetWriter:
    """Write groups, gallery images and queries; ``finish()`` publishes the directory.

    Use as a context manager: leaving the block with an exception removes the partial
    directory. ``overwrite=False`` refuses to replace an existing dataset.

    ``shard_sizes`` overrides ``shard_size`` (samples per shard) for named splits, e.g.
    fewer samples per train shard when each train sample is a group of many images.
    ``mtime`` fixes the tar entries' modification time (whole seconds; default: when the
    writer is created) so that the same samples give byte-identical shards. It is always an
    integer because a fractional mtime makes tarfile add a 1 KiB PAX header to every entry.
    """

    def __init__(
        self,
        out_dir: str | Path,
        name: str,
        created_by: str,
        *,
        shard_size: int = 1000,
        image_ext: str = "png",
        overwrite: bool = False,
        shard_sizes: dict[str, int] | None = None,
        mtime: float | None = None,
    ):
        self.out_dir = Path(out_dir)
        if self.out_dir.exists() and not overwrite:
            raise FileExistsError(f"{self.out_dir} already exists; pass --overwrite to replace it")
        if shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {shard_size}")
        for split, size in (shard_sizes or {}).items():
            if size < 1:
                raise ValueError(f"shard_sizes[{split!r}] must be >= 1, got {size}")
        self.name = name
        self.created_by = created_by
        self.shard_size = shard_size
        self.shard_sizes = dict(shard_sizes or {})
        self.mtime = int(time.time() if mtime is None else mtime)
        self.image_ext = image_ext
        self.overwrite = overwrite
        self.tmp_dir = claim_partial_dir(self.out_dir)  # removes partials of killed runs
        self._writers: dict[str, wds.ShardWriter] = {}
        self._kinds: dict[str, str] = {}
        self._samples: Counter = Counter()
        self._images: Counter = Counter()
        self._queries: dict[str, str] = {}
        self.skipped: list[dict[str, str]] = []

    # -- context manager -------------------------------------------------------------
    def __enter__(self) -> DatasetWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()

    # -- writing ---------------------------------------------------------------------
    def _writer(self, split: str, kind: str) -> wds.ShardWriter:
        if split not in self._writers:
            if not _KEY_RE.match(split):
                raise ValueError(f"split name {split!r} must be letters, digits, '-' or '_'")
            pattern = str(self.tmp_dir / f"{split}-%06d.tar")
            maxcount = self.shard_sizes.get(split, self.shard_size)
            self._writers[split] = wds.ShardWriter(
                pattern, maxcount=maxcount, verbose=0, mtime=self.mtime
            )
            self._kinds[split] = kind
        elif self._kinds[split] != kind:
            raise ValueError(f"split {split!r} is {self._kinds[split]!r}, not {kind!r}")
        return self._writers[split]

    def add_group(
        self, split: str, key: str, group: dict[str, Any], images: list[tuple[bytes, str]]
    ) -> None:
        """One training group: ``group`` JSON (members, pairs, derive) and member images.

        ``images[i]`` is ``(encoded bytes, extension)`` of ``group['members'][i]``.
        """
        if len(images) != len(group["members"]):
            raise ValueError(
                f"group {key!r}: {len(images)} images for {len(group['members'])} members"
            )
        sample: dict[str, Any] = {"__key__": _check_key(key), "json": group}
        for i, (data, ext) in enumerate(images):
            sample[f"{i}.{ext}"] = data
        self._writer(split, "groups").write(sample)
        self._samples[split] += 1
        self._images[split] += len(images)

    def add_gallery(
        self, split: str, key: str, meta: dict[str, Any], image: bytes, ext: str
    ) -> None:
        """One catalogue image with ``meta`` = ``{"id", "label"?, "caption"?, "category"?}``."""
        if "id" not in meta:
            raise ValueError(f"gallery sample {key!r} has no 'id'")
        sample = {"__key__": _check_key(key), "json": meta, f"img.{ext}": image}
        self._writer(split, "gallery").write(sample)
        self._samples[split] += 1
        self._images[split] += 1

    def set_queries(self, filename: str, queries: list[dict[str, Any]]) -> None:
        """Write one evaluation set's query list as JSON."""
        for q in queries:
            for key in ("qid", "ref_id", "text", "target_ids"):
                if key not in q:
                    raise ValueError(f"query {q!r} misses {key!r}")
        (self.tmp_dir / filename).write_text(json.dumps(queries))
        self._queries[filename] = filename

    def skip(self, item: str, reason: str) -> None:
        """Record an input item that was left out, with why."""
        self.skipped.append({"item": str(item), "reason": reason})
        log.debug("skipped %s: %s", item, reason)

    # -- finishing -------------------------------------------------------------------
    def finish(
        self,
        evals: dict[str, Any],
        *,
        source: dict[str, Any] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Close shards, write ``manifest.json`` and move the directory into place."""
        for writer in self._writers.values():
            writer.close()
        splits = {}
        for split, kind in self._kinds.items():
            shards = sorted(p.name for p in self.tmp_dir.glob(f"{split}-*.tar"))
            splits[split] = {
                "kind": kind,
                "shards": shards,
                "samples": self._samples[split],
                "images": self._images[split],
            }
        for name, ev in evals.items():
            if ev["queries"] not in self._queries:
                raise ValueError(
                    f"eval {name!r} names queries file {ev['queries']!r} never written"
                )
        release_owner_file(self.tmp_dir)
        total = sum(p.stat().st_size for p in self.tmp_dir.iterdir())
        manifest = {
            "format_version": FORMAT_VERSION,
            "name": self.name,
            "created_by": self.created_by,
            "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "image_ext": self.image_ext,
            "splits": splits,
            "evals": evals,
            "source": source or {},
            "skipped": self.skipped,
            "skipped_count": len(self.skipped),
            "bytes": total,
            "extra": extra or {},
        }
        validate_manifest(manifest, where=f"{self.out_dir}/{MANIFEST_NAME}")
        (self.tmp_dir / MANIFEST_NAME).write_text(json.dumps(manifest, indent=1))
        if self.out_dir.exists():
            shutil.rmtree(self.out_dir)
        os.replace(self.tmp_dir, self.out_dir)
        summarize_skipped(self.skipped, self.out_dir)
        return manifest

    def abort(self) -> None:
        """Remove everything written so far."""
        for writer in self._writers.values():
            try:
                writer.close()
            except Exception:  # noqa: BLE001 - cleanup must not mask the original error
                pass
        shutil.rmtree(self.tmp_dir, ignore_errors=True)


def summarize_skipped(skipped: list[dict[str, str]], where: Path) -> None:
    """Print a count of skipped items per reason on stderr (the full list is in the manifest)."""
    if not skipped:
        return
    reasons = Counter(s["reason"].split(":")[0] for s in skipped)
    lines = [f"{where}: skipped {len(skipped)} item(s) (listed in manifest.json):"]
    lines += [f"  {count:6d}  {reason}" for reason, count in reasons.most_common()]
    print("\n".join(lines), file=sys.stderr)


def _check_key(key: str) -> str:
    if not _KEY_RE.match(key):
        raise ValueError(f"sample key {key!r} must be letters, digits, '-' or '_' (no dots)")
    return key

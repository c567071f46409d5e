"""The dataset manifest: what a shard directory holds and how it is evaluated.

A dataset directory written by any converter in ``shards/`` looks like::

    DIR/manifest.json
    DIR/train-000000.tar ...        one sample per *group* (see below)
    DIR/gallery-000000.tar ...      one sample per catalogue image
    DIR/queries.json                evaluation queries (text only, no images)

Datasets with several evaluation sets (Fashion-IQ val, CIRR val + test) name them
``<eval>-gallery-*.tar`` / ``<eval>-queries.json``; the manifest's ``evals`` says which
files belong to which set.

``manifest.json``::

    {
      "format_version": 1,
      "name": "css",                       # dataset name, used to pick defaults
      "created_by": "shards.css",          # module that wrote it
      "created_at": "2026-11-27T23:00:00Z",
      "image_ext": "png",                  # or "jpg"
      "splits": {                          # every tar split, by prefix
        "train":   {"kind": "groups",  "shards": ["train-000000.tar"], "samples": 120, "images": 300},
        "gallery": {"kind": "gallery", "shards": ["gallery-000000.tar"], "samples": 500, "images": 500}
      },
      "evals": {                           # evaluation sets; first one is the default
        "test": {"gallery": "gallery", "queries": "queries.json", "count": 450,
                 "protocol": {...}}
      },
      "source": {"path": "...", "checksums": {"file": "sha256"}},   # converters only
      "skipped": [{"item": "women/dress/x.jpg", "reason": "truncated image"}],
      "skipped_count": 1,
      "bytes": 123456,                     # total size of the shards + queries
      "extra": {...}                       # dataset-specific (e.g. CSS generator settings)
    }

Sample layout (WebDataset keys never contain dots; ids live in the JSON):

* ``groups`` sample ``<key>``: ``<key>.json`` and ``<key>.0.<ext>``, ``<key>.1.<ext>``, ...::

      {"group": "g000012",
       "members": [{"id": "css_train_000017", "label": "...", "caption": "...",
                    "category": "dress", "attributes": [...]}, ...],
       "pairs": [{"ref": 0, "tgt": 1, "texts": ["make the red circle blue", ...]}, ...],
       "derive": null}                     # or "replace_word" (Fashion200k) / "change_state" (MIT-States)

  With explicit ``pairs`` the reader draws (members[ref], text, members[tgt]); with
  ``derive`` it derives texts from member captions (see ``pipeline.data``).
* ``gallery`` sample ``<key>``: ``<key>.img.<ext>`` and ``<key>.json`` =
  ``{"id": ..., "label": ..., "caption": ..., "category": ...}`` (label/caption/category
  optional).
* ``queries.json``: a list of ``{"qid": ..., "ref_id": ..., "text": "...",
  "target_ids": [...], "category": ..., "members": [...], "pairid": ...}``;
  ``target_ids`` is empty for test-server queries without targets.

``protocol`` (read by ``pipeline.protocols``)::

    {"name": "css" | "fashion200k" | "mitstates" | "fashioniq" | "cirr",
     "ks": [1, 5, 10, 50],
     "hit": "id" | "label",               # label: any gallery image with a target's label hits
     "exclude_reference": true,
     "per_category": false,               # Fashion-IQ: gallery restricted to the query's category
     "subset_ks": [1, 2, 3]}              # CIRR: Recall_subset within "members"
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
SPLIT_KINDS = ("groups", "gallery")
PROTOCOL_NAMES = ("css", "fashion200k", "mitstates", "fashioniq", "cirr")


class ManifestError(ValueError):
    """A dataset directory or its manifest is missing or malformed."""


def load_manifest(dataset_dir: str | Path) -> dict[str, Any]:
    """Read and validate ``DIR/manifest.json``; raise ``ManifestError`` naming the problem."""
    path = Path(dataset_dir) / MANIFEST_NAME
    if not Path(dataset_dir).is_dir():
        raise ManifestError(f"dataset directory {dataset_dir!s} does not exist")
    if not path.is_file():
        raise ManifestError(
            f"{path} not found: {dataset_dir!s} is not a finished shard dataset "
            "(an interrupted conversion leaves no manifest; rerun the converter)"
        )
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ManifestError(f"{path} is not valid JSON: {err}") from err
    validate_manifest(manifest, where=str(path))
    return manifest


def validate_manifest(manifest: dict[str, Any], where: str = "manifest") -> None:
    """Check the structure described in this module's docstring."""
    if not isinstance(manifest, dict):
        raise ManifestError(f"{where}: expected a JSON object")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise ManifestError(f"{where}: format_version {version!r}, expected {FORMAT_VERSION}")
    for key in ("name", "splits", "evals"):
        if key not in manifest:
            raise ManifestError(f"{where}: missing key {key!r}")
    for split, info in manifest["splits"].items():
        if info.get("kind") not in SPLIT_KINDS:
            raise ManifestError(
                f"{where}: split {split!r} has kind {info.get('kind')!r}, expected one of {SPLIT_KINDS}"
            )
        if not isinstance(info.get("shards"), list) or not info["shards"]:
            raise ManifestError(f"{where}: split {split!r} lists no shards")
    if not manifest["evals"]:
        raise ManifestError(f"{where}: no evaluation sets in 'evals'")
    for name, ev in manifest["evals"].items():
        for key in ("gallery", "queries", "protocol"):
            if key not in ev:
                raise ManifestError(f"{where}: eval {name!r} misses {key!r}")
        if ev["gallery"] not in manifest["splits"]:
            raise ManifestError(
                f"{where}: eval {name!r} names unknown gallery split {ev['gallery']!r}"
            )
        protocol = ev["protocol"]
        if protocol.get("name") not in PROTOCOL_NAMES:
            raise ManifestError(
                f"{where}: eval {name!r} protocol name {protocol.get('name')!r}, "
                f"expected one of {PROTOCOL_NAMES}"
            )


def shard_paths(dataset_dir: str | Path, manifest: dict[str, Any], split: str) -> list[str]:
    """Absolute paths of one split's tar shards, in manifest order."""
    if split not in manifest["splits"]:
        raise ManifestError(
            f"split {split!r} not in {dataset_dir!s}; it has {sorted(manifest['splits'])}"
        )
    return [str(Path(dataset_dir) / name) for name in manifest["splits"][split]["shards"]]


def default_eval(manifest: dict[str, Any]) -> str:
    """Name of the first evaluation set (the one training reports)."""
    return next(iter(manifest["evals"]))


def load_queries(dataset_dir: str | Path, manifest: dict[str, Any], eval_name: str) -> list[dict]:
    """The query list of one evaluation set."""
    if eval_name not in manifest["evals"]:
        raise ManifestError(
            f"eval {eval_name!r} not in {dataset_dir!s}; it has {sorted(manifest['evals'])}"
        )
    path = Path(dataset_dir) / manifest["evals"][eval_name]["queries"]
    return json.loads(path.read_text())

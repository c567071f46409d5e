"""Reading a converted shard dataset back in tests (plain tarfile, no torch)."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

from PIL import Image

from shards.manifest import load_manifest, load_queries, shard_paths
from shards.verify import verify_dataset


def read_split(out: Path, split: str) -> list[dict]:
    """Samples of one split: ``{"json": ..., "images": {name: bytes}}`` in shard order."""
    manifest = load_manifest(out)
    samples: dict[str, dict] = {}
    for path in shard_paths(out, manifest, split):
        with tarfile.open(path) as tar:
            for member in tar:
                key, _, field = member.name.partition(".")
                data = tar.extractfile(member).read()
                sample = samples.setdefault(key, {"images": {}})
                if field == "json":
                    sample["json"] = json.loads(data)
                else:
                    sample["images"][field] = data
    return list(samples.values())


def member_images(group: dict) -> list[bytes]:
    """A group's member images in member order (``0.<ext>``, ``1.<ext>``, ...)."""
    by_index = {int(name.split(".")[0]): data for name, data in group["images"].items()}
    return [by_index[i] for i in range(len(group["json"]["members"]))]


def decodes(data: bytes) -> tuple[int, int]:
    """Size of a stored image (fails the test if it does not decode)."""
    with Image.open(io.BytesIO(data)) as image:
        image.load()
        return image.size


def gallery_ids(out: Path, split: str) -> list[str]:
    return [s["json"]["id"] for s in read_split(out, split)]


def check_dataset(out: Path) -> dict:
    """Checks every converted dataset must pass; returns the manifest.

    Every stored image decodes, every query's reference and targets are gallery ids of
    its eval, and ``shards.verify`` finds no problem.
    """
    manifest = load_manifest(out)
    for split in manifest["splits"]:
        for sample in read_split(out, split):
            assert sample["images"], f"{split} sample without images"
            for data in sample["images"].values():
                decodes(data)
    for name, ev in manifest["evals"].items():
        ids = set(gallery_ids(out, ev["gallery"]))
        for q in load_queries(out, manifest, name):
            assert q["ref_id"] in ids, (name, q)
            assert set(q["target_ids"]) <= ids, (name, q)
    assert verify_dataset(out) == []
    return manifest


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def skipped_reasons(manifest: dict) -> dict[str, str]:
    """``item -> reason`` of the manifest's skipped list."""
    return {s["item"]: s["reason"] for s in manifest["skipped"]}

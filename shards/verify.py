"""Check a shard dataset directory end to end.

``python -m shards.verify DIR`` decodes every image of every split and checks it against
``manifest.json`` (format: ``shards.manifest``):

* the shard files listed per split are exactly the ``<split>-*.tar`` files present, and the
  query files named by ``evals`` exist;
* every tar reads to its end; every sample has a parseable ``json`` and decodable images;
* sample and image counts per split, query counts per eval and ``bytes`` match the manifest;
* groups: members have ids, images ``0.<ext>`` .. ``n-1.<ext>``, pairs point at members and
  carry texts (or the group names a ``derive`` rule); gallery: unique ids, a ``label`` where
  the protocol hits by label;
* queries: unique ``qid``, the required fields, ``ref_id`` and ``target_ids`` in the eval's
  gallery.

It exits 0 with a one-line summary per split, or 1 with the list of problems.
"""

from __future__ import annotations

import argparse
import io
import json
import re
import sys
import tarfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image
from tqdm import tqdm

from shards.manifest import MANIFEST_NAME, ManifestError, load_manifest

IMAGE_EXTS = ("png", "jpg", "jpeg", "webp")
QUERY_FIELDS = ("qid", "ref_id", "text", "target_ids")
MAX_LISTED = 50  # problems printed by the CLI before "... and N more"


@dataclass
class SplitContents:
    """What reading one split found."""

    samples: int = 0
    images: int = 0
    gallery_ids: set[str] = field(default_factory=set)


def verify_dataset(dataset_dir: str | Path, *, progress: bool = False) -> list[str]:
    """Every problem found in ``dataset_dir``, as readable sentences; empty when it is sound."""
    root = Path(dataset_dir)
    try:
        manifest = load_manifest(root)
    except ManifestError as err:
        return [str(err)]
    problems: list[str] = []
    problems += _check_files(root, manifest)
    labelled = {
        ev["gallery"] for ev in manifest["evals"].values() if ev["protocol"].get("hit") == "label"
    }
    contents = {}
    for split, info in manifest["splits"].items():
        contents[split] = _read_split(root, split, info, split in labelled, problems, progress)
        for key in ("samples", "images"):
            found = getattr(contents[split], key)
            if info.get(key) != found:
                problems.append(
                    f"split {split!r}: manifest says {info.get(key)} {key}, the shards hold {found}"
                )
    for name, ev in manifest["evals"].items():
        problems += _check_queries(root, name, ev, contents.get(ev["gallery"]))
    return problems


def _check_files(root: Path, manifest: dict[str, Any]) -> list[str]:
    problems = []
    listed_bytes = 0
    for split, info in manifest["splits"].items():
        listed = set(info["shards"])
        present = {p.name for p in root.glob("*.tar") if _shard_of(split, p.name)}
        for name in sorted(listed - present):
            problems.append(f"split {split!r}: shard {name} is listed but missing")
        for name in sorted(present - listed):
            problems.append(f"split {split!r}: shard {name} is present but not listed")
        listed_bytes += sum((root / n).stat().st_size for n in listed & present)
    other = {p.name for p in root.glob("*.tar")} - {
        n for info in manifest["splits"].values() for n in info["shards"]
    }
    for name in sorted(other):
        if not any(_shard_of(split, name) for split in manifest["splits"]):
            problems.append(f"shard {name} belongs to no split of the manifest")
    for name, ev in manifest["evals"].items():
        path = root / ev["queries"]
        if path.is_file():
            listed_bytes += path.stat().st_size
        else:
            problems.append(f"eval {name!r}: queries file {ev['queries']} is missing")
    if "bytes" in manifest and manifest["bytes"] != listed_bytes and not problems:
        problems.append(
            f"manifest says {manifest['bytes']} bytes of shards and queries, "
            f"the files hold {listed_bytes}"
        )
    return problems


def _shard_of(split: str, name: str) -> bool:
    """Whether ``name`` is named like a shard of ``split`` (``val-000000.tar`` is one of
    ``val``, ``val-gallery-000000.tar`` is not)."""
    return re.fullmatch(rf"{re.escape(split)}-\d+\.tar", name) is not None


def _read_split(
    root: Path,
    split: str,
    info: dict[str, Any],
    need_label: bool,
    problems: list[str],
    progress: bool,
) -> SplitContents:
    contents = SplitContents()
    ids: Counter = Counter()
    bar = tqdm(
        total=info.get("samples"), unit="sample", desc=f"verify {split}", disable=not progress
    )
    for shard in info["shards"]:
        path = root / shard
        if not path.is_file():
            continue
        for key, files, error in _samples(path):
            if error:
                problems.append(f"{shard}: {error}")
                break
            where = f"{shard} sample {key!r}"
            contents.samples += 1
            bar.update()
            meta = _json(files, where, problems)
            if info["kind"] == "gallery":
                contents.images += _check_gallery_sample(meta, files, where, problems, ids)
                if need_label and meta is not None and "label" not in meta:
                    problems.append(f"{where}: json has no 'label' (the protocol hits by label)")
            else:
                contents.images += _check_group_sample(meta, files, where, problems)
    bar.close()
    for sample_id, count in ids.items():
        if count > 1:
            problems.append(f"split {split!r}: gallery id {sample_id!r} occurs {count} times")
    contents.gallery_ids = set(ids)
    return contents


def _samples(path: Path) -> Iterator[tuple[str, dict[str, bytes], str | None]]:
    """(key, {suffix: bytes}, None) per sample of a tar; a last (.., .., error) if unreadable."""
    key, files = None, {}
    try:
        with tarfile.open(path, mode="r|") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                name = member.name.rsplit("/", 1)[-1]
                if "." not in name:
                    yield name, {}, f"entry {member.name!r} has no extension"
                    return
                sample_key, suffix = name.split(".", 1)
                data = tar.extractfile(member).read()
                if sample_key != key:
                    if key is not None:
                        yield key, files, None
                    key, files = sample_key, {}
                if suffix in files:
                    yield key, files, f"sample {key!r} has {suffix!r} twice"
                    return
                files[suffix] = data
            end = tar.offset
    except (tarfile.TarError, OSError, EOFError) as err:
        yield key or "", files, f"unreadable tar after sample {key!r}: {err}"
        return
    # tarfile stops quietly at a header-aligned cut; a whole archive ends in two zero blocks
    with path.open("rb") as stream:
        stream.seek(end)
        if stream.read(2 * tarfile.BLOCKSIZE) != bytes(2 * tarfile.BLOCKSIZE):
            yield (
                key or "",
                files,
                f"unreadable tar: truncated after sample {key!r} (no end marker)",
            )
            return
    if key is not None:
        yield key, files, None


def _json(files: dict[str, bytes], where: str, problems: list[str]) -> dict[str, Any] | None:
    if "json" not in files:
        problems.append(f"{where}: no json")
        return None
    try:
        meta = json.loads(files["json"])
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        problems.append(f"{where}: json does not parse: {err}")
        return None
    if not isinstance(meta, dict):
        problems.append(f"{where}: json is {type(meta).__name__}, expected an object")
        return None
    return meta


def _decodes(data: bytes, where: str, problems: list[str]) -> bool:
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
    except Exception as err:  # noqa: BLE001 - PIL raises many types for corrupt data
        problems.append(f"{where}: image does not decode: {type(err).__name__}: {err}")
        return False
    return True


def _check_gallery_sample(
    meta: dict | None, files: dict[str, bytes], where: str, problems: list[str], ids: Counter
) -> int:
    images = [s for s in files if s.startswith("img.") and s.split(".", 1)[1] in IMAGE_EXTS]
    if len(images) != 1:
        problems.append(f"{where}: expected one img.<ext> image, found {sorted(files)}")
    for suffix in images:
        _decodes(files[suffix], f"{where} {suffix}", problems)
    if meta is not None:
        if not isinstance(meta.get("id"), str | int):
            problems.append(f"{where}: json has no 'id'")
        else:
            ids[str(meta["id"])] += 1
    return len(images)


def _check_group_sample(
    meta: dict | None, files: dict[str, bytes], where: str, problems: list[str]
) -> int:
    images = {s.split(".", 1)[0]: s for s in files if "." in s and s.split(".", 1)[1] in IMAGE_EXTS}
    for suffix in images.values():
        _decodes(files[suffix], f"{where} {suffix}", problems)
    if meta is None:
        return len(images)
    members = meta.get("members")
    if not isinstance(members, list) or not members:
        problems.append(f"{where}: json has no 'members' list")
        return len(images)
    if sorted(images) != sorted(str(i) for i in range(len(members))):
        problems.append(f"{where}: {len(members)} members but images {sorted(images.values())}")
    member_ids = [m.get("id") if isinstance(m, dict) else None for m in members]
    if any(i is None for i in member_ids):
        problems.append(f"{where}: a member has no 'id'")
    elif len(set(member_ids)) != len(member_ids):
        problems.append(f"{where}: member ids repeat")
    pairs = meta.get("pairs") or []
    if not pairs and not meta.get("derive"):
        problems.append(f"{where}: neither 'pairs' nor 'derive'")
    for pair in pairs:
        ref, tgt, texts = pair.get("ref"), pair.get("tgt"), pair.get("texts")
        if not all(isinstance(i, int) and 0 <= i < len(members) for i in (ref, tgt)) or ref == tgt:
            problems.append(
                f"{where}: pair {ref}->{tgt} does not name two of {len(members)} members"
            )
        if (
            not isinstance(texts, list)
            or not texts
            or not all(isinstance(t, str) and t.strip() for t in texts)
        ):
            problems.append(f"{where}: pair {ref}->{tgt} has no texts")
    return len(images)


def _check_queries(
    root: Path, name: str, ev: dict[str, Any], gallery: SplitContents | None
) -> list[str]:
    path = root / ev["queries"]
    if not path.is_file():
        return []  # reported by _check_files
    try:
        queries = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        return [f"eval {name!r}: {ev['queries']} does not parse: {err}"]
    if not isinstance(queries, list):
        return [f"eval {name!r}: {ev['queries']} holds {type(queries).__name__}, expected a list"]
    problems = []
    if "count" in ev and ev["count"] != len(queries):
        problems.append(
            f"eval {name!r}: manifest says {ev['count']} queries, "
            f"{ev['queries']} holds {len(queries)}"
        )
    qids: Counter = Counter()
    known = gallery.gallery_ids if gallery is not None else set()
    for i, query in enumerate(queries):
        where = f"eval {name!r} query #{i}"
        missing = [k for k in QUERY_FIELDS if not isinstance(query, dict) or k not in query]
        if missing:
            problems.append(f"{where}: misses {missing}")
            continue
        qids[str(query["qid"])] += 1
        if not isinstance(query["text"], str):
            problems.append(f"{where}: text is not a string")
        if str(query["ref_id"]) not in known:
            problems.append(
                f"{where}: ref_id {query['ref_id']!r} is not in gallery split {ev['gallery']!r}"
            )
        if not isinstance(query["target_ids"], list):
            problems.append(f"{where}: target_ids is not a list")
            continue
        for target in query["target_ids"]:
            if str(target) not in known:
                problems.append(
                    f"{where}: target id {target!r} is not in gallery split {ev['gallery']!r}"
                )
    problems += [f"eval {name!r}: qid {q!r} occurs {n} times" for q, n in qids.items() if n > 1]
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m shards.verify", description="Decode and cross-check a shard dataset."
    )
    parser.add_argument("dataset", help="dataset directory (holds manifest.json)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    args = parser.parse_args(argv)
    problems = verify_dataset(args.dataset, progress=not args.no_progress)
    if problems:
        print(f"{args.dataset}: {len(problems)} problem(s):", file=sys.stderr)
        for line in problems[:MAX_LISTED]:
            print(f"  - {line}", file=sys.stderr)
        if len(problems) > MAX_LISTED:
            print(f"  ... and {len(problems) - MAX_LISTED} more", file=sys.stderr)
        return 1
    manifest = json.loads((Path(args.dataset) / MANIFEST_NAME).read_text())
    print(f"{args.dataset}: OK ({manifest['name']}, {manifest.get('bytes', 0) / 1e6:.1f} MB)")
    for split, info in manifest["splits"].items():
        print(
            f"  {split:<12} {info['kind']:<8} {len(info['shards']):4d} shards "
            f"{info['samples']:8d} samples {info['images']:8d} images"
        )
    for name, ev in manifest["evals"].items():
        print(f"  eval {name:<7} {ev.get('count', 0):8d} queries over {ev['gallery']!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Convert MIT-States (Isola et al., CVPR 2015) with TIRG's protocol to shards.

Raw layout (the release as distributed)::

    SRC/images/<adj> <noun>/*.jpg      one folder per state + object, e.g. "ancient building"

Folders named ``adj <noun>`` hold images without a state and are left out, as TIRG
(Vo et al., CVPR 2019, Sec. 4.4) does. The 49 nouns of ``TEST_NOUNS`` (TIRG's list) are
held out for testing; every other noun is training data.

Training groups are images of one noun with ``"derive": "change_state"``: members carry
``attributes = {"adj", "noun"}`` and the reader pairs members of different adjectives
with the target adjective as text (``pipeline.triplets``). A noun's images are cut into
groups of at most ``--group-size`` that each mix two or more adjectives
(``shards.grouping.chunk_by_class``), each image stored once (plus at most one copy per
group that would otherwise hold a single adjective).

Evaluation (TIRG's): gallery = every test image with label "adj noun" and its ``adj`` and
``noun``; for each test image and each *other* adjective of its noun in the test set, a
query with the target adjective as text. Any gallery image labelled "<target adj> <noun>"
is a hit (``target_ids`` names one of them); the reference is excluded. The gallery's
``adj``/``noun`` give adjective-only and noun-only recalls.

Usage::

    python -m shards.mitstates --src RAW_MITSTATES --out data/mitstates
"""

from __future__ import annotations

import argparse
import hashlib
from collections import defaultdict
from pathlib import Path
from typing import Any

from shards import cli
from shards.conversion import (
    ImageTable,
    group_shard_size,
    raw_bytes,
    stored_ext,
    write_gallery,
    write_groups,
)
from shards.grouping import chunk_by_class, duplication
from shards.writer import DatasetWriter

# TIRG's held-out test nouns (datasets.py, MITStates).
TEST_NOUNS = frozenset(
    {
        "armor",
        "bracelet",
        "bush",
        "camera",
        "candy",
        "castle",
        "ceramic",
        "cheese",
        "clock",
        "clothes",
        "coffee",
        "fan",
        "fig",
        "fish",
        "foam",
        "forest",
        "fruit",
        "furniture",
        "garden",
        "gate",
        "glass",
        "horse",
        "island",
        "laptop",
        "lead",
        "lightning",
        "mirror",
        "orange",
        "paint",
        "persimmon",
        "plastic",
        "plate",
        "potato",
        "road",
        "rubber",
        "sand",
        "shell",
        "sky",
        "smoke",
        "steel",
        "stream",
        "table",
        "tea",
        "tomato",
        "vacuum",
        "wax",
        "wheel",
        "window",
        "wool",
    }
)
NO_STATE = "adj"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
PROTOCOL = {
    "name": "mitstates",
    "ks": [1, 5, 10],
    "hit": "label",
    "exclude_reference": True,
    "per_category": False,
    "attribute_hits": ["adj", "noun"],
}


def list_images(
    src: Path, writer: DatasetWriter
) -> tuple[dict[str, list[tuple[str, str, Path]]], dict[str, int]]:
    """``({"train"|"test": [(adj, noun, path)]}, excluded counts)`` from ``images/``.

    Files that are not images are skipped; "adj <noun>" folders and folders that are not
    "<adj> <noun>" are excluded (counted, not listed).
    """
    images_dir = cli.require_dir(src / "images", "images/<adj> <noun>/*.jpg (MIT-States)")
    folders = sorted(p for p in images_dir.iterdir() if p.is_dir())
    if not any(len(p.name.split()) == 2 for p in folders):
        raise cli.LayoutError(
            f"{images_dir}: expected folders named '<adj> <noun>', found "
            f"{[p.name for p in folders[:5]]}"
        )
    split_images: dict[str, list[tuple[str, str, Path]]] = {"train": [], "test": []}
    excluded = {"no_state_images": 0, "other_folders": 0}
    for folder in folders:
        words = folder.name.split()
        if len(words) != 2:
            excluded["other_folders"] += 1
            continue
        adj, noun = words
        files = sorted(p for p in folder.iterdir() if p.is_file())
        if adj == NO_STATE:
            excluded["no_state_images"] += len(files)
            continue
        split = "test" if noun in TEST_NOUNS else "train"
        for path in files:
            if path.suffix.lower() not in IMAGE_SUFFIXES:
                writer.skip(str(path.relative_to(src)), "not an image file: expected .jpg")
                continue
            split_images[split].append((adj, noun, path))
    return split_images, excluded


def noun_groups(
    images: list[tuple[str, str, Any]], group_size: int
) -> tuple[list[tuple[str, list[tuple[str, str, Any]]]], int]:
    """``([(noun, members)], images of nouns with a single adjective)``."""
    by_noun: dict[str, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    for entry in images:
        adj, noun, _ = entry
        by_noun[noun][adj].append(entry)
    groups, single_state = [], 0
    for noun in sorted(by_noun):
        if len(by_noun[noun]) < 2:
            single_state += sum(len(v) for v in by_noun[noun].values())
            continue
        groups += [(noun, chunk) for chunk in chunk_by_class(by_noun[noun], group_size)]
    return groups, single_state


def test_queries(gallery: list[tuple[str, str, str]]) -> list[dict[str, Any]]:
    """TIRG's queries from ``(id, adj, noun)`` gallery entries (see module docstring)."""
    first_of: dict[tuple[str, str], str] = {}
    adjs_of: dict[str, list[str]] = defaultdict(list)
    for image_id, adj, noun in gallery:
        if (adj, noun) not in first_of:
            first_of[(adj, noun)] = image_id
            adjs_of[noun].append(adj)
    queries = []
    for image_id, adj, noun in gallery:
        for target_adj in adjs_of[noun]:
            if target_adj != adj:
                queries.append(
                    {
                        "qid": f"test-{len(queries):07d}",
                        "ref_id": image_id,
                        "text": target_adj,
                        "target_ids": [first_of[(target_adj, noun)]],
                    }
                )
    return queries


def convert(args: argparse.Namespace) -> dict[str, Any]:
    src: Path = args.src
    with DatasetWriter(
        args.out,
        "mitstates",
        "shards.mitstates",
        shard_size=args.shard_size,
        overwrite=args.overwrite,
    ) as writer:
        listed, excluded = list_images(src, writer)
        table = ImageTable(writer, src, args.workers)
        usable = {}
        for split, entries in listed.items():
            table.check((path for _, _, path in entries), desc=f"checking {split} images")
            usable[split] = [e for e in entries if table.get(e[2])]

        def image_id(path: Path) -> str:
            return str(path.relative_to(src / "images"))

        groups_by_noun, single_state = noun_groups(usable["train"], args.group_size)
        groups = []
        for noun, members in groups_by_noun:
            group = {
                "members": [
                    {
                        "id": image_id(p),
                        "label": f"{a} {n}",
                        "caption": f"{a} {n}",
                        "attributes": {"adj": a, "noun": n},
                    }
                    for a, n, p in members
                ],
                "pairs": [],
                "derive": "change_state",
                "noun": noun,
            }
            groups.append((group, [table.get(p) for _, _, p in members]))
        writer.shard_sizes["train"] = group_shard_size(args.shard_size, groups)
        stored = write_groups(writer, "train", groups, workers=args.workers)

        stored += write_gallery(
            writer,
            "gallery",
            [
                (
                    {
                        "id": image_id(p),
                        "label": f"{a} {n}",
                        "caption": f"{a} {n}",
                        "adj": a,
                        "noun": n,
                    },
                    table.get(p),
                )
                for a, n, p in usable["test"]
            ],
            workers=args.workers,
        )
        queries = test_queries([(image_id(p), a, n) for a, n, p in usable["test"]])
        writer.set_queries("queries.json", queries)

        writer.image_ext = stored_ext(stored)
        annotations = sorted(
            p for p in src.iterdir() if p.is_file() and p.suffix.lower() in (".txt", ".csv")
        )
        file_list = "\n".join(sorted(image_id(p) for split in listed for _, _, p in listed[split]))
        source = cli.source_info(src, annotations)
        source["checksums"]["images/ (sorted file list)"] = hashlib.sha256(
            file_list.encode()
        ).hexdigest()
        return writer.finish(
            {
                "test": {
                    "gallery": "gallery",
                    "queries": "queries.json",
                    "count": len(queries),
                    "protocol": PROTOCOL,
                }
            },
            source=source,
            extra={
                "test_nouns": sorted(TEST_NOUNS),
                "group_size": args.group_size,
                "groups": duplication([m["id"] for m in g["members"]] for g, _ in groups),
                "excluded": {**excluded, "single_state_train_images": single_state},
                "raw_bytes": raw_bytes(stored, annotations),
            },
        )


def build_parser() -> argparse.ArgumentParser:
    return cli.converter_parser("python -m shards.mitstates", __doc__.split("\n\n")[0])


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return cli.run_converter(build_parser(), convert, argv)


if __name__ == "__main__":
    main()

"""Convert Fashion200k (Han et al., ICCV 2017) with TIRG's protocol to shards.

Raw layout (the dataset as distributed, plus TIRG's ``test_queries.txt``)::

    SRC/labels/<category>_<split>_detect_all.txt   image path <TAB> detection score <TAB> caption
    SRC/women/<category>/.../<id>.jpeg               the images (paths as in the label files)
    SRC/test_queries.txt                             "<source path> <target path>" per line

Training (as TIRG, Vo et al. CVPR 2019, Sec. 4.3): a *parent caption* is a caption with
one word removed; an image is usable when one of its parents has two or more distinct
child captions, and two images whose captions share a parent form a pair with text
"replace <word> with <word>". Groups are ``"derive": "replace_word"``: the reader derives
the texts from member captions (``pipeline.triplets``).

Grouping, so each image is stored about once: every caption's images are spread over
its usable parents (image k of a caption goes to parent k mod #parents; a caption with
fewer images than parents lends an image to several, the only copies), then each
parent's images are cut into groups of at most ``--group-size`` that each mix two or more
captions (``shards.grouping.chunk_by_class``). Every (caption, parent) relation survives;
pairs of captions that landed in different groups of a large parent are not drawn.

Evaluation: gallery = every test image (label = caption), one query per line of
``test_queries.txt`` with TIRG's text and the target image; any gallery image with the
target's caption is a hit, the reference image is excluded.

Usage::

    python -m shards.fashion200k --src RAW_F200K --out data/fashion200k
"""

from __future__ import annotations

import argparse
import re
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

PROTOCOL = {
    "name": "fashion200k",
    "ks": [1, 10, 50],
    "hit": "label",
    "exclude_reference": True,
    "per_category": False,
}
LABEL_FILE = re.compile(r"^(?P<category>.+)_(?P<split>train|test)_detect_all\.txt$")
QUERIES_FILE = "test_queries.txt"


def parent_captions(caption: str) -> set[str]:
    """Every caption with one word removed."""
    words = caption.split()
    return {" ".join(words[:i] + words[i + 1 :]) for i in range(len(words))}


def replacement_text(source: str, target: str) -> str:
    """TIRG's modification text: the first source word missing from the target is
    replaced by the first target word missing from the source (last words if none)."""
    src, tgt = source.split(), target.split()
    old = next((w for w in src if w not in tgt), src[-1] if src else "")
    new = next((w for w in tgt if w not in src), tgt[-1] if tgt else "")
    return f"replace {old} with {new}"


def read_label_files(src: Path, writer: DatasetWriter) -> dict[str, dict[str, dict[str, str]]]:
    """``{split: {image path: {"caption", "category"}}}`` from every label file.

    Lines with the wrong number of fields, empty captions and repeated paths are skipped.
    """
    labels_dir = cli.require_dir(
        src / "labels", "labels/<category>_<split>_detect_all.txt (Fashion200k)"
    )
    files = sorted(p for p in labels_dir.iterdir() if LABEL_FILE.match(p.name))
    splits = {LABEL_FILE.match(p.name)["split"] for p in files}
    if splits != {"train", "test"}:
        raise cli.LayoutError(
            f"{labels_dir}: expected <category>_train_detect_all.txt and "
            f"<category>_test_detect_all.txt files, found {sorted(p.name for p in files)}"
        )
    entries: dict[str, dict[str, dict[str, str]]] = {"train": {}, "test": {}}
    for path in files:
        match = LABEL_FILE.match(path.name)
        split, category = match["split"], match["category"]
        for number, line in enumerate(
            path.read_text(encoding="utf-8", errors="replace").splitlines(), 1
        ):
            where = f"labels/{path.name}:{number}"
            if not line.strip():
                continue
            fields = line.split("\t")
            if len(fields) != 3:
                writer.skip(
                    where,
                    f"bad caption line: expected 3 tab-separated fields "
                    f"(image path, detection score, caption), got {len(fields)}",
                )
                continue
            image, caption = fields[0].strip(), " ".join(fields[2].split())
            if not image or not caption:
                writer.skip(where, "bad caption line: empty image path or caption")
                continue
            if image in entries[split]:
                writer.skip(where, f"duplicate entry: {image} listed before")
                continue
            entries[split][image] = {"caption": caption, "category": category}
    return entries


def train_groups(
    captions: dict[str, str], group_size: int
) -> tuple[list[tuple[str, list[str]]], int]:
    """``([(parent, member paths)], unusable image count)`` from usable ``path -> caption``.

    See the module docstring for how images are spread over parents and cut into groups.
    """
    images_of: dict[str, list[str]] = defaultdict(list)
    for path, caption in captions.items():
        images_of[caption].append(path)
    children: dict[str, set[str]] = defaultdict(set)
    for caption in images_of:
        for parent in parent_captions(caption):
            children[parent].add(caption)
    members_of: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    unusable = 0
    for caption, images in sorted(images_of.items()):
        parents = sorted(p for p in parent_captions(caption) if len(children[p]) >= 2)
        if not parents:
            unusable += len(images)
            continue
        for k in range(max(len(images), len(parents))):
            members_of[parents[k % len(parents)]][caption].append(images[k % len(images)])
    groups = []
    for parent in sorted(members_of):
        for chunk in chunk_by_class(members_of[parent], group_size):
            groups.append((parent, chunk))
    return groups, unusable


def convert(args: argparse.Namespace) -> dict[str, Any]:
    src: Path = args.src
    queries_file = cli.require_file(
        src / QUERIES_FILE, "TIRG's test_queries.txt (source and target path per line)"
    )
    with DatasetWriter(
        args.out,
        "fashion200k",
        "shards.fashion200k",
        shard_size=args.shard_size,
        overwrite=args.overwrite,
    ) as writer:
        entries = read_label_files(src, writer)
        table = ImageTable(writer, src, args.workers)
        for split in ("train", "test"):
            table.check((src / p for p in entries[split]), desc=f"checking {split} images")
        usable = {
            split: {p: e for p, e in entries[split].items() if table.get(src / p)}
            for split in entries
        }

        parent_groups, unusable = train_groups(
            {p: e["caption"] for p, e in usable["train"].items()}, args.group_size
        )
        groups = []
        for parent, paths in parent_groups:
            members = [
                {
                    "id": p,
                    "label": usable["train"][p]["caption"],
                    "caption": usable["train"][p]["caption"],
                    "category": usable["train"][p]["category"],
                }
                for p in paths
            ]
            groups.append(
                (
                    {"members": members, "pairs": [], "derive": "replace_word", "parent": parent},
                    [table.get(src / p) for p in paths],
                )
            )
        writer.shard_sizes["train"] = group_shard_size(args.shard_size, groups)
        stored = write_groups(writer, "train", groups, workers=args.workers)

        gallery = usable["test"]
        stored += write_gallery(
            writer,
            "gallery",
            [
                (
                    {
                        "id": p,
                        "label": e["caption"],
                        "caption": e["caption"],
                        "category": e["category"],
                    },
                    table.get(src / p),
                )
                for p, e in gallery.items()
            ],
            workers=args.workers,
        )
        queries = read_queries(queries_file, entries["test"], gallery, table, writer)
        writer.set_queries("queries.json", queries)

        writer.image_ext = stored_ext(stored)
        annotations = [queries_file, *sorted((src / "labels").glob("*_detect_all.txt"))]
        return writer.finish(
            {
                "test": {
                    "gallery": "gallery",
                    "queries": "queries.json",
                    "count": len(queries),
                    "protocol": PROTOCOL,
                }
            },
            source=cli.source_info(src, annotations),
            extra={
                "group_size": args.group_size,
                "groups": duplication([m["id"] for m in g["members"]] for g, _ in groups),
                "train_images_unmodifiable": unusable,
                "raw_bytes": raw_bytes(stored, annotations),
            },
        )


def read_queries(
    path: Path,
    listed: dict[str, dict[str, str]],
    gallery: dict[str, dict[str, str]],
    table: ImageTable,
    writer: DatasetWriter,
) -> list[dict[str, Any]]:
    """Queries from TIRG's ``test_queries.txt``; unknown or unusable images are skipped."""
    queries = []
    for number, line in enumerate(
        path.read_text(encoding="utf-8", errors="replace").splitlines(), 1
    ):
        where = f"{QUERIES_FILE}:{number}"
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 2:
            writer.skip(
                where,
                f"bad query line: expected '<source path> <target path>', got {len(fields)} fields",
            )
            continue
        problem = None
        for image in fields:
            if image not in listed:
                problem = f"unknown image: {image} is not in the test label files"
            elif image not in gallery:
                problem = f"unusable image: {image} ({table.reason(table.root / image)})"
            if problem:
                break
        if problem:
            writer.skip(where, problem)
            continue
        source, target = fields
        queries.append(
            {
                "qid": f"test-{number:06d}",
                "ref_id": source,
                "text": replacement_text(gallery[source]["caption"], gallery[target]["caption"]),
                "target_ids": [target],
                "category": gallery[source]["category"],
            }
        )
    return queries


def build_parser() -> argparse.ArgumentParser:
    return cli.converter_parser("python -m shards.fashion200k", __doc__.split("\n\n")[0])


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return cli.run_converter(build_parser(), convert, argv)


if __name__ == "__main__":
    main()

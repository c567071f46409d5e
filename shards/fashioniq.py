"""Convert Fashion-IQ (Wu et al., CVPR 2021) to shards.

Raw layout (the release as distributed, images fetched by the user)::

    SRC/captions/cap.<category>.<split>.json        [{"candidate", "target", "captions": [2]}]
    SRC/image_splits/split.<category>.<split>.json  [asin, ...]
    SRC/images/<asin>.<ext>                         (public copies miss some images)

for categories dress, shirt, toptee and splits train, val (and test, when present).
A triplet whose candidate or target image is missing or corrupt is skipped and listed.

Training: each (candidate, target) pair has texts = its two captions joined with " and " in
both orders; pairs are packed into groups per category (``shards.grouping.group_pairs``:
images shared by several triplets are stored once per group, not once per triplet).

Evaluation "val": gallery = every val-split image of the converted categories (with its
``category``), one query per val triplet (``text`` = the captions joined with " and ",
``texts`` and ``captions`` = both captions); the gallery is restricted to the query's
category, the reference excluded, the target hit by id. Evaluation "test" (when
``cap.<category>.test.json`` exist): test gallery and queries without targets, for
submission files.

Usage::

    python -m shards.fashioniq --src RAW_FASHIONIQ --out data/fashioniq
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from shards import cli
from shards.conversion import (
    ImageTable,
    NamedImages,
    group_shard_size,
    raw_bytes,
    stored_ext,
    write_gallery,
    write_groups,
)
from shards.grouping import duplication, group_pairs
from shards.writer import DatasetWriter

CATEGORIES = ("dress", "shirt", "toptee")
PROTOCOL = {
    "name": "fashioniq",
    "ks": [10, 50],
    "hit": "id",
    "exclude_reference": True,
    "per_category": True,
}


def read_json_list(path: Path) -> list:
    """A JSON file that must hold a list (a wrong file is a layout error, not a crash)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise cli.LayoutError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(data, list):
        raise cli.LayoutError(f"{path}: expected a JSON list, got {type(data).__name__}")
    return data


def index_images(images_dir: Path) -> dict[str, Path]:
    """``asin -> file`` for every file under ``images/`` (some copies keep one folder per
    category); the first path in name order wins when a name repeats."""
    index: dict[str, Path] = {}
    for path in sorted(images_dir.rglob("*")):
        if path.is_file():
            index.setdefault(path.stem, path)
    return index


def parse_triplet(entry: Any, test: bool) -> tuple[str, str | None, list[str]]:
    """``(candidate, target or None for test, [caption, caption])``; ValueError if bad."""
    if not isinstance(entry, dict):
        raise ValueError(f"expected an object, got {type(entry).__name__}")
    candidate, target, captions = entry.get("candidate"), entry.get("target"), entry.get("captions")
    if not isinstance(candidate, str) or (not test and not isinstance(target, str)):
        raise ValueError("expected 'candidate' and 'target' image names")
    if (
        not isinstance(captions, list)
        or len(captions) != 2
        or not all(isinstance(c, str) and c.strip() for c in captions)
    ):
        raise ValueError(f"expected 'captions' with 2 texts, got {captions!r}")
    # Test targets are hidden by the benchmark: test queries never carry one.
    return candidate, None if test else target, [c.strip() for c in captions]


def convert(args: argparse.Namespace) -> dict[str, Any]:
    src: Path = args.src
    categories = args.categories
    files = {}
    for category in categories:
        files[("cap", category, "train")] = cli.require_file(
            src / "captions" / f"cap.{category}.train.json", "Fashion-IQ caption file"
        )
        files[("cap", category, "val")] = cli.require_file(
            src / "captions" / f"cap.{category}.val.json", "Fashion-IQ caption file"
        )
        files[("split", category, "val")] = cli.require_file(
            src / "image_splits" / f"split.{category}.val.json", "Fashion-IQ image split file"
        )
    test_categories = [c for c in categories if (src / "captions" / f"cap.{c}.test.json").is_file()]
    for category in test_categories:
        files[("cap", category, "test")] = src / "captions" / f"cap.{category}.test.json"
        files[("split", category, "test")] = cli.require_file(
            src / "image_splits" / f"split.{category}.test.json",
            "the test image split next to captions/cap.<category>.test.json",
        )
    images = index_images(cli.require_dir(src / "images", "images/<asin>.jpg (Fashion-IQ)"))

    with DatasetWriter(
        args.out,
        "fashioniq",
        "shards.fashioniq",
        shard_size=args.shard_size,
        overwrite=args.overwrite,
    ) as writer:
        table = ImageTable(writer, src, args.workers)
        checker = NamedImages(images, table, missing_item="images/{name}.*")
        triplets = {
            key: _read_triplets(path, key[2] == "test", writer, src)
            for key, path in files.items()
            if key[0] == "cap"
        }
        needed = {name for t in triplets.values() for c, g, _, _ in t for name in (c, g) if name}
        split_lists = {
            key: [str(a) for a in read_json_list(path)]
            for key, path in files.items()
            if key[0] == "split"
        }
        needed |= {a for names in split_lists.values() for a in names}
        checker.check(needed)

        groups = []
        for category in categories:
            pairs = []
            for candidate, target, texts, where in triplets[("cap", category, "train")]:
                if checker.usable(where, "triplet", candidate, target):
                    pairs.append(
                        (candidate, target, [" and ".join(texts), " and ".join(reversed(texts))])
                    )
            for group in group_pairs(pairs, args.group_size):
                groups.append(
                    (
                        {
                            "members": [{"id": m, "category": category} for m in group.members],
                            "pairs": [{"ref": r, "tgt": t, "texts": x} for r, t, x in group.pairs],
                            "derive": None,
                        },
                        [checker.image(m) for m in group.members],
                    )
                )
        writer.shard_sizes["train"] = group_shard_size(args.shard_size, groups)
        stored = write_groups(writer, "train", groups, workers=args.workers)

        evals = {}
        for split, split_categories in (("val", categories), ("test", test_categories)):
            if not split_categories:
                continue
            gallery = _gallery(split, split_categories, split_lists, checker, writer)
            stored += write_gallery(
                writer,
                f"{split}-gallery",
                [({"id": a, "category": c}, checker.image(a)) for a, c in gallery.items()],
                workers=args.workers,
                desc=f"writing {split} gallery",
            )
            queries = []
            for category in split_categories:
                for candidate, target, texts, where in triplets[("cap", category, split)]:
                    if not checker.in_gallery(where, "query", gallery, candidate, target):
                        continue
                    queries.append(
                        {
                            "qid": f"{split}-{category}-{len(queries):06d}",
                            "ref_id": candidate,
                            "text": " and ".join(texts),
                            "texts": texts,
                            "captions": texts,
                            "target_ids": [target] if target else [],
                            "category": category,
                        }
                    )
            writer.set_queries(f"{split}-queries.json", queries)
            evals[split] = {
                "gallery": f"{split}-gallery",
                "queries": f"{split}-queries.json",
                "count": len(queries),
                "protocol": {**PROTOCOL, "categories": list(split_categories)},
            }

        writer.image_ext = stored_ext(stored)
        return writer.finish(
            evals,
            source=cli.source_info(src, files.values()),
            extra={
                "categories": list(categories),
                "group_size": args.group_size,
                "groups": duplication([m["id"] for m in g["members"]] for g, _ in groups),
                "raw_bytes": raw_bytes(stored, files.values()),
            },
        )


def _read_triplets(
    path: Path, test: bool, writer: DatasetWriter, src: Path
) -> list[tuple[str, str | None, list[str], str]]:
    out = []
    for k, entry in enumerate(read_json_list(path)):
        where = f"{path.relative_to(src)}[{k}]"
        try:
            candidate, target, texts = parse_triplet(entry, test)
        except ValueError as err:
            writer.skip(where, f"bad caption entry: {err}")
            continue
        out.append((candidate, target, texts, where))
    return out


def _gallery(
    split: str,
    categories: list[str],
    split_lists: dict,
    checker: NamedImages,
    writer: DatasetWriter,
) -> dict[str, str]:
    """``asin -> category`` of the usable images of a split (first category wins)."""
    gallery: dict[str, str] = {}
    for category in categories:
        for name in split_lists[("split", category, split)]:
            if name in gallery:
                if gallery[name] != category:
                    writer.skip(
                        f"image_splits/split.{category}.{split}.json: {name}",
                        f"duplicate entry: already in category {gallery[name]}",
                    )
                continue
            if checker.problem(name) is None:
                gallery[name] = category
    return gallery


def build_parser() -> argparse.ArgumentParser:
    parser = cli.converter_parser("python -m shards.fashioniq", __doc__.split("\n\n")[0])
    parser.add_argument(
        "--categories",
        nargs="+",
        choices=CATEGORIES,
        default=list(CATEGORIES),
        help="categories to convert",
    )
    return parser


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return cli.run_converter(build_parser(), convert, argv)


if __name__ == "__main__":
    main()

"""Convert CIRR (Liu et al., ICCV 2021) to shards.

Raw layout (the ``cirr_dataset`` release plus the NLVR2 images)::

    SRC/captions/cap.rc2.<split>.json         [{"pairid", "reference", "target_hard",
                                                "target_soft", "caption",
                                                "img_set": {"id", "members": [6 names]}}]
    SRC/image_splits/split.rc2.<split>.json   {image name: "./train/34/<name>.png", ...}
    SRC/img_raw/train/<n>/*.png, dev/*.png, test1/*.png   (or SRC/train, SRC/dev, SRC/test1)

for splits train, val and (optionally) test1, whose captions have no targets.
``--image-root`` overrides where the split files' relative paths start.

Training: the (reference, target_hard, caption) pairs, packed into groups
(``shards.grouping.group_pairs``): CIRR builds several pairs from each set of six similar
images, so an image shared by pairs is stored once per group, not once per pair.

Evaluation "val": gallery = every val image; queries with ``target_ids = [target_hard]``,
``members`` (the image set, for Recall_subset) and ``pairid``. Evaluation "test": test1
gallery and queries without targets (for the test server's submission files).

Usage::

    python -m shards.cirr --src RAW_CIRR --out data/cirr
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

VERSION = "rc2"
EVAL_SPLITS = {"val": "val", "test": "test1"}  # eval name -> CIRR split
PROTOCOL = {
    "name": "cirr",
    "ks": [1, 5, 10, 50],
    "subset_ks": [1, 2, 3],
    "hit": "id",
    "exclude_reference": True,
    "per_category": False,
}


def read_json(path: Path, kind: type) -> Any:
    """A JSON file holding a ``kind`` (list or dict); anything else is a layout error."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise cli.LayoutError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(data, kind):
        raise cli.LayoutError(f"{path}: expected a JSON {kind.__name__}, got {type(data).__name__}")
    return data


def parse_pair(entry: Any, test: bool) -> dict[str, Any]:
    """``{"pairid", "reference", "target", "caption", "members"}``; ValueError if malformed."""
    if not isinstance(entry, dict):
        raise ValueError(f"expected an object, got {type(entry).__name__}")
    pairid, reference, caption = entry.get("pairid"), entry.get("reference"), entry.get("caption")
    target = entry.get("target_hard")
    members = (
        (entry.get("img_set") or {}).get("members")
        if isinstance(entry.get("img_set"), dict)
        else None
    )
    if not isinstance(pairid, int) or not isinstance(reference, str):
        raise ValueError("expected an integer 'pairid' and a 'reference' image name")
    if not isinstance(caption, str) or not caption.strip():
        raise ValueError("expected a non-empty 'caption'")
    if not test and not isinstance(target, str):
        raise ValueError("expected a 'target_hard' image name")
    if not isinstance(members, list) or not all(isinstance(m, str) for m in members):
        raise ValueError("expected 'img_set' with a list of 'members'")
    return {
        "pairid": pairid,
        "reference": reference,
        "target": None if test else target,
        "caption": " ".join(caption.split()),
        "members": members,
    }


def convert(args: argparse.Namespace) -> dict[str, Any]:
    src: Path = args.src
    splits = ["train", "val"]
    if (src / "captions" / f"cap.{VERSION}.test1.json").is_file():
        splits.append("test1")
    caption_files = {
        s: cli.require_file(src / "captions" / f"cap.{VERSION}.{s}.json", "CIRR caption file")
        for s in splits
    }
    split_files = {
        s: cli.require_file(
            src / "image_splits" / f"split.{VERSION}.{s}.json", "CIRR image split file"
        )
        for s in splits
    }
    image_root = args.image_root or (src / "img_raw" if (src / "img_raw").is_dir() else src)
    cli.require_dir(image_root, "the NLVR2 image folders (train/, dev/, test1/)")

    with DatasetWriter(
        args.out, "cirr", "shards.cirr", shard_size=args.shard_size, overwrite=args.overwrite
    ) as writer:
        paths: dict[str, Path] = {}
        split_names: dict[str, list[str]] = {}
        for split, path in split_files.items():
            mapping = read_json(path, dict)
            split_names[split] = [str(n) for n in mapping]
            paths.update({str(n): image_root / str(rel) for n, rel in mapping.items()})
        table = ImageTable(writer, src, args.workers)
        images = NamedImages(paths, table, missing_reason="unknown image: not in any image split")
        pairs = {
            split: _read_pairs(path, split == "test1", writer, src)
            for split, path in caption_files.items()
        }
        needed = {p[k] for p in pairs["train"] for k in ("reference", "target")}
        needed |= {n for split in splits if split != "train" for n in split_names[split]}
        images.check(needed)

        train_pairs = [
            (p["reference"], p["target"], [p["caption"]])
            for p in pairs["train"]
            if images.usable(p["where"], "pair", p["reference"], p["target"])
        ]
        groups = [
            (
                {
                    "members": [{"id": m} for m in g.members],
                    "pairs": [{"ref": r, "tgt": t, "texts": x} for r, t, x in g.pairs],
                    "derive": None,
                },
                [images.image(m) for m in g.members],
            )
            for g in group_pairs(train_pairs, args.group_size)
        ]
        writer.shard_sizes["train"] = group_shard_size(args.shard_size, groups)
        stored = write_groups(writer, "train", groups, workers=args.workers)

        evals = {}
        for name, split in EVAL_SPLITS.items():
            if split not in splits:
                continue
            gallery = [n for n in split_names[split] if images.problem(n) is None]
            stored += write_gallery(
                writer,
                f"{name}-gallery",
                [({"id": n}, images.image(n)) for n in gallery],
                workers=args.workers,
                desc=f"writing {name} gallery",
            )
            queries = _queries(name, pairs[split], set(gallery), images, writer)
            writer.set_queries(f"{name}-queries.json", queries)
            evals[name] = {
                "gallery": f"{name}-gallery",
                "queries": f"{name}-queries.json",
                "count": len(queries),
                "protocol": PROTOCOL,
            }

        writer.image_ext = stored_ext(stored)
        annotations = [*caption_files.values(), *split_files.values()]
        return writer.finish(
            evals,
            source=cli.source_info(src, annotations),
            extra={
                "version": VERSION,
                "image_root": str(image_root),
                "group_size": args.group_size,
                "groups": duplication([m["id"] for m in g["members"]] for g, _ in groups),
                "raw_bytes": raw_bytes(stored, annotations),
            },
        )


def _read_pairs(path: Path, test: bool, writer: DatasetWriter, src: Path) -> list[dict[str, Any]]:
    out = []
    for k, entry in enumerate(read_json(path, list)):
        where = f"{path.relative_to(src)}[{k}]"
        try:
            out.append({**parse_pair(entry, test), "where": where})
        except ValueError as err:
            writer.skip(where, f"bad caption entry: {err}")
    return out


def _queries(
    name: str,
    pairs: list[dict[str, Any]],
    gallery: set[str],
    images: NamedImages,
    writer: DatasetWriter,
) -> list[dict[str, Any]]:
    """Queries whose reference (and target) are in the gallery; set members outside the
    gallery are dropped from ``members`` (and listed as skipped)."""
    queries = []
    for p in pairs:
        if not images.in_gallery(p["where"], "query", gallery, p["reference"], p["target"]):
            continue
        members = []
        for member in p["members"]:
            if member in gallery:
                members.append(member)
            else:
                writer.skip(
                    f"{p['where']} member {member}",
                    "set member not in the gallery: left out of members",
                )
        queries.append(
            {
                "qid": f"{name}-{p['pairid']}",
                "ref_id": p["reference"],
                "text": p["caption"],
                "target_ids": [p["target"]] if p["target"] else [],
                "members": members,
                "pairid": p["pairid"],
            }
        )
    return queries


def build_parser() -> argparse.ArgumentParser:
    parser = cli.converter_parser("python -m shards.cirr", __doc__.split("\n\n")[0])
    parser.add_argument(
        "--image-root",
        type=Path,
        default=None,
        help="folder the split files' paths are relative to "
        "(default: SRC/img_raw if it exists, else SRC)",
    )
    return parser


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return cli.run_converter(build_parser(), convert, argv)


if __name__ == "__main__":
    main()

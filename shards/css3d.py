"""Convert TIRG's CSS dataset (the original release) to shards.

Raw layout (as TIRG's authors distribute it)::

    SRC/css_toy_dataset_novel2_small.dup.npy   pickled dict: {"train": ..., "test": ...}
    SRC/images/css_train_000000.png ...        rendered 3D scenes, one per objects_img entry
    SRC/images/css_test_000000.png ...

Each split of the ``.npy`` dict holds ``objects_img`` (per image a list of objects
``{"shape", "color", "size", "pos", ...}``), ``mods`` (``{"from": [image idx ...],
"to": [image idx ...], "to_str": text}``) and optionally ``labels`` (one per image).
It is read as TIRG's ``datasets.CSSDataset`` reads it: every ``(from[k], to[k])`` of a mod
is a (reference, target) pair with text ``to_str``; train pairs become groups
(``shards.grouping.group_pairs``), test pairs become the queries. Labels come from
``labels`` when present, else images with identical object sets share a label (named
after the first such image). ``--render-2d`` stores TIRG's 2D version instead of the
PNGs: each scene drawn from its objects by ``shards.render.render_scene``.

Usage::

    python -m shards.css3d --src RAW_CSS --out data/css3d [--render-2d --image-size 64]
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from shards import cli
from shards.conversion import (
    ImageSource,
    ImageTable,
    group_shard_size,
    raw_bytes,
    stored_ext,
    write_gallery,
    write_groups,
)
from shards.grouping import duplication, group_pairs
from shards.imageio import EncodedImage
from shards.render import encode_png, render_scene
from shards.writer import DatasetWriter

log = logging.getLogger(__name__)

DATA_FILE = "css_toy_dataset_novel2_small.dup.npy"
SPLITS = ("train", "test")
PROTOCOL = {
    "name": "css",
    "ks": [1, 5, 10, 50],
    "hit": "label",
    "exclude_reference": True,
    "per_category": False,
}


def load_css_data(path: Path) -> dict[str, Any]:
    """The pickled CSS dict, checked to have ``objects_img`` and ``mods`` per split."""
    try:
        # TIRG's file is a Python 2 pickle; latin1 keeps its byte strings readable.
        data = np.load(path, allow_pickle=True, encoding="latin1").item()
    except Exception as err:  # noqa: BLE001 - any failure means "not the CSS file"
        raise cli.LayoutError(f"{path}: cannot read the pickled CSS dict ({err})") from None
    if not isinstance(data, dict):
        raise cli.LayoutError(f"{path}: expected a pickled dict, got {type(data).__name__}")
    for split in SPLITS:
        part = data.get(split)
        if not isinstance(part, dict) or "objects_img" not in part or "mods" not in part:
            raise cli.LayoutError(
                f"{path}: expected data[{split!r}] with keys 'objects_img' and 'mods' "
                f"(TIRG's CSS release), found {sorted(part) if isinstance(part, dict) else part!r}"
            )
    return data


def normalize_object(obj: Any) -> dict[str, Any]:
    """A JSON-friendly copy of one scene object (numpy scalars/arrays become Python)."""
    if not isinstance(obj, dict):
        raise ValueError(f"object {obj!r} is not a dict")
    return {str(k): _plain(v) for k, v in obj.items()}


def scene_key(objects: list[dict[str, Any]]) -> str:
    """Order-free identity of an object set (images with equal keys share a label)."""
    return json.dumps(sorted(json.dumps(o, sort_keys=True) for o in objects))


def grid_positions(scenes: list[list[dict[str, Any]]]) -> bool:
    """True when ``pos`` values are grid cells (all integral), False when fractions of
    the image (TIRG's ``generate_2d_image`` multiplies them by the image size)."""
    values = [
        v for objects in scenes for o in objects if isinstance(o.get("pos"), list) for v in o["pos"]
    ]
    return all(isinstance(v, int | float) and float(v).is_integer() for v in values)


def render_objects(objects: list[dict[str, Any]], image_size: int, cells: bool) -> bytes:
    """PNG of a scene drawn by ``render_scene`` (fractions mapped to grid cells 0..2)."""
    drawn = []
    for o in objects:
        row, col = (float(v) for v in o["pos"])
        if not cells:
            row, col = (min(2.0, max(0.0, 3.0 * v - 0.5)) for v in (row, col))
        drawn.append({**o, "pos": (row, col)})
    return encode_png(render_scene(drawn, image_size))


def convert(args: argparse.Namespace) -> dict[str, Any]:
    src: Path = args.src
    data_file = cli.require_file(src / DATA_FILE, f"{DATA_FILE} (TIRG's CSS release) in {src}")
    if not args.render_2d:
        cli.require_dir(src / "images", "the folder images/ with css_<split>_<06d>.png")
    data = load_css_data(data_file)
    with DatasetWriter(
        args.out, "css3d", "shards.css3d", shard_size=args.shard_size, overwrite=args.overwrite
    ) as writer:
        table = ImageTable(writer, src, args.workers)
        scenes = {split: _scenes(data[split], split, writer) for split in SPLITS}
        cells = grid_positions([s for split in SPLITS for s in scenes[split].values()])
        images, labels = {}, {}
        for split in SPLITS:
            images[split] = _images(scenes[split], split, src, table, writer, args, cells)
            labels[split] = _labels(data[split], split, scenes[split])

        pairs = _pairs(data["train"]["mods"], "train", images["train"], writer)
        groups = []
        for group in group_pairs(pairs, args.group_size):
            members = [
                {
                    "id": _image_id("train", i),
                    "label": labels["train"][i],
                    "attributes": scenes["train"][i],
                }
                for i in group.members
            ]
            group_json = {
                "members": members,
                "derive": None,
                "pairs": [{"ref": r, "tgt": t, "texts": texts} for r, t, texts in group.pairs],
            }
            groups.append((group_json, [images["train"][i] for i in group.members]))
        writer.shard_sizes["train"] = group_shard_size(args.shard_size, groups)
        stored = write_groups(writer, "train", groups, workers=args.workers)

        test_ids = sorted(images["test"])
        stored += write_gallery(
            writer,
            "gallery",
            [
                (
                    {
                        "id": _image_id("test", i),
                        "label": labels["test"][i],
                        "attributes": scenes["test"][i],
                    },
                    images["test"][i],
                )
                for i in test_ids
            ],
            workers=args.workers,
        )
        queries = [
            {
                "qid": f"test-{n:06d}",
                "ref_id": _image_id("test", ref),
                "text": texts[0],
                "target_ids": [_image_id("test", tgt)],
            }
            for n, (ref, tgt, texts) in enumerate(
                _pairs(data["test"]["mods"], "test", images["test"], writer)
            )
        ]
        writer.set_queries("queries.json", queries)

        writer.image_ext = stored_ext(stored)
        return writer.finish(
            {
                "test": {
                    "gallery": "gallery",
                    "queries": "queries.json",
                    "count": len(queries),
                    "protocol": PROTOCOL,
                }
            },
            source=cli.source_info(src, [data_file]),
            extra={
                "render_2d": args.render_2d,
                "image_size": args.image_size if args.render_2d else None,
                "labels": {s: "dataset" if "labels" in data[s] else "object sets" for s in SPLITS},
                "pos": "grid cells" if cells else "image fractions",
                "group_size": args.group_size,
                "groups": duplication([m["id"] for m in g["members"]] for g, _ in groups),
                "raw_bytes": None if args.render_2d else raw_bytes(stored, [data_file]),
            },
        )


def _scenes(
    part: dict[str, Any], split: str, writer: DatasetWriter
) -> dict[int, list[dict[str, Any]]]:
    """Normalised objects of every image of a split, by index (bad entries skipped)."""
    scenes: dict[int, list[dict[str, Any]]] = {}
    for i, objects in enumerate(part["objects_img"]):
        try:
            scenes[i] = [normalize_object(o) for o in objects]
        except (TypeError, ValueError) as err:
            writer.skip(_image_id(split, i), f"bad objects entry: {err}")
    return scenes


def _images(
    scenes: dict[int, list[dict[str, Any]]],
    split: str,
    src: Path,
    table: ImageTable,
    writer: DatasetWriter,
    args: argparse.Namespace,
    cells: bool,
) -> dict[int, ImageSource]:
    """Usable images of a split by index: checked PNG files, or scenes drawn in 2D."""
    images: dict[int, ImageSource] = {}
    if args.render_2d:
        bar = tqdm(scenes.items(), desc=f"rendering {split}", leave=False, disable=None)
        for i, objects in bar:
            try:
                images[i] = EncodedImage(render_objects(objects, args.image_size, cells), "png")
            except (KeyError, TypeError, ValueError) as err:
                writer.skip(_image_id(split, i), f"cannot render objects: {err}")
        return images
    paths = {i: src / "images" / f"{_image_id(split, i)}.png" for i in scenes}
    table.check(paths.values(), desc=f"checking {split} images")
    for i, path in paths.items():
        if (checked := table.get(path)) is not None:
            images[i] = checked
    return images


def _labels(
    part: dict[str, Any], split: str, scenes: dict[int, list[dict[str, Any]]]
) -> dict[int, str]:
    given = part.get("labels")
    if given is not None and len(given) == len(part["objects_img"]):
        return {i: str(_plain(given[i])) for i in scenes}
    if given is not None:
        log.warning(
            "%s labels: %d for %d images; deriving labels from object sets instead",
            split,
            len(given),
            len(part["objects_img"]),
        )
    first: dict[str, str] = {}
    return {
        i: first.setdefault(scene_key(objects), _image_id(split, i))
        for i, objects in scenes.items()
    }


def _pairs(
    mods: list[Any], split: str, images: dict[int, ImageSource], writer: DatasetWriter
) -> list[tuple[int, int, list[str]]]:
    """``(from, to, [to_str])`` of every mod whose two images are usable (others skipped)."""
    pairs = []
    for m, mod in enumerate(mods):
        where = f"{split} mod {m}"
        try:
            sources, targets, text = list(mod["from"]), list(mod["to"]), str(mod["to_str"])
        except (KeyError, TypeError) as err:
            writer.skip(where, f"bad mod entry: expected from, to, to_str ({err!r})")
            continue
        if len(sources) != len(targets):
            writer.skip(where, f"bad mod entry: {len(sources)} 'from' for {len(targets)} 'to'")
            continue
        for k, (ref, tgt) in enumerate(zip(sources, targets)):
            if not all(isinstance(i, int | np.integer) for i in (ref, tgt)):
                writer.skip(f"{where} pair {k}", f"bad mod entry: image indices {ref!r}, {tgt!r}")
                continue
            missing = [int(i) for i in (ref, tgt) if int(i) not in images]
            if missing:
                writer.skip(
                    f"{where} pair {k}", f"pair with unusable image: {_image_id(split, missing[0])}"
                )
                continue
            pairs.append((int(ref), int(tgt), [text]))
    return pairs


def _image_id(split: str, index: int) -> str:
    return f"css_{split}_{int(index):06d}"


def _plain(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, bytes):
        return value.decode("latin1")
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(_plain(k)): _plain(v) for k, v in value.items()}
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = cli.converter_parser("python -m shards.css3d", __doc__.split("\n\n")[0])
    parser.add_argument(
        "--render-2d",
        action="store_true",
        help="store 2D scenes drawn from the objects instead of the PNGs",
    )
    parser.add_argument(
        "--image-size",
        type=cli.positive_int,
        default=64,
        help="side of the --render-2d images in pixels",
    )
    return parser


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return cli.run_converter(build_parser(), convert, argv)


if __name__ == "__main__":
    main()

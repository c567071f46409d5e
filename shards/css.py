"""Generate a CSS-style composed retrieval dataset as WebDataset shards.

CSS (TIRG, Vo et al., CVPR 2019, Sec. 4.1) is synthetic: scenes of up to nine objects on a
3x3 grid, each object a shape (rectangle, circle, triangle), one of eight colours and a size
(small, large), and modification texts that add, remove or change objects. The test split
holds attribute combinations that never appear in training. This module is our own
generator of that task (the layout and semantics are documented in docs/shards-css.md):

* A split has ``scenes`` *source* scenes (2-5 objects). Each source gets up to
  ``mods_per_scene`` modifications drawn from the split's modification pool (about
  ``mod_pool`` mods, each shared by several sources), with distinct target scenes.
* A modification is ``add`` (a fully described object into an empty cell), ``remove`` or
  ``change`` (one to three of colour, size, shape). Remove and change name their object
  by a description (any non-empty subset of size, colour, shape and cell); a modification
  applies to a source only if the description matches **exactly one** of its objects.
* Held out: objects whose (shape, colour) is in ``HELD_OUT_SHAPE_COLOR`` or whose
  (colour, size) is in ``HELD_OUT_COLOR_SIZE`` never occur in a train image or a train
  text; every test source scene contains at least one of them.
* Train: one group per source scene (member 0 = source, members 1.. = its targets, pairs
  0 -> i with several paraphrases). Test: every scene is a gallery image; one query per
  (source, modification). A scene's label is its object set (cells, not jitter), so any
  gallery image with the target's objects is a hit.

Usage::

    python -m shards.css --out data/css --seed 0
    python -m shards.css --out data/css-small --small
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import multiprocessing
import os
import random
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tqdm import tqdm

from shards.css_scenes import (  # noqa: F401  (SMALL, PRESETS, CssConfig: the public API)
    HELD_OUT_COLOR_SIZE,
    HELD_OUT_SHAPE_COLOR,
    MEDIUM,
    OBJECTS_PER_SCENE,
    PRESETS,
    PROTOCOL,
    SMALL,
    TAR_MTIME,
    CssConfig,
    Scene,
    SourcePlan,
    mod_dict,
    mod_texts,
    object_dict,
    plan_split,
    scene_label,
)
from shards.render import IMAGE_FORMATS, encode_image, render_scene
from shards.writer import DatasetWriter

log = logging.getLogger(__name__)


# -- writing ------------------------------------------------------------------------------
def render_task(task: tuple[Scene, int, str, str, int]) -> bytes:
    """Encoded bytes of one scene (PNG or JPEG); jitter is seeded by the image's own key,
    not by the worker."""
    scene, image_size, jitter_key, image_format, quality = task
    objects = [object_dict(o) for o in scene]
    image = render_scene(objects, image_size, random.Random(jitter_key))
    return encode_image(image, image_format, quality)


def generate_css(
    out_dir: str | Path,
    config: CssConfig,
    *,
    workers: int | None = None,
    overwrite: bool = False,
    progress: bool = False,
    preset: str = "default",
) -> dict[str, Any]:
    """Write the dataset to ``out_dir`` atomically and return its manifest.

    The bytes of every shard and of ``queries.json`` depend on ``config`` only, not on
    ``workers`` (images are rendered in order, each with its own jitter seed).
    """
    if min(config.mods_per_scene, config.train_scenes, config.test_scenes, config.mod_pool) < 1:
        raise ValueError(f"scene, modification and pool counts must be >= 1, got {config}")
    if config.image_size < 8:
        raise ValueError(f"image_size must be >= 8 pixels, got {config.image_size}")
    if config.image_format not in IMAGE_FORMATS:
        raise ValueError(
            f"image_format must be one of {IMAGE_FORMATS}, got {config.image_format!r}"
        )
    if not 1 <= config.jpeg_quality <= 100:
        raise ValueError(f"jpeg_quality must be in [1, 100], got {config.jpeg_quality}")
    if Path(out_dir).exists() and not overwrite:
        raise FileExistsError(f"{out_dir} already exists; pass --overwrite to replace it")
    start = time.perf_counter()
    plans = {split: plan_split(split, config) for split in ("train", "test")}
    tasks = [
        (
            scene,
            config.image_size,
            f"css-{config.seed}-{split}-{i}",
            config.image_format,
            config.jpeg_quality,
        )
        for split in ("train", "test")
        for i, scene in enumerate(s for p in plans[split] for s in (p.scene, *p.targets))
    ]
    groups_per_shard = max(1, config.shard_size // (config.mods_per_scene + 1))
    with DatasetWriter(
        out_dir,
        "css",
        "shards.css",
        shard_size=config.shard_size,
        shard_sizes={"train": groups_per_shard},
        overwrite=overwrite,
        mtime=TAR_MTIME,
    ) as writer:
        images = _rendered(tasks, workers, progress)
        try:
            text_rng = random.Random(f"css-{config.seed}-texts")
            _write_train(writer, plans["train"], images, text_rng, config)
            queries = _write_test(writer, plans["test"], images, text_rng, config.image_format)
        finally:
            images.close()  # stops the render processes when writing fails
        writer.set_queries("queries.json", queries)
        evals = {
            "test": {
                "gallery": "gallery",
                "queries": "queries.json",
                "count": len(queries),
                "protocol": PROTOCOL,
            }
        }
        manifest = writer.finish(evals, extra=_extra(config, plans, preset))
    log.debug("wrote %s in %.1fs", out_dir, time.perf_counter() - start)
    return manifest


def _rendered(tasks: list, workers: int | None, progress: bool) -> Iterator[bytes]:
    workers = workers or os.cpu_count() or 1
    bar = tqdm(total=len(tasks), unit="img", desc="css images", disable=not progress)
    try:
        if workers == 1:
            for task in tasks:
                yield render_task(task)
                bar.update()
            return
        with multiprocessing.get_context().Pool(workers) as pool:
            for data in pool.imap(render_task, tasks, chunksize=64):
                yield data
                bar.update()
    finally:
        bar.close()


def _write_train(
    writer: DatasetWriter,
    plans: list[SourcePlan],
    images: Iterator[bytes],
    rng: random.Random,
    config: CssConfig,
) -> None:
    index = 0
    for g, plan in enumerate(plans):
        members, blobs = [], []
        for scene in (plan.scene, *plan.targets):
            members.append(
                {
                    "id": f"css_train_{index:06d}",
                    "label": scene_label(scene),
                    "objects": [object_dict(o) for o in scene],
                }
            )
            blobs.append((next(images), config.image_format))
            index += 1
        pairs = []
        for i, mod in enumerate(plan.mods, start=1):
            texts = mod_texts(mod)
            pairs.append(
                {
                    "ref": 0,
                    "tgt": i,
                    "mod": mod_dict(mod),
                    "texts": rng.sample(texts, min(config.texts_per_pair, len(texts))),
                }
            )
        group = {"group": f"g{g:06d}", "members": members, "pairs": pairs, "derive": None}
        writer.add_group("train", f"t{g:08d}", group, blobs)


def _write_test(
    writer: DatasetWriter,
    plans: list[SourcePlan],
    images: Iterator[bytes],
    rng: random.Random,
    image_format: str,
) -> list[dict[str, Any]]:
    queries: list[dict[str, Any]] = []
    index = 0
    for plan in plans:
        ids = []
        for scene in (plan.scene, *plan.targets):
            ids.append(f"css_test_{index:06d}")
            meta = {
                "id": ids[-1],
                "label": scene_label(scene),
                "objects": [object_dict(o) for o in scene],
            }
            writer.add_gallery("gallery", f"g{index:08d}", meta, next(images), image_format)
            index += 1
        for i, mod in enumerate(plan.mods, start=1):
            queries.append(
                {
                    "qid": len(queries),
                    "ref_id": ids[0],
                    "text": rng.choice(mod_texts(mod)),
                    "target_ids": [ids[i]],
                    "mod": mod_dict(mod),
                }
            )
    return queries


def _extra(config: CssConfig, plans: dict[str, list[SourcePlan]], preset: str) -> dict:
    stats = {}
    for split, split_plans in plans.items():
        uses = Counter(m for p in split_plans for m in p.mods)
        stats[split] = {
            "source_scenes": len(split_plans),
            "images": sum(1 + len(p.targets) for p in split_plans),
            "pairs": sum(uses.values()),
            "distinct_mods": len(uses),
            "mods_by_type": dict(Counter(m[0] for m in uses.elements())),
            "mean_sources_per_mod": round(sum(uses.values()) / max(1, len(uses)), 2),
        }
    return {
        "generator": {
            **dataclasses.asdict(config),
            "preset": preset,
            "objects_per_scene": list(OBJECTS_PER_SCENE),
        },
        "held_out": {
            "shape_color": [list(p) for p in HELD_OUT_SHAPE_COLOR],
            "color_size": [list(p) for p in HELD_OUT_COLOR_SIZE],
            "rule": "objects with these combinations never appear in train images or "
            "texts; every test source scene contains at least one",
        },
        "mod_semantics": "remove/change descriptions match exactly one object of the source",
        "stats": stats,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m shards.css", description=__doc__.split("\n")[0]
    )
    defaults = CssConfig()
    parser.add_argument("--out", required=True, help="output dataset directory")
    parser.add_argument("--seed", type=int, default=defaults.seed)

    def preset_help(field: str, what: str) -> str:
        values = ", ".join(
            f"{n} {p.get(field, getattr(defaults, field))}" for n, p in PRESETS.items()
        )
        return f"{what} (presets: {values})"

    parser.add_argument(
        "--preset",
        choices=tuple(PRESETS),
        default="default",
        help="dataset size: default (paper-sized test split), medium (CPU-sized "
        "reproductions), small (tests and the demo); the flags below override it",
    )
    parser.add_argument(
        "--small", action="store_true", help="the same as --preset small (tests and the demo)"
    )
    parser.add_argument(
        "--train-scenes", type=int, help=preset_help("train_scenes", "source scenes in train")
    )
    parser.add_argument(
        "--test-scenes", type=int, help=preset_help("test_scenes", "source scenes in test")
    )
    parser.add_argument(
        "--mods-per-scene",
        type=int,
        help=preset_help("mods_per_scene", "modifications per source scene"),
    )
    parser.add_argument(
        "--mod-pool", type=int, help=preset_help("mod_pool", "distinct modifications per split")
    )
    parser.add_argument("--image-size", type=int, default=defaults.image_size)
    parser.add_argument(
        "--image-format",
        choices=IMAGE_FORMATS,
        default=defaults.image_format,
        help="png (lossless, as the CSS release; decoded on the CPU) or jpg (as photo "
        "catalogues; decoded by nvJPEG on a GPU)",
    )
    parser.add_argument(
        "--jpeg-quality",
        type=int,
        default=defaults.jpeg_quality,
        help="JPEG quality 1-100 with --image-format jpg",
    )
    parser.add_argument(
        "--shard-size", type=int, help=preset_help("shard_size", "images per shard")
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    parser.add_argument(
        "--render-processes",
        dest="workers",
        type=int,
        default=None,
        help="render processes (default: all cores)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.small and args.preset not in ("default", "small"):
        parser.error(f"--small contradicts --preset {args.preset}")
    preset = "small" if args.small else args.preset
    settings = dict(PRESETS[preset])
    for field in ("train_scenes", "test_scenes", "mods_per_scene", "mod_pool", "shard_size"):
        if getattr(args, field) is not None:
            settings[field] = getattr(args, field)
    config = dataclasses.replace(
        defaults,
        seed=args.seed,
        image_size=args.image_size,
        image_format=args.image_format,
        jpeg_quality=args.jpeg_quality,
        **settings,
    )
    start = time.perf_counter()
    try:
        manifest = generate_css(
            args.out,
            config,
            workers=args.workers,
            overwrite=args.overwrite,
            progress=True,
            preset=preset,
        )
    except (FileExistsError, ValueError) as err:  # an existing --out, settings out of range
        print(f"error: {err}", file=sys.stderr)
        return 2
    seconds = time.perf_counter() - start
    splits = manifest["splits"]
    print(
        f"{args.out}: train {splits['train']['samples']} groups / {splits['train']['images']} "
        f"images, gallery {splits['gallery']['images']} images, "
        f"{manifest['evals']['test']['count']} queries, {manifest['bytes'] / 1e6:.1f} MB "
        f"in {seconds:.1f}s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

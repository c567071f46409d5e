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
import itertools
import logging
import multiprocessing
import os
import random
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from shards.render import COLORS, GRID, SHAPES, SIZES, encode_png, render_scene
from shards.writer import DatasetWriter

log = logging.getLogger(__name__)

HELD_OUT_SHAPE_COLOR = (("rectangle", "purple"), ("circle", "cyan"), ("triangle", "yellow"))
HELD_OUT_COLOR_SIZE = (("gray", "large"), ("brown", "small"))
OBJECTS_PER_SCENE = (2, 5)
MOD_TYPE_SHARE = {"add": 0.25, "remove": 0.25, "change": 0.5}
ROW_NAMES = ("top", "middle", "bottom")
COL_NAMES = ("left", "center", "right")
DESCRIBABLE = ("color", "pos", "shape", "size")  # sorted: match tuples are canonical
CHANGEABLE = ("color", "shape", "size")
VALUES = {
    "color": COLORS,
    "shape": SHAPES,
    "size": SIZES,
    "pos": tuple(itertools.product(range(GRID), range(GRID))),
}
PROTOCOL = {"name": "css", "ks": [1, 5, 10, 50], "hit": "label", "exclude_reference": True}
TAR_MTIME = 0  # fixed tar timestamps: the same seed gives byte-identical shards

# (shape, color, size, row, col); a scene is a sorted tuple of objects in distinct cells.
Obj = tuple[str, str, str, int, int]
Scene = tuple[Obj, ...]
# (kind, match, setting): match/setting are sorted ((attribute, value), ...) tuples;
# an "add" carries the whole new object as its match.
Mod = tuple[str, tuple, tuple]


@dataclass(frozen=True)
class CssConfig:
    """Generator settings (all of them are recorded in the manifest's ``extra``)."""

    seed: int = 0
    train_scenes: int = 1000  # source scenes; a split holds up to scenes*(1+mods) images
    test_scenes: int = 1000
    mods_per_scene: int = 18
    mod_pool: int = 6000  # distinct modifications per split, shared by the sources
    image_size: int = 64
    shard_size: int = 1000  # images per shard (train: whole groups per shard)
    texts_per_pair: int = 3  # paraphrases stored per train pair


SMALL = {
    "train_scenes": 150,
    "test_scenes": 60,
    "mods_per_scene": 9,
    "mod_pool": 450,
    "shard_size": 200,
}


@dataclass
class SourcePlan:
    """One source scene and its modifications: ``mods[i]`` turns ``scene`` into ``targets[i]``."""

    scene: Scene
    mods: list[Mod]
    targets: list[Scene]


# -- scenes and modifications ---------------------------------------------------------------
def is_held_out(attrs: dict[str, Any]) -> bool:
    """Whether ``attrs`` (an object or a partial description) names a held-out combination."""
    shape, color, size = attrs.get("shape"), attrs.get("color"), attrs.get("size")
    return (shape, color) in HELD_OUT_SHAPE_COLOR or (color, size) in HELD_OUT_COLOR_SIZE


def object_dict(obj: Obj) -> dict[str, Any]:
    return {"shape": obj[0], "color": obj[1], "size": obj[2], "pos": [obj[3], obj[4]]}


def scene_label(scene: Scene) -> str:
    """Identity of a scene's object set; images with equal labels are equivalent targets."""
    return " ".join(f"{size}-{color}-{shape}@{row}{col}" for shape, color, size, row, col in scene)


def mod_dict(mod: Mod) -> dict[str, Any]:
    kind, match, setting = mod
    if kind == "add":
        return {"type": "add", "object": _attrs_json(match)}
    out = {"type": kind, "match": _attrs_json(match)}
    if kind == "change":
        out["set"] = _attrs_json(setting)
    return out


def apply_mod(mod: Mod, scene: Scene) -> Scene | None:
    """The scene ``mod`` turns ``scene`` into, or None where it does not apply.

    Add needs an empty cell; remove and change need a description matching exactly one
    object; change must alter every attribute it sets; a scene never becomes empty.
    """
    kind, match, setting = mod
    if kind == "add":
        new = dict(match)
        row, col = new["pos"]
        if any((o[3], o[4]) == (row, col) for o in scene):
            return None
        return tuple(sorted((*scene, (new["shape"], new["color"], new["size"], row, col))))
    hits = [o for o in scene if _matches(o, match)]
    if len(hits) != 1:
        return None
    hit = hits[0]
    rest = tuple(o for o in scene if o != hit)
    if kind == "remove":
        return rest or None
    new = {"shape": hit[0], "color": hit[1], "size": hit[2]}
    for attr, value in setting:
        if new[attr] == value:
            return None
        new[attr] = value
    return tuple(sorted((*rest, (new["shape"], new["color"], new["size"], hit[3], hit[4]))))


def unique_descriptions(scene: Scene) -> list[tuple]:
    """Every description (attribute subset of one object) that matches exactly one object."""
    out = []
    for obj in scene:
        for k in range(1, len(DESCRIBABLE) + 1):
            for attrs in itertools.combinations(DESCRIBABLE, k):
                match = tuple((a, _attr(obj, a)) for a in attrs)
                if sum(_matches(o, match) for o in scene) == 1:
                    out.append(match)
    return out


def _attr(obj: Obj, attr: str) -> Any:
    if attr == "pos":
        return (obj[3], obj[4])
    return obj[("shape", "color", "size").index(attr)]


def _matches(obj: Obj, match: tuple) -> bool:
    return all(_attr(obj, a) == v for a, v in match)


def _attrs_json(items: tuple) -> dict[str, Any]:
    return {a: list(v) if a == "pos" else v for a, v in items}


def object_types(split: str) -> list[tuple[str, str, str]]:
    """(shape, color, size) types allowed in a split's scenes (train: no held-out ones)."""
    types = list(itertools.product(SHAPES, COLORS, SIZES))
    if split == "train":
        types = [t for t in types if not is_held_out(dict(zip(("shape", "color", "size"), t)))]
    return types


def sample_scene(rng: random.Random, split: str) -> Scene:
    """A source scene; test scenes always contain at least one held-out object."""
    count = rng.randint(*OBJECTS_PER_SCENE)
    cells = rng.sample(VALUES["pos"], count)
    types = [rng.choice(object_types(split)) for _ in cells]
    if split == "test" and not any(_type_held_out(t) for t in types):
        novel = [t for t in object_types("test") if _type_held_out(t)]
        types[rng.randrange(count)] = rng.choice(novel)
    return tuple(sorted((*t, r, c) for t, (r, c) in zip(types, cells)))


def _type_held_out(t: tuple[str, str, str]) -> bool:
    return is_held_out({"shape": t[0], "color": t[1], "size": t[2]})


def build_mod_pool(rng: random.Random, split: str, size: int) -> dict[str, list[Mod]]:
    """The split's modifications by kind: a share of ``size`` each, no held-out names in train."""
    n_add = min(round(size * MOD_TYPE_SHARE["add"]), len(object_types(split)) * GRID * GRID)
    adds = [
        ("add", (("color", c), ("pos", p), ("shape", s), ("size", z)), ())
        for (s, c, z) in object_types(split)
        for p in VALUES["pos"]
    ]
    descriptions = [m for m in _all_descriptions() if split == "test" or not is_held_out(dict(m))]
    n_remove = min(round(size * MOD_TYPE_SHARE["remove"]), len(descriptions))
    n_change = max(0, size - n_add - n_remove)
    pool = {
        "add": rng.sample(adds, n_add),
        "remove": [("remove", m, ()) for m in rng.sample(descriptions, n_remove)],
        "change": [],
    }
    seen: set[Mod] = set()
    for _ in range(50 * n_change + 100):
        if len(pool["change"]) >= n_change:
            break
        match = rng.choice(descriptions)
        attrs = rng.choices((1, 2, 3), weights=(0.7, 0.25, 0.05))[0]
        setting = []
        for attr in sorted(rng.sample(CHANGEABLE, attrs)):
            current = dict(match).get(attr)
            setting.append((attr, rng.choice([v for v in VALUES[attr] if v != current])))
        mod = ("change", match, tuple(setting))
        if mod in seen or (split == "train" and is_held_out({**dict(match), **dict(setting)})):
            continue
        seen.add(mod)
        pool["change"].append(mod)
    return pool


def _all_descriptions() -> list[tuple]:
    out = []
    for k in range(1, len(DESCRIBABLE) + 1):
        for attrs in itertools.combinations(DESCRIBABLE, k):
            for values in itertools.product(*(VALUES[a] for a in attrs)):
                out.append(tuple(zip(attrs, values)))
    return out


def plan_split(split: str, config: CssConfig) -> list[SourcePlan]:
    """Source scenes with their modifications, balancing how often each pool mod is used."""
    n_scenes = config.train_scenes if split == "train" else config.test_scenes
    rng = random.Random(f"css-{config.seed}-{split}")
    pool = build_mod_pool(rng, split, config.mod_pool)
    in_pool = {kind: set(mods) for kind, mods in pool.items()}
    change_by_match: dict[tuple, list[Mod]] = {}
    for mod in pool["change"]:
        change_by_match.setdefault(mod[1], []).append(mod)
    usage: Counter = Counter()
    quota = {
        "add": round(config.mods_per_scene * MOD_TYPE_SHARE["add"]),
        "remove": round(config.mods_per_scene * MOD_TYPE_SHARE["remove"]),
    }
    quota["change"] = config.mods_per_scene - quota["add"] - quota["remove"]
    plans: list[SourcePlan] = []
    seen_sources: set[Scene] = set()
    attempts = 0
    while len(plans) < n_scenes:
        attempts += 1
        if attempts > 100 * n_scenes + 1000:
            raise ValueError(
                f"{split}: found only {len(plans)} of {n_scenes} source scenes with "
                f"an applicable modification; raise mod_pool ({config.mod_pool})"
            )
        scene = sample_scene(rng, split)
        if scene in seen_sources:
            continue
        seen_sources.add(scene)
        empty = [p for p in VALUES["pos"] if all((o[3], o[4]) != p for o in scene)]
        descs = unique_descriptions(scene)
        candidates = {
            "add": [
                m
                for m in (
                    ("add", (("color", c), ("pos", p), ("shape", s), ("size", z)), ())
                    for p in empty
                    for (s, c, z) in object_types(split)
                )
                if m in in_pool["add"]
            ],
            "remove": [("remove", d, ()) for d in descs if ("remove", d, ()) in in_pool["remove"]],
            "change": [m for d in descs for m in change_by_match.get(d, ())],
        }
        plan = SourcePlan(scene, [], [])
        leftovers: list[tuple] = []
        deficit = 0
        for kind in ("add", "remove", "change"):
            ranked = sorted((usage[m], rng.random(), m) for m in candidates[kind])
            taken = _take(plan, ranked, quota[kind] + deficit, split)
            deficit = quota[kind] + deficit - taken
            leftovers += ranked
        if deficit:
            _take(plan, sorted(leftovers), deficit, split)
        if not plan.mods:
            continue  # a group without pairs teaches nothing
        usage.update(plan.mods)
        plans.append(plan)
    return plans


def _take(plan: SourcePlan, ranked: list[tuple], count: int, split: str) -> int:
    taken = 0
    for _, _, mod in ranked:
        if taken == count:
            break
        if mod in plan.mods:
            continue
        target = apply_mod(mod, plan.scene)
        if target is None or target in plan.targets:
            continue
        if split == "train" and any(_type_held_out(o[:3]) for o in target):
            continue
        plan.mods.append(mod)
        plan.targets.append(target)
        taken += 1
    return taken


# -- texts --------------------------------------------------------------------------------
def mod_texts(mod: Mod) -> list[str]:
    """Every paraphrase of a modification (templates x ways of naming its object)."""
    kind, match, setting = mod
    if kind == "add":
        obj = dict(match)
        noun = f"{obj['size']} {obj['color']} {obj['shape']}"
        where = _cell_name(obj["pos"])
        return [
            f"add {noun} to {where}",
            f"add a {noun} at {where}",
            f"put a {noun} in the {where} cell",
            f"place a {noun} at {where}",
        ]
    names = _descriptions_text(dict(match))
    if kind == "remove":
        verbs = ("remove {d}", "delete {d}", "take away {d}", "get rid of {d}")
        return [v.format(d=d) for v in verbs for d in names]
    new = dict(setting)
    adjectives = [new[a] for a in ("size", "color") if a in new]
    if "shape" in new:
        phrase = " ".join([*adjectives, new["shape"]])
        verbs = ["make {d} a " + phrase, "turn {d} into a " + phrase, "change {d} to a " + phrase]
    else:
        phrase = " and ".join(adjectives)
        verbs = ["make {d} " + phrase, "change {d} to " + phrase]
        if list(new) == ["color"]:
            verbs.append("paint {d} " + new["color"])
        if list(new) == ["size"]:
            verbs.append("shrink {d}" if new["size"] == "small" else "enlarge {d}")
    return [v.format(d=d) for v in verbs for d in names]


def _descriptions_text(match: dict[str, Any]) -> list[str]:
    core = " ".join(
        [*(match[a] for a in ("size", "color") if a in match), match.get("shape", "object")]
    )
    if "pos" not in match:
        return [f"the {core}", core]
    where = _cell_name(match["pos"])
    return [f"the {core} at {where}", f"{where} {core}", f"the {core} in the {where} cell"]


def _cell_name(pos: tuple[int, int]) -> str:
    return f"{ROW_NAMES[pos[0]]}-{COL_NAMES[pos[1]]}"


# -- writing ------------------------------------------------------------------------------
def render_task(task: tuple[Scene, int, str]) -> bytes:
    """PNG bytes of one scene; jitter is seeded by the image's own key, not by the worker."""
    scene, image_size, jitter_key = task
    objects = [object_dict(o) for o in scene]
    return encode_png(render_scene(objects, image_size, random.Random(jitter_key)))


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
    if Path(out_dir).exists() and not overwrite:
        raise FileExistsError(f"{out_dir} already exists; pass --overwrite to replace it")
    start = time.perf_counter()
    plans = {split: plan_split(split, config) for split in ("train", "test")}
    tasks = [
        (scene, config.image_size, f"css-{config.seed}-{split}-{i}")
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
            _write_train(writer, plans["train"], images, text_rng, config.texts_per_pair)
            queries = _write_test(writer, plans["test"], images, text_rng)
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
    texts_per_pair: int,
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
            blobs.append((next(images), "png"))
            index += 1
        pairs = []
        for i, mod in enumerate(plan.mods, start=1):
            texts = mod_texts(mod)
            pairs.append(
                {
                    "ref": 0,
                    "tgt": i,
                    "mod": mod_dict(mod),
                    "texts": rng.sample(texts, min(texts_per_pair, len(texts))),
                }
            )
        group = {"group": f"g{g:06d}", "members": members, "pairs": pairs, "derive": None}
        writer.add_group("train", f"t{g:08d}", group, blobs)


def _write_test(
    writer: DatasetWriter, plans: list[SourcePlan], images: Iterator[bytes], rng: random.Random
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
            writer.add_gallery("gallery", f"g{index:08d}", meta, next(images), "png")
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
    parser.add_argument(
        "--train-scenes",
        type=int,
        help=f"source scenes in train "
        f"(default {defaults.train_scenes}, --small {SMALL['train_scenes']})",
    )
    parser.add_argument(
        "--test-scenes",
        type=int,
        help=f"source scenes in test "
        f"(default {defaults.test_scenes}, --small {SMALL['test_scenes']})",
    )
    parser.add_argument(
        "--mods-per-scene",
        type=int,
        help=f"modifications per source scene "
        f"(default {defaults.mods_per_scene}, --small {SMALL['mods_per_scene']})",
    )
    parser.add_argument(
        "--mod-pool",
        type=int,
        help=f"distinct modifications per split "
        f"(default {defaults.mod_pool}, --small {SMALL['mod_pool']})",
    )
    parser.add_argument("--image-size", type=int, default=defaults.image_size)
    parser.add_argument(
        "--shard-size",
        type=int,
        help=f"images per shard (default {defaults.shard_size}, --small {SMALL['shard_size']})",
    )
    parser.add_argument("--small", action="store_true", help="small preset for tests and the demo")
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
    settings = dict(SMALL) if args.small else {}
    for field in ("train_scenes", "test_scenes", "mods_per_scene", "mod_pool", "shard_size"):
        if getattr(args, field) is not None:
            settings[field] = getattr(args, field)
    config = dataclasses.replace(defaults, seed=args.seed, image_size=args.image_size, **settings)
    start = time.perf_counter()
    try:
        manifest = generate_css(
            args.out,
            config,
            workers=args.workers,
            overwrite=args.overwrite,
            progress=True,
            preset="small" if args.small else "default",
        )
    except FileExistsError as err:
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

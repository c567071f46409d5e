"""The CSS-style task's scenes, modifications and texts (``shards.css`` writes them).

Objects, scenes, the held-out attribute combinations, the modification pool of a split,
which modifications apply to which source scene (``plan_split``), and the paraphrased
texts of each modification. Everything is deterministic in the config's seed.
"""

from __future__ import annotations

import itertools
import random
from collections import Counter
from dataclasses import dataclass
from typing import Any

from shards.render import COLORS, GRID, SHAPES, SIZES

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
    image_format: str = "png"  # "png" (lossless, as the CSS release) or "jpg"
    jpeg_quality: int = 90  # with image_format "jpg"


SMALL = {
    "train_scenes": 150,
    "test_scenes": 60,
    "mods_per_scene": 9,
    "mod_pool": 450,
    "shard_size": 200,
}
# Middle difficulty for CPU-sized reproductions: the test split of the original CSS3D
# release's size (400 sources x 6 modifications: 2,400 queries over 2,800 images) and
# 2,500 training scenes (15,000 triplets), in minutes of rendering.
MEDIUM = {
    "train_scenes": 2500,
    "test_scenes": 400,
    "mods_per_scene": 6,
    "mod_pool": 6000,
    "shard_size": 700,
}
PRESETS: dict[str, dict[str, int]] = {"default": {}, "small": SMALL, "medium": MEDIUM}


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

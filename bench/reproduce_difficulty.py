"""How hard is a CSS-style test split? Recall ceilings of perfect-perception baselines.

The TIRG paper's CSS table has image-only at R@1 6.3 and text-only at 0.1: neither half
of a query alone finds the target. This script checks that our generated data keeps that
property, from the scene labels alone (no training), with the protocol's hit rule (any
gallery image with the target's object set) and the reference excluded:

* ``chance``: a random ranking;
* ``image oracle``: ranks the gallery by how few objects differ from the reference's
  (size of the symmetric difference of the object sets) -- the best any model that
  ignores the text can do with perfect perception;
* ``text oracle``: ranks first the images that satisfy the text's post-condition (add:
  contains the new object at its cell; change: contains an object with the described
  and the new attributes; remove: no object matches the description) -- the best any
  model that ignores the reference image can do.

Ties are broken at random (the expected recall is computed exactly). Per modification
type too.

    python -m bench.reproduce_difficulty --data data/css-small
    python -m bench.reproduce_difficulty --plan default   # shards.css defaults, unrendered
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import tarfile
from pathlib import Path
from typing import Any

import numpy as np

from shards.render import COLORS, GRID, SHAPES, SIZES

ATTRS = ("shape", "color", "size")
CELLS = list(itertools.product(range(GRID), range(GRID)))
SLOTS = [(s, c, z, cell) for s, c, z in itertools.product(SHAPES, COLORS, SIZES) for cell in CELLS]
SLOT_INDEX = {slot: i for i, slot in enumerate(SLOTS)}


def object_row(objects: list[dict[str, Any]]) -> np.ndarray:
    """A scene's objects as a (slots,) 0/1 vector."""
    row = np.zeros(len(SLOTS), dtype=np.float32)
    for obj in objects:
        row[SLOT_INDEX[(obj["shape"], obj["color"], obj["size"], tuple(obj["pos"]))]] = 1
    return row


def read_dataset(dataset: Path) -> tuple[list[str], np.ndarray, list[dict[str, Any]]]:
    """Gallery ids, their object sets as a (N, slots) 0/1 matrix, and the queries."""
    manifest = json.loads((dataset / "manifest.json").read_text())
    ids, rows = [], []
    for shard in manifest["splits"]["gallery"]["shards"]:
        with tarfile.open(dataset / shard) as tar:
            for member in tar.getmembers():
                if member.name.endswith(".json"):
                    meta = json.loads(tar.extractfile(member).read())
                    ids.append(meta["id"])
                    rows.append(object_row(meta["objects"]))
    queries = json.loads((dataset / "queries.json").read_text())
    return ids, np.stack(rows), queries


def plan_dataset(config) -> tuple[list[str], np.ndarray, list[dict[str, Any]]]:
    """The same as ``read_dataset`` for the test split ``shards.css`` would write with
    ``config`` (a ``CssConfig``), from its plan alone: no image is rendered."""
    from shards.css_scenes import mod_dict, object_dict, plan_split

    ids, rows, queries = [], [], []
    for plan in plan_split("test", config):
        scene_ids = []
        for scene in (plan.scene, *plan.targets):
            scene_ids.append(f"css_test_{len(ids):06d}")
            ids.append(scene_ids[-1])
            rows.append(object_row([object_dict(o) for o in scene]))
        for i, mod in enumerate(plan.mods, start=1):
            queries.append(
                {"ref_id": scene_ids[0], "target_ids": [scene_ids[i]], "mod": mod_dict(mod)}
            )
    return ids, np.stack(rows), queries


def slots_matching(attrs: dict[str, Any]) -> np.ndarray:
    """Indices of the slots of objects with these attributes (``pos`` optional)."""
    want = {k: tuple(v) if k == "pos" else v for k, v in attrs.items()}
    return np.array(
        [
            i
            for i, slot in enumerate(SLOTS)
            if all(dict(zip((*ATTRS, "pos"), slot))[k] == v for k, v in want.items())
        ]
    )


def text_consistent(mod: dict[str, Any], objects: np.ndarray) -> np.ndarray:
    """(N,) bool: gallery images that satisfy the modification's post-condition."""
    if mod["type"] == "add":
        return objects[:, slots_matching(mod["object"])].any(axis=1)
    if mod["type"] == "remove":
        return ~objects[:, slots_matching(mod["match"])].any(axis=1)
    after = {k: v for k, v in mod["match"].items() if k not in mod["set"]} | mod["set"]
    return objects[:, slots_matching(after)].any(axis=1)


def expected_recalls(scores: np.ndarray, hits: np.ndarray, ks: tuple[int, ...]) -> dict[int, float]:
    """Probability that a hit is among the top k when ties are broken at random.

    With A non-hits scored above the best hit and, at the best hit's score, h hits and n
    non-hits: P = 0 if A >= k, else 1 - C(n, j) / C(n + h, j) with j = k - A (the chance
    that the first j places of the tied group are all non-hits).
    """
    if not hits.any():
        return dict.fromkeys(ks, 0.0)
    best = scores[hits].max()
    above = int((scores[~hits] > best).sum())
    h, n = int((scores[hits] == best).sum()), int((scores[~hits] == best).sum())
    out = {}
    for k in ks:
        j = k - above
        if j <= 0:
            out[k] = 0.0
            continue
        all_misses = 1.0
        for i in range(min(j, n + 1)):
            all_misses *= max(n - i, 0) / (n + h - i)
        out[k] = 1.0 - all_misses
    return out


def ceilings(
    ids: list[str],
    objects: np.ndarray,
    queries: list[dict[str, Any]],
    ks: tuple[int, ...] = (1, 5, 10),
) -> dict[str, dict[str, dict[str, float]]]:
    """{baseline: {mod type or "all": {"R@k": percent, "queries": n}}} over ``queries``
    (``ref_id``, ``target_ids``, ``mod``) on the gallery ``ids`` / ``objects`` (N, slots)."""
    position = {image_id: i for i, image_id in enumerate(ids)}
    sizes = objects.sum(axis=1)
    objects = objects.astype(bool)
    same_scene: dict[bytes, list[int]] = {}  # object set -> gallery rows (the hit rule)
    for row, vector in enumerate(objects):
        same_scene.setdefault(vector.tobytes(), []).append(row)
    sums: dict[str, dict[str, dict[int, float]]] = {}
    counts: dict[str, int] = {}
    for query in queries:
        ref = position[query["ref_id"]]
        hits = np.zeros(len(ids), dtype=bool)
        for target in query["target_ids"]:
            hits[same_scene[objects[position[target]].tobytes()]] = True
        keep = np.ones(len(ids), dtype=bool)
        keep[ref] = False  # the protocol excludes the reference
        overlap = objects[:, np.flatnonzero(objects[ref])].sum(axis=1)
        scores = {
            "chance": np.zeros(len(ids)),
            "image oracle": -(sizes + sizes[ref] - 2 * overlap),
            "text oracle": text_consistent(query["mod"], objects).astype(float),
        }
        kind = query["mod"]["type"]
        for group in (kind, "all"):
            counts[group] = counts.get(group, 0) + 1
        for name, score in scores.items():
            found = expected_recalls(score[keep], hits[keep], ks)
            for group in (kind, "all"):
                slot = sums.setdefault(name, {}).setdefault(group, dict.fromkeys(ks, 0.0))
                for k in ks:
                    slot[k] += found[k]
    return {
        name: {
            group: {
                **{f"R@{k}": 100 * v / counts[group] for k, v in per.items()},
                "queries": counts[group],
            }
            for group, per in groups.items()
        }
        for name, groups in sums.items()
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.reproduce_difficulty", description=__doc__.splitlines()[0]
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", help="CSS-style shard dataset (python -m shards.css)")
    source.add_argument(
        "--plan",
        choices=("default", "small", "medium"),
        help="plan the test split of a shards.css --preset (seed --seed) without rendering it",
    )
    parser.add_argument("--seed", type=int, default=0, help="generator seed for --plan")
    parser.add_argument("--json", help="also write the numbers here")
    args = parser.parse_args(argv)
    if args.plan:
        from shards.css import PRESETS, CssConfig

        ids, objects, queries = plan_dataset(CssConfig(seed=args.seed, **PRESETS[args.plan]))
    else:
        dataset = Path(args.data)
        if not (dataset / "queries.json").is_file():
            parser.error(
                f"--data {dataset}: no queries.json (expected python -m shards.css output)"
            )
        ids, objects, queries = read_dataset(dataset)
    result = ceilings(ids, objects, queries)
    groups = sorted(next(iter(result.values())), key=lambda g: (g != "all", g))
    print("| baseline | " + " | ".join(f"{g} R@1 / R@10" for g in groups) + " |")
    print("|---|" + "---:|" * len(groups))
    for name, per in result.items():
        cells = [f"{per[g]['R@1']:.1f} / {per[g]['R@10']:.1f}" for g in groups]
        print(f"| {name} | " + " | ".join(cells) + " |")
    print("queries: " + ", ".join(f"{g} {result['chance'][g]['queries']}" for g in groups))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

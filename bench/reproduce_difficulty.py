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

Ties are broken at random (``--draws`` draws, averaged). Per modification type too.

    python -m bench.reproduce_difficulty --dataset data/css-small
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


def read_gallery(dataset: Path) -> tuple[list[str], np.ndarray]:
    """Gallery ids and their object sets as a (N, slots) 0/1 matrix."""
    manifest = json.loads((dataset / "manifest.json").read_text())
    ids, rows = [], []
    for shard in manifest["splits"]["gallery"]["shards"]:
        with tarfile.open(dataset / shard) as tar:
            for member in tar.getmembers():
                if member.name.endswith(".json"):
                    meta = json.loads(tar.extractfile(member).read())
                    row = np.zeros(len(SLOTS), dtype=np.float32)
                    for obj in meta["objects"]:
                        row[SLOT_INDEX[(obj["shape"], obj["color"], obj["size"],
                                        tuple(obj["pos"]))]] = 1
                    ids.append(meta["id"])
                    rows.append(row)
    return ids, np.stack(rows)


def slots_matching(attrs: dict[str, Any]) -> np.ndarray:
    """Boolean mask over slots of objects with these attributes (``pos`` optional)."""
    return np.array([all(dict(zip((*ATTRS, "pos"), slot))[k] == (tuple(v) if k == "pos" else v)
                         for k, v in attrs.items()) for slot in SLOTS])


def text_consistent(mod: dict[str, Any], objects: np.ndarray) -> np.ndarray:
    """(N,) bool: gallery images that satisfy the modification's post-condition."""
    if mod["type"] == "add":
        return objects[:, slots_matching(mod["object"])].any(axis=1)
    if mod["type"] == "remove":
        return ~objects[:, slots_matching(mod["match"])].any(axis=1)
    after = {k: v for k, v in mod["match"].items() if k not in mod["set"]} | mod["set"]
    return objects[:, slots_matching(after)].any(axis=1)


def expected_recalls(scores: np.ndarray, hits: np.ndarray, ks: tuple[int, ...],
                     rng: np.random.Generator, draws: int) -> dict[int, float]:
    """Mean over random tie-breaks of "a hit is among the top k" (higher score first)."""
    found = {k: 0.0 for k in ks}
    for _ in range(draws):
        order = np.lexsort((rng.random(scores.shape[0]), -scores))
        first = int(np.argmax(hits[order])) if hits.any() else len(order)
        for k in ks:
            found[k] += first < k
    return {k: found[k] / draws for k in ks}


def ceilings(dataset: Path, draws: int = 5, seed: int = 0,
             ks: tuple[int, ...] = (1, 5, 10)) -> dict[str, dict[str, dict[str, float]]]:
    """{baseline: {mod type or "all": {"R@k": percent, "queries": n}}}."""
    ids, objects = read_gallery(dataset)
    position = {image_id: i for i, image_id in enumerate(ids)}
    queries = json.loads((dataset / "queries.json").read_text())
    rng = np.random.default_rng(seed)
    sizes = objects.sum(axis=1)
    labels = [row.tobytes() for row in objects]
    sums: dict[str, dict[str, dict[int, float]]] = {}
    counts: dict[str, int] = {}
    for query in queries:
        ref = position[query["ref_id"]]
        target_labels = {labels[position[t]] for t in query["target_ids"]}
        hits = np.array([label in target_labels for label in labels])
        keep = np.ones(len(ids), dtype=bool)
        keep[ref] = False  # the protocol excludes the reference
        overlap = objects @ objects[ref]
        scores = {
            "chance": np.zeros(len(ids)),
            "image oracle": -(sizes + sizes[ref] - 2 * overlap),
            "text oracle": text_consistent(query["mod"], objects).astype(float),
        }
        kind = query["mod"]["type"]
        for group in (kind, "all"):
            counts[group] = counts.get(group, 0) + 1
        for name, score in scores.items():
            found = expected_recalls(score[keep], hits[keep], ks, rng, draws)
            for group in (kind, "all"):
                slot = sums.setdefault(name, {}).setdefault(group, dict.fromkeys(ks, 0.0))
                for k in ks:
                    slot[k] += found[k]
    return {name: {group: {**{f"R@{k}": 100 * v / counts[group] for k, v in per.items()},
                           "queries": counts[group]} for group, per in groups.items()}
            for name, groups in sums.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.reproduce_difficulty",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", required=True, help="CSS-style shard dataset")
    parser.add_argument("--draws", type=int, default=5, help="random tie-breaks per query")
    parser.add_argument("--json", help="also write the numbers here")
    args = parser.parse_args(argv)
    dataset = Path(args.dataset)
    if not (dataset / "queries.json").is_file():
        parser.error(f"--dataset {dataset}: no queries.json (expected python -m shards.css output)")
    result = ceilings(dataset, draws=args.draws)
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

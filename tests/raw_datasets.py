"""Tiny raw datasets in each dataset's own on-disk format, with deliberately broken parts.

Each ``make_<dataset>(root)`` writes a few 16-24 px images and the annotation files the
dataset's authors ship, and returns a dict of what was broken on purpose (so tests can
check that exactly those items are skipped).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image


def write_image(path: Path, seed: int, fmt: str = "JPEG", size: int = 20) -> Path:
    """A random-noise image file (noise so that JPEG bytes are not trivially small)."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, format=fmt)
    return path


def truncate(path: Path, keep: float = 0.5) -> Path:
    """Cut a file to ``keep`` of its bytes (a download that stopped half way)."""
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


# -- CSS (TIRG's release) ----------------------------------------------------------------


def css_object(shape: str, color: str, size: str, row: int, col: int) -> dict:
    # TIRG's generate_2d_image reads pos as fractions of the image side.
    return {
        "shape": shape,
        "color": color,
        "size": size,
        "pos": np.array([(row + 0.5) / 3, (col + 0.5) / 3]),
        "material": "rubber",
    }


def make_css3d(root: Path, *, with_labels: bool = False) -> dict:
    """Train: 6 scenes (image 5 missing), test: 6 scenes (image 4 truncated; 0 and 3 equal)."""
    red_circle = css_object("circle", "red", "small", 0, 0)
    blue_square = css_object("rectangle", "blue", "large", 1, 1)
    green_tri = css_object("triangle", "green", "small", 2, 2)
    scenes = [
        [red_circle],
        [blue_square],
        [red_circle, green_tri],
        [blue_square, green_tri],
        [green_tri],
        [red_circle, blue_square],
    ]
    train_mods = [
        {"from": [0, 1], "to": [2, 3], "to_str": "add green triangle to bottom-right"},
        {"from": [2, 3], "to": [4, 4], "to_str": "remove the other objects"},
        {"from": [4], "to": [5], "to_str": "add objects to top-left"},  # 5 is missing
    ]
    test_scenes = [
        [red_circle],
        [blue_square],
        [red_circle, green_tri],
        [red_circle],
        [green_tri],
        [blue_square, green_tri],
    ]
    test_mods = [
        {"from": [0, 1], "to": [2, 5], "to_str": "add green triangle to bottom-right"},
        {"from": [2], "to": [4], "to_str": "remove red circle"},  # 4 is truncated
        {"from": [5, 1], "to": [1, 3], "to_str": "remove green triangle"},
    ]
    data = {
        "train": {"objects_img": scenes, "mods": train_mods},
        "test": {"objects_img": test_scenes, "mods": test_mods},
    }
    if with_labels:
        data["train"]["labels"] = [10, 11, 12, 13, 14, 15]
        data["test"]["labels"] = [0, 1, 2, 0, 4, 5]
    root.mkdir(parents=True, exist_ok=True)
    np.save(
        root / "css_toy_dataset_novel2_small.dup.npy",
        np.array(data, dtype=object),
        allow_pickle=True,
    )
    for split, count in (("train", 6), ("test", 6)):
        for i in range(count):
            seed = i + (100 if split == "test" else 0)
            write_image(root / "images" / f"css_{split}_{i:06d}.png", seed, fmt="PNG", size=16)
    (root / "images" / "css_train_000005.png").unlink()
    truncate(root / "images" / "css_test_000004.png")
    return {"missing": ["images/css_train_000005.png"], "truncated": ["images/css_test_000004.png"]}


# -- Fashion200k (+ TIRG's test_queries.txt) ----------------------------------------------

F200K_TRAIN = [  # (category, image path, caption)
    ("dress", "women/dresses/casual/1/1_0.jpeg", "black midi dress"),
    ("dress", "women/dresses/casual/1/1_1.jpeg", "black midi dress"),
    ("dress", "women/dresses/casual/2/2_0.jpeg", "red midi dress"),
    ("dress", "women/dresses/casual/3/3_0.jpeg", "black maxi dress"),
    ("dress", "women/dresses/casual/4/4_0.jpeg", "blue lace gown"),  # no sibling
    ("skirt", "women/skirts/mini/5/5_0.jpeg", "pleated mini skirt"),
    ("skirt", "women/skirts/mini/6/6_0.jpeg", "leather mini skirt"),
    ("skirt", "women/skirts/mini/7/7_0.jpeg", "leather mini skirt"),  # missing file
    ("skirt", "women/skirts/mini/8/8_0.jpeg", "denim mini skirt"),  # truncated
]
F200K_TEST = [
    ("dress", "women/dresses/casual/20/20_0.jpeg", "white midi dress"),
    ("dress", "women/dresses/casual/21/21_0.jpeg", "green midi dress"),
    ("dress", "women/dresses/casual/22/22_0.jpeg", "green midi dress"),
    ("skirt", "women/skirts/mini/23/23_0.jpeg", "pink mini skirt"),
    ("skirt", "women/skirts/mini/24/24_0.jpeg", "grey mini skirt"),  # truncated
]


def make_fashion200k(root: Path) -> dict:
    """Two categories, 9 train / 5 test images, a bad caption line and bad queries."""
    lines: dict[str, list[str]] = {}
    for split, rows in (("train", F200K_TRAIN), ("test", F200K_TEST)):
        for n, (category, path, caption) in enumerate(rows):
            write_image(root / path, seed=n + (50 if split == "test" else 0))
            lines.setdefault(f"{category}_{split}_detect_all.txt", []).append(
                f"{path}\t0.{n + 1}\t{caption}  "
            )
    lines["dress_train_detect_all.txt"].append("women/dresses/casual/9/9_0.jpeg\t0.5")  # 2 fields
    (root / "labels").mkdir(parents=True, exist_ok=True)
    for name, rows in lines.items():
        (root / "labels" / name).write_text("\n".join(rows) + "\n")
    (root / F200K_TRAIN[7][1]).unlink()
    truncate(root / F200K_TRAIN[8][1])
    truncate(root / F200K_TEST[4][1])
    t = [path for _, path, _ in F200K_TEST]
    (root / "test_queries.txt").write_text(
        "\n".join(
            [
                f"{t[0]} {t[1]}",  # white -> green midi dress
                f"{t[1]} {t[0]}",
                f"{t[3]} {t[4]}",  # target truncated
                f"{t[3]} women/skirts/mini/99/99_0.jpeg",  # unknown image
                f"{t[0]}",  # bad line
            ]
        )
        + "\n"
    )
    return {"missing": [F200K_TRAIN[7][1]], "truncated": [F200K_TRAIN[8][1], F200K_TEST[4][1]]}


# -- MIT-States ------------------------------------------------------------------------------

MITSTATES_FOLDERS = {  # folder -> image count
    "ancient building": 2,
    "modern building": 3,
    "ruined building": 1,  # train noun
    "ripe apple": 2,  # train, one state only
    "fresh fish": 2,
    "fried fish": 1,
    "raw fish": 1,  # test noun (TIRG list)
    "cloudy sky": 1,
    "sunny sky": 1,  # test noun
    "adj fish": 2,  # no state: left out
}


def make_mitstates(root: Path) -> dict:
    """10 folders; one truncated test image, one non-image file, one stray folder."""
    seed = 0
    for folder, count in MITSTATES_FOLDERS.items():
        for k in range(count):
            seed += 1
            write_image(root / "images" / folder / f"img_{k}.jpg", seed)
    (root / "images" / "modern building" / "notes.txt").write_text("not an image\n")
    (root / "images" / "misc").mkdir()
    truncate(root / "images" / "fresh fish" / "img_1.jpg")
    return {
        "truncated": ["images/fresh fish/img_1.jpg"],
        "not_image": ["images/modern building/notes.txt"],
    }


# -- Fashion-IQ --------------------------------------------------------------------------------


def make_fashioniq(root: Path, *, with_test: bool = True) -> dict:
    """Three categories; train/val triplets, one missing and one truncated image, a bad
    caption entry, a val query naming an image outside the val split; test captions for
    dress only (targets hidden)."""

    def dump(path: Path, data) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data))

    seed = 0
    for category in ("dress", "shirt", "toptee"):
        c = category[0]
        train = [f"{c}tr{i}" for i in range(5)]
        val = [f"{c}va{i}" for i in range(4)]
        for name in train + val:
            seed += 1
            write_image(root / "images" / f"{name}.jpg", seed)
        dump(root / "image_splits" / f"split.{category}.train.json", train)
        dump(root / "image_splits" / f"split.{category}.val.json", val)
        dump(
            root / "captions" / f"cap.{category}.train.json",
            [
                {
                    "candidate": train[0],
                    "target": train[1],
                    "captions": ["is red", "has no sleeves"],
                },
                {"candidate": train[1], "target": train[2], "captions": ["is longer", "is blue"]},
                {"candidate": train[0], "target": train[2], "captions": ["is blue", "is long"]},
                {
                    "candidate": train[3],
                    "target": train[4],
                    "captions": ["has a print", "is darker"],
                },
            ],
        )
        dump(
            root / "captions" / f"cap.{category}.val.json",
            [
                {"candidate": val[0], "target": val[1], "captions": ["is green", "has buttons"]},
                {"candidate": val[2], "target": val[3], "captions": ["is shorter", "is white"]},
                {"candidate": val[1], "target": val[0], "captions": ["is black", "has a belt"]},
            ],
        )
    # broken parts
    (root / "images" / "dtr4.jpg").unlink()  # train target missing
    truncate(root / "images" / "sva3.jpg")  # val target truncated
    caps = json.loads((root / "captions" / "cap.toptee.train.json").read_text())
    caps.append({"candidate": "ttr0", "captions": ["no target"]})
    dump(root / "captions" / "cap.toptee.train.json", caps)
    caps = json.loads((root / "captions" / "cap.toptee.val.json").read_text())
    caps.append({"candidate": "ttr0", "target": "tva1", "captions": ["a", "b"]})  # not val
    dump(root / "captions" / "cap.toptee.val.json", caps)
    if with_test:
        test = ["dte0", "dte1", "dte2"]
        for name in test:
            seed += 1
            write_image(root / "images" / f"{name}.png", seed, fmt="PNG")
        dump(root / "image_splits" / "split.dress.test.json", test)
        dump(
            root / "captions" / "cap.dress.test.json",
            [
                {"candidate": "dte0", "captions": ["is red", "is long"]},
                {"candidate": "dte2", "captions": ["is pink", "is short"]},
            ],
        )
    return {"missing": ["images/dtr4.*"], "truncated": ["images/sva3.jpg"]}


# -- CIRR --------------------------------------------------------------------------------------


def make_cirr(root: Path, *, img_raw: bool = True) -> dict:
    """Train 8 images / 5 pairs, val 6 images / 4 pairs, test1 4 images / 2 pairs; one
    train image file missing, one val image truncated, a bad caption entry, a val query
    naming an image in no split."""

    def dump(path: Path, data) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data))

    image_root = root / "img_raw" if img_raw else root
    layout = {
        "train": [f"train-{i}-0-img{i % 2}" for i in range(8)],
        "val": [f"dev-{i}-1-img{i % 2}" for i in range(6)],
        "test1": [f"test1-{i}-0-img0" for i in range(4)],
    }
    folder = {"train": "train", "val": "dev", "test1": "test1"}
    seed = 0
    for split, names in layout.items():
        mapping = {}
        for k, name in enumerate(names):
            rel = (
                f"./{folder[split]}/{k % 2}/{name}.png"
                if split == "train"
                else f"./{folder[split]}/{name}.png"
            )
            mapping[name] = rel
            seed += 1
            write_image(image_root / rel, seed, fmt="PNG", size=16)
        dump(root / "image_splits" / f"split.rc2.{split}.json", mapping)

    def pair(pairid, split, ref, tgt, caption, members):
        names = layout[split]
        entry = {
            "pairid": pairid,
            "reference": names[ref],
            "caption": caption,
            "img_set": {"id": pairid // 3, "members": [names[m] for m in members]},
        }
        if split != "test1":
            entry["target_hard"] = names[tgt]
            entry["target_soft"] = {names[tgt]: 1.0}
        return entry

    t = [0, 1, 2, 3]
    dump(
        root / "captions" / "cap.rc2.train.json",
        [
            pair(1, "train", 0, 1, "add a dog", t),
            pair(2, "train", 1, 2, "remove the  cat", t),
            pair(3, "train", 2, 3, "make it night", t),
            pair(4, "train", 4, 5, "zoom in", [4, 5, 6]),
            pair(5, "train", 6, 7, "show two of them", [6, 7]),  # image 7's file is missing
            {
                "pairid": 6,
                "reference": layout["train"][0],
                "caption": "no target",
                "img_set": {"members": []},
            },  # bad entry
        ],
    )
    v = [0, 1, 2, 3, 4, 5]
    val_pairs = [
        pair(10, "val", 0, 1, "same but red", v),
        pair(11, "val", 2, 3, "fewer birds", v),
        pair(12, "val", 4, 5, "close up", v),
        pair(13, "val", 5, 0, "one is blue", v),
    ]
    val_pairs[2]["img_set"]["members"][0] = "dev-99-0-img0"  # member in no split
    val_pairs.append({**pair(14, "val", 1, 2, "at the beach", v), "reference": "dev-77-0-img1"})
    dump(root / "captions" / "cap.rc2.val.json", val_pairs)
    dump(
        root / "captions" / "cap.rc2.test1.json",
        [
            pair(20, "test1", 0, None, "on a table", [0, 1, 2, 3]),
            pair(21, "test1", 2, None, "in the snow", [0, 1, 2, 3]),
        ],
    )
    (image_root / "train" / "1" / f"{layout['train'][7]}.png").unlink()
    truncate(image_root / "dev" / f"{layout['val'][3]}.png")
    return {
        "missing": [f"img_raw/train/1/{layout['train'][7]}.png"],
        "truncated": [f"img_raw/dev/{layout['val'][3]}.png"],
    }

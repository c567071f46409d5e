"""Tiny raw datasets in each dataset's own on-disk format, with deliberately broken parts.

Each ``make_<dataset>(root)`` writes a few 16-24 px images and the annotation files the
dataset's authors ship, and returns a dict of what was broken on purpose (so tests can
check that exactly those items are skipped).
"""

from __future__ import annotations

import json
import random
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
    return {"shape": shape, "color": color, "size": size,
            "pos": np.array([(row + 0.5) / 3, (col + 0.5) / 3]), "material": "rubber"}


def make_css3d(root: Path, *, with_labels: bool = False) -> dict:
    """Train: 6 scenes (image 5 missing), test: 6 scenes (image 4 truncated; 0 and 3 equal)."""
    red_circle = css_object("circle", "red", "small", 0, 0)
    blue_square = css_object("rectangle", "blue", "large", 1, 1)
    green_tri = css_object("triangle", "green", "small", 2, 2)
    scenes = [[red_circle], [blue_square], [red_circle, green_tri], [blue_square, green_tri],
              [green_tri], [red_circle, blue_square]]
    train_mods = [
        {"from": [0, 1], "to": [2, 3], "to_str": "add green triangle to bottom-right"},
        {"from": [2, 3], "to": [4, 4], "to_str": "remove the other objects"},
        {"from": [4], "to": [5], "to_str": "add objects to top-left"},  # 5 is missing
    ]
    test_scenes = [[red_circle], [blue_square], [red_circle, green_tri], [red_circle],
                   [green_tri], [blue_square, green_tri]]
    test_mods = [
        {"from": [0, 1], "to": [2, 5], "to_str": "add green triangle to bottom-right"},
        {"from": [2], "to": [4], "to_str": "remove red circle"},   # 4 is truncated
        {"from": [5, 1], "to": [1, 3], "to_str": "remove green triangle"},
    ]
    data = {"train": {"objects_img": scenes, "mods": train_mods},
            "test": {"objects_img": test_scenes, "mods": test_mods}}
    if with_labels:
        data["train"]["labels"] = [10, 11, 12, 13, 14, 15]
        data["test"]["labels"] = [0, 1, 2, 0, 4, 5]
    root.mkdir(parents=True, exist_ok=True)
    np.save(root / "css_toy_dataset_novel2_small.dup.npy", np.array(data, dtype=object),
            allow_pickle=True)
    for split, count in (("train", 6), ("test", 6)):
        for i in range(count):
            write_image(root / "images" / f"css_{split}_{i:06d}.png", i + (100 if split == "test" else 0),
                        fmt="PNG", size=16)
    (root / "images" / "css_train_000005.png").unlink()
    truncate(root / "images" / "css_test_000004.png")
    return {"missing": ["images/css_train_000005.png"],
            "truncated": ["images/css_test_000004.png"]}

"""Tiny shard datasets for tests of every stage (written with ``shards.writer.DatasetWriter``).

``write_dataset(out_dir)`` writes, with small images (32 px by default):

* ``train``: ``explicit_groups`` groups of 3 members with explicit pairs 0->1 and 1->2
  (two texts each), one ``replace_word`` group (Fashion200k-style captions) and one
  ``change_state`` group (MIT-States attributes), ``shard_size`` groups per shard;
* ``gallery``: ``gallery_size`` images with ``label`` (``label<i % 5>``), ``caption``
  and ``category`` (``dress``/``shirt``);
* ``queries.json``: ``query_count`` queries ``gallery[i] + text -> gallery[i + 1]``
  under a CSS-style protocol (hit by label, reference excluded).

``corrupt_image=True`` adds a group whose member 1 is not an image;
``corrupt_json=True`` adds a shard holding a group whose JSON does not parse.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import torch
import webdataset as wds
from PIL import Image, ImageDraw

from shards.writer import DatasetWriter

PALETTE = [
    (220, 40, 40),
    (40, 180, 60),
    (40, 80, 220),
    (230, 200, 30),
    (160, 60, 200),
    (30, 200, 200),
    (240, 130, 20),
    (120, 120, 120),
]

REPLACE_WORD_CAPTIONS = [
    "red leather jacket",
    "blue leather jacket",
    "red cotton jacket",
    "green silk dress",
]
# expected derived pairs of that group: 0<->1 red/blue, 0<->2 leather/cotton; member 3 has none
CHANGE_STATE_ATTRIBUTES = [
    {"adj": "ripe", "noun": "tomato"},
    {"adj": "unripe", "noun": "tomato"},
    {"adj": "sliced", "noun": "apple"},
]
# expected: 0<->1 ("unripe" / "ripe"); member 2 has none

CSS_PROTOCOL = {"name": "css", "ks": [1, 5, 10, 50], "hit": "label", "exclude_reference": True}


def image_bytes(index: int, size: int = 32, ext: str = "png") -> bytes:
    """A small distinct picture: background colour and square position depend on ``index``."""
    image = Image.new("RGB", (size + 8 * (index % 3), size), PALETTE[index % len(PALETTE)])
    draw = ImageDraw.Draw(image)
    x = (index * 7) % max(1, size - 10)
    draw.rectangle([x, size // 4, x + 8, size // 4 + 8], fill=PALETTE[(index + 3) % len(PALETTE)])
    buf = io.BytesIO()
    image.save(buf, format="JPEG" if ext in ("jpg", "jpeg") else "PNG")
    return buf.getvalue()


def reader_batch(ref_data: list, target_data: list) -> dict:
    """A streaming reader's batch as a CUDA run's main process gets it: per image encoded
    bytes or a worker-decoded uint8 tensor; one-token texts, ids ``r<i>``/``t<i>``."""
    n = len(ref_data)
    return {
        "ref_data": list(ref_data),
        "target_data": list(target_data),
        "tokens": torch.arange(2, 2 + n).view(n, 1),
        "lengths": torch.ones(n, dtype=torch.long),
        "texts": [f"text {i}" for i in range(n)],
        "ref_ids": [f"r{i}" for i in range(n)],
        "target_ids": [f"t{i}" for i in range(n)],
    }


def write_dataset(
    out_dir: str | Path,
    *,
    name: str = "fixture",
    explicit_groups: int = 6,
    derived_groups: bool = True,
    shard_size: int = 2,
    gallery_size: int = 10,
    gallery_shard_size: int = 4,
    query_count: int = 6,
    image_size: int = 32,
    ext: str = "png",
    protocol: dict | None = None,
    queries: list[dict] | None = None,
    corrupt_image: bool = False,
    corrupt_json: bool = False,
) -> Path:
    """Write the dataset described in the module docstring; returns ``out_dir``.

    ``queries`` replaces the generated query list (ids ``gal_0000`` ... exist).
    """
    out_dir = Path(out_dir)
    counter = 0

    def next_image() -> tuple[bytes, str]:
        nonlocal counter
        counter += 1
        return image_bytes(counter, image_size, ext), ext

    with DatasetWriter(
        out_dir, name, "tests.shard_fixtures", shard_size=shard_size, image_ext=ext
    ) as writer:
        for g in range(explicit_groups):
            key = f"g{g:04d}"
            members = [{"id": f"{key}_{i}", "label": f"label{(g + i) % 5}"} for i in range(3)]
            pairs = [
                {"ref": 0, "tgt": 1, "texts": [f"make it color{g}", f"turn it color{g}"]},
                {"ref": 1, "tgt": 2, "texts": [f"add shape{g}", f"put shape{g}"]},
            ]
            writer.add_group(
                "train",
                key,
                {"group": key, "members": members, "pairs": pairs, "derive": None},
                [next_image() for _ in members],
            )
        if derived_groups:
            members = [
                {"id": f"f200k_{i}", "caption": c} for i, c in enumerate(REPLACE_WORD_CAPTIONS)
            ]
            writer.add_group(
                "train",
                "f200k",
                {"group": "f200k", "members": members, "derive": "replace_word"},
                [next_image() for _ in members],
            )
            members = [
                {"id": f"mit_{i}", "attributes": a} for i, a in enumerate(CHANGE_STATE_ATTRIBUTES)
            ]
            writer.add_group(
                "train",
                "mit",
                {"group": "mit", "members": members, "derive": "change_state"},
                [next_image() for _ in members],
            )
        if corrupt_image:
            members = [{"id": f"bad_{i}"} for i in range(2)]
            writer.add_group(
                "train",
                "badimage",
                {
                    "group": "badimage",
                    "members": members,
                    "pairs": [{"ref": 0, "tgt": 1, "texts": ["corrupt target"]}],
                },
                [next_image(), (b"this is not an image", ext)],
            )
        for i in range(gallery_size):
            meta = {
                "id": f"gal_{i:04d}",
                "label": f"label{i % 5}",
                "caption": f"caption {i % 5}",
                "category": ("dress", "shirt")[i % 2],
            }
            writer.add_gallery(
                "gallery", f"s{i:06d}", meta, image_bytes(100 + i, image_size, ext), ext
            )
        queries = queries or [
            {
                "qid": q,
                "ref_id": f"gal_{q % gallery_size:04d}",
                "text": f"make it color{q}",
                "target_ids": [f"gal_{(q + 1) % gallery_size:04d}"],
                "category": ("dress", "shirt")[q % 2],
            }
            for q in range(query_count)
        ]
        writer.set_queries("queries.json", queries)
        writer.finish(
            {
                "test": {
                    "gallery": "gallery",
                    "queries": "queries.json",
                    "count": len(queries),
                    "protocol": protocol or CSS_PROTOCOL,
                }
            }
        )
    if corrupt_json:
        add_corrupt_json_shard(out_dir)
    return out_dir


def add_corrupt_json_shard(out_dir: str | Path, split: str = "train") -> str:
    """Append a shard with one group whose JSON does not parse; returns its file name."""
    out_dir = Path(out_dir)
    manifest = json.loads((out_dir / "manifest.json").read_text())
    shard = f"{split}-{len(manifest['splits'][split]['shards']):06d}.tar"
    with wds.TarWriter(str(out_dir / shard)) as tar:
        tar.write({"__key__": "badjson", "json": b"{not json", "0.png": image_bytes(0)})
    manifest["splits"][split]["shards"].append(shard)
    manifest["splits"][split]["samples"] += 1
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return shard

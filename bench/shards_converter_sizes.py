"""Shard size vs raw size of each dataset converter, on the tests' tiny raw datasets.

Builds each raw fixture of ``tests/raw_datasets.py`` (the datasets' own formats, broken
files included), redraws its images at ``--image-size`` pixels (smooth colour fields
with mild noise, so JPEG/PNG sizes resemble photos more than noise does), converts it
and reports: raw bytes used (images + annotation files), shard bytes, their ratio, the
grouping's stored/unique image ratio, and the bytes per stored image that are not image
data (tar headers and padding, JSON), with and without each shard's fixed end-of-archive
padding. Full-size datasets are not measured here.

    python bench/shards_converter_sizes.py --image-size 256 --out results/shards_sizes.json
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as a script Python puts bench/ on sys.path, not the repository root.
ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import argparse  # noqa: E402
import json  # noqa: E402
import tarfile  # noqa: E402
import tempfile  # noqa: E402
from contextlib import redirect_stdout  # noqa: E402
from io import StringIO  # noqa: E402

import numpy as np  # noqa: E402
import raw_datasets  # noqa: E402
from PIL import Image  # noqa: E402
from shard_reading import read_split  # noqa: E402

from shards import cirr, css3d, fashion200k, fashioniq, mitstates  # noqa: E402
from shards.grouping import duplication, group_pairs  # noqa: E402

DATASETS = {
    "css3d": (css3d, raw_datasets.make_css3d),
    "fashion200k": (fashion200k, raw_datasets.make_fashion200k),
    "mitstates": (mitstates, raw_datasets.make_mitstates),
    "fashioniq": (fashioniq, raw_datasets.make_fashioniq),
    "cirr": (cirr, raw_datasets.make_cirr),
}


def redraw_images(root: Path, size: int, seed: int = 0) -> None:
    """Replace every decodable image under ``root`` by a ``size`` px photo-like image of
    the same format (broken files stay broken)."""
    rng = np.random.default_rng(seed)
    for path in sorted(root.rglob("*")):
        if path.suffix.lower() not in (".jpg", ".jpeg", ".png"):
            continue
        try:
            with Image.open(path) as image:
                image.load()
                fmt = image.format
        except Exception:  # noqa: BLE001 - a deliberately broken fixture file
            continue
        y, x = np.mgrid[0:size, 0:size] / size
        base = rng.uniform(0, 255, 3)
        slope = rng.uniform(-120, 120, (2, 3))
        pixels = base + y[..., None] * slope[0] + x[..., None] * slope[1]
        pixels += rng.normal(0, 6, (size, size, 3))
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path, format=fmt)


def measure(name: str, image_size: int, workdir: Path) -> dict:
    module, make = DATASETS[name]
    raw, out = workdir / name / "raw", workdir / name / "out"
    make(raw)
    redraw_images(raw, image_size)
    with redirect_stdout(StringIO()):
        manifest = module.main(["--src", str(raw), "--out", str(out)])
    stored_images = image_bytes = 0
    for split in manifest["splits"]:
        for sample in read_split(out, split):
            stored_images += len(sample["images"])
            image_bytes += sum(len(d) for d in sample["images"].values())
    queries = sum((out / ev["queries"]).stat().st_size for ev in manifest["evals"].values())
    tails = sum(
        tar_tail(out / shard) for info in manifest["splits"].values() for shard in info["shards"]
    )
    groups = manifest["extra"].get("groups", {})
    raw_bytes = manifest["extra"].get("raw_bytes")
    return {
        "dataset": name,
        "image_size": image_size,
        "raw_bytes": raw_bytes,
        "shard_bytes": manifest["bytes"],
        "ratio": round(manifest["bytes"] / raw_bytes, 3) if raw_bytes else None,
        "train_stored_per_unique": groups.get("ratio"),
        "stored_images": stored_images,
        "image_bytes": image_bytes,
        "query_bytes": queries,
        "shards": sum(len(info["shards"]) for info in manifest["splits"].values()),
        "tar_tail_bytes": tails,
        "overhead_per_image": round(
            (manifest["bytes"] - image_bytes - queries) / max(stored_images, 1)
        ),
        "overhead_per_image_without_tails": round(
            (manifest["bytes"] - image_bytes - queries - tails) / max(stored_images, 1)
        ),
    }


def tar_tail(path: Path) -> int:
    """Bytes after a tar's last member: end-of-archive blocks and record padding, a fixed
    cost per shard (up to 10 KiB) that does not grow with the shard."""
    with tarfile.open(path) as tar:
        last = tar.getmembers()[-1]
    end = last.offset_data + -(-last.size // 512) * 512
    return path.stat().st_size - end


def random_graph_duplication(
    images: int, degrees: list[int], group_sizes: list[int], seed: int = 0
) -> list[dict]:
    """Stored/unique images of ``group_pairs`` on random pair graphs (no locality: the
    hard case, e.g. a dataset whose pairs link arbitrary images)."""
    rng = np.random.default_rng(seed)
    rows = []
    for degree in degrees:
        ends = rng.integers(0, images, (images * degree // 2, 2))
        pairs = [(f"i{a}", f"i{b}", ["t"]) for a, b in ends]
        for size in group_sizes:
            stats = duplication(g.members for g in group_pairs(pairs, size))
            rows.append({"images": images, "mean_degree": degree, "group_size": size, **stats})
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--datasets", nargs="+", choices=list(DATASETS), default=list(DATASETS))
    parser.add_argument("--out", type=Path, default=None, help="JSON file for the rows")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        rows = [measure(name, args.image_size, Path(tmp)) for name in args.datasets]
    header = (
        f"{'dataset':<12} {'raw KB':>8} {'shard KB':>9} {'ratio':>6} {'train dup':>9} "
        f"{'images':>6} {'shards':>6} {'overhead B/img':>14} {'w/o tar tails':>13}"
    )
    print(header)
    for r in rows:
        print(
            f"{r['dataset']:<12} {r['raw_bytes'] / 1e3:8.1f} {r['shard_bytes'] / 1e3:9.1f} "
            f"{r['ratio']:6.2f} {r['train_stored_per_unique']:9.2f} {r['stored_images']:6d} "
            f"{r['shards']:6d} {r['overhead_per_image']:14d} "
            f"{r['overhead_per_image_without_tails']:13d}"
        )
    graph_rows = random_graph_duplication(20000, [2, 6], [2, 8, 32])
    print(f"\n{'random pair graph':<18} {'group size':>10} {'stored/unique':>13}")
    for r in graph_rows:
        print(
            f"{'mean degree ' + str(r['mean_degree']):<18} {r['group_size']:>10} "
            f"{r['ratio']:>13.2f}"
        )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"fixtures": rows, "random_graphs": graph_rows}, indent=1))
    return rows


if __name__ == "__main__":
    main()

"""Shard writing speed of the CSS generator (``shards.css``) on this machine.

For each worker count, generates the dataset into a temporary directory and reports wall
time, samples/s (train groups + gallery images), images/s, MB written, bytes per image and
the time ``shards.verify`` takes to decode it all. The planning of scenes and mods runs in
the main process and is included in the wall time.

    python bench/shard_write.py --preset small --workers 1,2 --json-out results/shard_write_small.json
    python bench/shard_write.py --preset default --workers 2 --json-out results/shard_write.json
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as a script Python puts bench/ on sys.path, not the repository root.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

from shards import css  # noqa: E402
from shards.verify import verify_dataset  # noqa: E402


def measure(config: css.CssConfig, workers: int, preset: str) -> dict:
    with tempfile.TemporaryDirectory(prefix="css-bench-") as tmp:
        out = Path(tmp) / "css"
        start = time.perf_counter()
        manifest = css.generate_css(out, config, workers=workers, preset=preset)
        seconds = time.perf_counter() - start
        start = time.perf_counter()
        problems = verify_dataset(out)
        verify_seconds = time.perf_counter() - start
    splits = manifest["splits"]
    samples = sum(s["samples"] for s in splits.values())
    images = sum(s["images"] for s in splits.values())
    return {
        "preset": preset,
        "workers": workers,
        "image_size": config.image_size,
        "train_groups": splits["train"]["samples"],
        "images": images,
        "samples": samples,
        "queries": manifest["evals"]["test"]["count"],
        "seconds": round(seconds, 2),
        "samples_per_s": round(samples / seconds, 1),
        "images_per_s": round(images / seconds, 1),
        "mb": round(manifest["bytes"] / 1e6, 2),
        "bytes_per_image": round(manifest["bytes"] / images),
        "verify_seconds": round(verify_seconds, 2),
        "verify_problems": len(problems),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", choices=("small", "default"), default="small")
    parser.add_argument(
        "--render-processes",
        dest="workers",
        default="1,2",
        help="comma-separated shards.css render-process counts",
    )
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--train-scenes", type=int, help="override the preset's source scenes")
    parser.add_argument("--test-scenes", type=int, help="override the preset's source scenes")
    parser.add_argument("--json-out", help="write the rows here as JSON")
    args = parser.parse_args(argv)
    settings = dict(css.SMALL) if args.preset == "small" else {}
    for field in ("train_scenes", "test_scenes"):
        if getattr(args, field) is not None:
            settings[field] = getattr(args, field)
    config = dataclasses.replace(css.CssConfig(), image_size=args.image_size, **settings)
    rows = [measure(config, int(w), args.preset) for w in args.workers.split(",")]
    header = (
        f"{'preset':<8}{'workers':>8}{'px':>5}{'groups':>8}{'images':>8}{'queries':>8}"
        f"{'seconds':>9}{'samples/s':>11}{'images/s':>10}{'MB':>8}{'B/img':>7}{'verify s':>10}"
    )
    print(header)
    for r in rows:
        print(
            f"{r['preset']:<8}{r['workers']:>8}{r['image_size']:>5}{r['train_groups']:>8}"
            f"{r['images']:>8}{r['queries']:>8}{r['seconds']:>9.2f}{r['samples_per_s']:>11.1f}"
            f"{r['images_per_s']:>10.1f}{r['mb']:>8.2f}{r['bytes_per_image']:>7}"
            f"{r['verify_seconds']:>10.2f}"
        )
    if args.json_out:
        Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
        machine = {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "processor": platform.processor() or platform.machine(),
        }
        Path(args.json_out).write_text(json.dumps({"machine": machine, "rows": rows}, indent=1))
    return 0 if all(r["verify_problems"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())

"""Command-line plumbing shared by the dataset converters (``python -m shards.<name>``).

Every converter takes ``--src RAW_DIR --out DIR [--shard-size K] [--overwrite]``; a raw
directory that does not have the dataset's layout is one error line naming what was
expected (exit code 2, like any argparse usage error), never a traceback.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from shards.imageio import default_workers


class LayoutError(ValueError):
    """The raw dataset directory does not look like the dataset as its authors ship it."""


def converter_parser(prog: str, description: str) -> argparse.ArgumentParser:
    """Parser with the flags every converter shares; converters add their own."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description=description,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--src",
        required=True,
        type=Path,
        help="root of the raw dataset, laid out as its authors distribute it",
    )
    parser.add_argument("--out", required=True, type=Path, help="shard dataset directory to write")
    parser.add_argument(
        "--shard-size",
        type=positive_int,
        default=1000,
        help="samples (groups or gallery images) per tar shard",
    )
    parser.add_argument(
        "--group-size",
        type=positive_int,
        default=8,
        help="most member images in one training group (at least 2)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    parser.add_argument(
        "--read-threads",
        dest="workers",
        type=positive_int,
        default=default_workers(),
        help="threads reading and checking images",
    )
    parser.add_argument(
        "--log-level", default="WARNING", choices=["DEBUG", "INFO", "WARNING", "ERROR"]
    )
    return parser


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def run_converter(
    parser: argparse.ArgumentParser,
    convert: Callable[[argparse.Namespace], dict[str, Any]],
    argv: list[str] | None = None,
) -> dict[str, Any]:
    """Parse ``argv``, run ``convert(args)`` and print the dataset summary.

    Wrong layouts and an existing ``--out`` become ``parser.error`` (exit code 2).
    """
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(levelname)s %(name)s: %(message)s")
    if getattr(args, "group_size", 2) < 2:
        parser.error("--group-size must be at least 2 (a reference and a target)")
    if not args.src.is_dir():
        parser.error(f"--src {args.src}: no such directory")
    try:
        manifest = convert(args)
    except (LayoutError, FileExistsError) as err:
        parser.error(str(err))
    print(format_summary(manifest, args.out))
    return manifest


def require_file(path: Path, what: str) -> Path:
    """``path`` if it is a file, else a ``LayoutError`` saying what it should be."""
    if not path.is_file():
        raise LayoutError(f"{path} not found: expected {what}")
    return path


def require_dir(path: Path, what: str) -> Path:
    """``path`` if it is a directory, else a ``LayoutError`` saying what it should be."""
    if not path.is_dir():
        raise LayoutError(f"{path} not found: expected {what}")
    return path


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def source_info(src: Path, files: Iterable[Path]) -> dict[str, Any]:
    """Manifest ``source``: the raw root and sha256 of each annotation file (relative names)."""
    src = Path(src)
    checksums = {}
    for path in sorted(set(files)):
        checksums[str(Path(path).relative_to(src))] = sha256_file(path)
    return {"path": str(src.resolve()), "checksums": checksums}


def format_summary(manifest: dict[str, Any], out: Path) -> str:
    """Table of what a conversion wrote (splits, evals, size)."""
    lines = [f"{out}: {manifest['name']} dataset, {manifest['bytes'] / 1e6:.2f} MB in shards"]
    for split, info in manifest["splits"].items():
        lines.append(
            f"  split {split:<14} {info['kind']:<8} {info['samples']:>8} samples "
            f"{info['images']:>8} images {len(info['shards']):>5} shards"
        )
    for name, ev in manifest["evals"].items():
        lines.append(f"  eval  {name:<14} gallery {ev['gallery']:<14} {ev['count']:>8} queries")
    raw = manifest.get("extra", {}).get("raw_bytes")
    if raw:
        lines.append(
            f"  raw images + annotations used: {raw / 1e6:.2f} MB "
            f"(shards are {manifest['bytes'] / raw:.2f}x)"
        )
    lines.append(f"  skipped: {manifest['skipped_count']} (reasons in manifest.json)")
    return "\n".join(lines)

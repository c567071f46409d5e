"""Steps every converter shares: checking source images, writing groups and galleries.

A converter (1) reads the dataset's annotation files, (2) checks every image they name
with ``ImageTable`` (unusable images are recorded in the writer's ``skipped`` list),
(3) builds training groups and gallery entries from the usable images only, and
(4) writes them with ``write_groups`` / ``write_gallery``, which read image bytes in
threads and keep them encoded.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from tqdm import tqdm

from shards.imageio import CheckedImage, EncodedImage, ImageError, check_images, read_images
from shards.writer import DatasetWriter

ImageSource = CheckedImage | EncodedImage


class ImageTable:
    """Usable source images of one conversion, by path, with unusable ones skipped.

    Items in the skipped list are named relative to ``root`` (the raw dataset folder).
    """

    def __init__(self, writer: DatasetWriter, root: Path, workers: int):
        self.writer = writer
        self.root = Path(root)
        self.workers = workers
        self._usable: dict[str, CheckedImage] = {}
        self._errors: dict[str, str] = {}

    def check(self, paths: Iterable[Path], desc: str = "checking images") -> None:
        """Decode every not yet checked path; record the unusable ones as skipped."""
        todo = [str(p) for p in paths if str(p) not in self._usable and str(p) not in self._errors]
        for path, outcome in check_images(todo, workers=self.workers, desc=desc).items():
            if isinstance(outcome, ImageError):
                self._errors[path] = outcome.reason
                self.writer.skip(self.name(path), outcome.reason)
            else:
                self._usable[path] = outcome

    def get(self, path: Path) -> CheckedImage | None:
        """The checked image, or None when it is unusable (or was never checked)."""
        return self._usable.get(str(path))

    def reason(self, path: Path) -> str:
        """Why ``path`` is not usable (for skip records of things that need it)."""
        return self._errors.get(str(path), "image not checked")

    def name(self, path: Path | str) -> str:
        """``path`` relative to the raw root, as it appears in skip records."""
        try:
            return str(Path(path).relative_to(self.root))
        except ValueError:
            return str(path)


def write_groups(writer: DatasetWriter, split: str, groups: list[tuple[dict[str, Any],
                 list[ImageSource]]], *, workers: int, desc: str = "writing groups") -> None:
    """Write ``(group json, member images)`` as ``g%07d`` samples of ``split``.

    ``group json`` gets its ``"group"`` key set to the sample key.
    """
    flat = (image for _, images in groups for image in images)
    stream = read_images(flat, workers=workers)
    for number, (group, images) in enumerate(tqdm(groups, desc=desc, unit="group", leave=False)):
        key = f"g{number:07d}"
        encoded = [next(stream) for _ in images]
        writer.add_group(split, key, {"group": key, **group}, [(e.data, e.ext) for e in encoded])


def write_gallery(writer: DatasetWriter, split: str,
                  entries: list[tuple[dict[str, Any], ImageSource]], *, workers: int,
                  desc: str = "writing gallery") -> None:
    """Write ``(meta, image)`` catalogue entries as ``i%07d`` samples of ``split``."""
    stream = read_images((image for _, image in entries), workers=workers)
    for number, ((meta, _), image) in enumerate(
            tqdm(zip(entries, stream), total=len(entries), desc=desc, unit="img", leave=False)):
        writer.add_gallery(split, f"i{number:07d}", meta, image.data, image.ext)


def group_shard_size(shard_size: int, groups: list[tuple[dict[str, Any], list]]) -> int:
    """Groups per train shard so that a train shard holds about ``shard_size`` images."""
    images = sum(len(members) for _, members in groups)
    if not groups or not images:
        return shard_size
    return max(1, round(shard_size * len(groups) / images))


def stored_ext(sources: Iterable[ImageSource]) -> str:
    """The most common stored extension (the manifest's ``image_ext``); ``jpg`` if none."""
    counts = Counter(s.ext for s in sources)
    return counts.most_common(1)[0][0] if counts else "jpg"


def raw_bytes(sources: Iterable[ImageSource], annotation_files: Iterable[Path]) -> int:
    """Bytes of the distinct source image files used plus the annotation files."""
    files = {s.path: s.nbytes for s in sources if isinstance(s, CheckedImage)}
    return sum(files.values()) + sum(Path(p).stat().st_size for p in set(annotation_files))

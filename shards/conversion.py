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


class NamedImages:
    """Images known by a dataset's own names (asins, CIRR names) over an ``ImageTable``.

    ``paths`` maps each name to its file; a needed name without a path is skipped once as
    ``missing_item`` (formatted with ``name``) with reason "missing image file".
    ``problem`` says why a name cannot be used; ``usable`` / ``in_gallery`` record a skip
    for the annotation entry that needs it.
    """

    def __init__(
        self,
        paths: dict[str, Path],
        table: ImageTable,
        *,
        missing_item: str = "{name}",
        missing_reason: str = "missing image file",
    ):
        self.paths, self.table = paths, table
        self.missing_item, self.missing_reason = missing_item, missing_reason

    def check(self, names: Iterable[str], desc: str = "checking images") -> None:
        names = set(names)
        for name in sorted(names - self.paths.keys()):
            self.table.writer.skip(self.missing_item.format(name=name), self.missing_reason)
        self.table.check((self.paths[n] for n in sorted(names) if n in self.paths), desc=desc)

    def image(self, name: str) -> CheckedImage:
        """The checked image of a usable name."""
        checked = self.table.get(self.paths[name])
        if checked is None:
            raise KeyError(f"image {name!r} is not usable")
        return checked

    def problem(self, name: str) -> str | None:
        if name not in self.paths:
            return f"image {name} missing"
        if self.table.get(self.paths[name]) is None:
            return f"image {name} unusable ({self.table.reason(self.paths[name])})"
        return None

    def usable(self, where: str, what: str, *names: str) -> bool:
        """True when every name is usable; else skip ``where`` naming the first problem."""
        for name in names:
            if (problem := self.problem(name)) is not None:
                self.table.writer.skip(where, f"{what} with unusable image: {problem}")
                return False
        return True

    def in_gallery(self, where: str, what: str, gallery: Iterable[str], *names: str | None) -> bool:
        """True when every (non-None) name is in ``gallery``; else skip ``where``."""
        for name in names:
            if name is None or name in gallery:
                continue
            problem = self.problem(name) or f"image {name} is not in the split's image list"
            self.table.writer.skip(where, f"{what} with unknown or unusable image: {problem}")
            return False
        return True


def write_groups(
    writer: DatasetWriter,
    split: str,
    groups: list[tuple[dict[str, Any], list[ImageSource]]],
    *,
    workers: int,
    desc: str = "writing groups",
) -> list[ImageSource]:
    """Write ``(group json, member images)`` as ``g%07d`` samples of ``split``.

    ``group json`` gets its ``"group"`` key set to the sample key. Returns the images
    written (one entry per stored copy).
    """
    flat = (image for _, images in groups for image in images)
    stream = read_images(flat, workers=workers)
    bar = tqdm(groups, desc=desc, unit="group", leave=False, disable=None)
    for number, (group, images) in enumerate(bar):
        key = f"g{number:07d}"
        encoded = [next(stream) for _ in images]
        writer.add_group(split, key, {"group": key, **group}, [(e.data, e.ext) for e in encoded])
    return [image for _, images in groups for image in images]


def write_gallery(
    writer: DatasetWriter,
    split: str,
    entries: list[tuple[dict[str, Any], ImageSource]],
    *,
    workers: int,
    desc: str = "writing gallery",
) -> list[ImageSource]:
    """Write ``(meta, image)`` catalogue entries as ``i%07d`` samples of ``split``;
    returns the images written."""
    stream = read_images((image for _, image in entries), workers=workers)
    bar = tqdm(
        zip(entries, stream), total=len(entries), desc=desc, unit="img", leave=False, disable=None
    )
    for number, ((meta, _), image) in enumerate(bar):
        writer.add_gallery(split, f"i{number:07d}", meta, image.data, image.ext)
    return [image for _, image in entries]


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
    """Bytes of the distinct source image files written plus the annotation files."""
    files = {s.path: s.nbytes for s in sources if isinstance(s, CheckedImage)}
    return sum(files.values()) + sum(Path(p).stat().st_size for p in set(annotation_files))

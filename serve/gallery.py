"""The gallery index of an artifact directory (``ART_DIR/index``, written by export.index).

Everything large is memory-mapped, never read whole: ``embeddings.npy`` (N, D) target
embeddings, ``repr_<name>.npy`` (N, ...) stored image representations, ``images.bin`` +
``image_offsets.npy`` the encoded catalogue images. Ids are looked up in ``ids.json``;
no id is ever used as a path (serving's ``GET /images/{id}`` reads a byte range of
``images.bin``). A damaged index is refused at load with a ``GalleryIndexError`` that
names the file and what is wrong: unreadable or malformed files, shapes that disagree,
and embeddings or stored representations that are not finite (they would rank by NaN).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

INDEX_FORMAT = "composed-retrieval-index/1"

CONTENT_TYPES = {
    "png": "image/png",
    "jpg": "image/jpeg",
    "jpeg": "image/jpeg",
    "webp": "image/webp",
    "gif": "image/gif",
    "bmp": "image/bmp",
}


class GalleryIndexError(ValueError):
    """The index directory is missing, unfinished, or disagrees with its artifacts."""


class GalleryIndex:
    """Ids, metadata, embeddings, stored representations and image bytes of a gallery.

    ``embeddings`` is (N, D) (float16 or float32, unit rows); ``reprs[name]`` is (N, ...).
    """

    def __init__(
        self,
        index_dir: str | Path,
        repr_names: list[str] | None = None,
        checkpoint_sha256: str | None = None,
    ):
        self.dir = Path(index_dir)
        info_file = self.dir / "index.json"
        if not info_file.is_file():
            raise GalleryIndexError(
                f"{info_file}: missing (build the index with "
                "`python -m export.index --artifacts ART_DIR --data SHARDS`)"
            )
        self.info: dict[str, Any] = _read_json(info_file)
        if not isinstance(self.info, dict) or self.info.get("format") != INDEX_FORMAT:
            found = self.info.get("format") if isinstance(self.info, dict) else self.info
            raise GalleryIndexError(f"{info_file}: format {found!r}, expected {INDEX_FORMAT!r}")
        if not self.info.get("complete"):
            raise GalleryIndexError(
                f"{info_file}: the index build has not finished (complete is not "
                "true); rerun export.index, it resumes"
            )
        if checkpoint_sha256 and self.info.get("checkpoint_sha256") not in (
            None,
            checkpoint_sha256,
        ):
            raise GalleryIndexError(
                f"{info_file}: built from checkpoint {self.info['checkpoint_sha256'][:12]}, "
                f"but the artifacts hold {checkpoint_sha256[:12]}; rebuild the index"
            )
        try:
            self.count = int(self.info["count"])
            self.embed_dim = int(self.info["embed_dim"])
        except (KeyError, TypeError, ValueError) as err:
            raise GalleryIndexError(
                f"{info_file}: needs integer 'count' and 'embed_dim' ({err!r})"
            ) from None
        self.ids: list[str] = _read_json(self.dir / "ids.json")
        if not isinstance(self.ids, list) or not all(isinstance(i, str) for i in self.ids):
            raise GalleryIndexError(f"{self.dir / 'ids.json'}: expected a JSON list of id strings")
        if len(self.ids) != self.count:
            raise GalleryIndexError(
                f"{self.dir / 'ids.json'}: {len(self.ids)} ids, index.json says {self.count}"
            )
        self.row_of: dict[str, int] = {image_id: row for row, image_id in enumerate(self.ids)}
        self.embeddings = self._load_rows("embeddings.npy")
        if self.embeddings.shape != (self.count, self.embed_dim):
            raise GalleryIndexError(
                f"{self.dir / 'embeddings.npy'}: shape {self.embeddings.shape}, "
                f"expected ({self.count}, {self.embed_dim})"
            )
        names = repr_names if repr_names is not None else list(self.info.get("repr", {}))
        self.reprs = {name: self._load_rows(f"repr_{name}.npy") for name in names}
        self.image_offsets = _load_npy(self.dir / "image_offsets.npy")
        if self.image_offsets.shape != (self.count + 1,):
            raise GalleryIndexError(
                f"{self.dir / 'image_offsets.npy'}: shape {self.image_offsets.shape}, "
                f"expected ({self.count + 1},)"
            )
        images_file = self.dir / "images.bin"
        if not images_file.is_file():
            raise GalleryIndexError(f"{images_file}: missing from the index")
        size = images_file.stat().st_size
        if size < int(self.image_offsets[-1]):
            raise GalleryIndexError(
                f"{images_file}: {size} bytes, offsets end at {self.image_offsets[-1]}"
            )
        self.images = (
            np.memmap(images_file, dtype=np.uint8, mode="r") if size else np.zeros(0, np.uint8)
        )
        self._meta_file = self.dir / "meta.jsonl"
        self._meta_lines = _line_offsets(self._meta_file, self.count)
        self._meta_fd = os.open(self._meta_file, os.O_RDONLY)

    def _load_rows(self, name: str) -> np.ndarray:
        path = self.dir / name
        array = _load_npy(path, mmap_mode="r")
        if array.ndim < 1 or array.shape[0] != self.count:
            raise GalleryIndexError(
                f"{path}: shape {array.shape}, expected {self.count} rows (index.json's count)"
            )
        if array.dtype.kind != "f":
            raise GalleryIndexError(f"{path}: dtype {array.dtype}, expected float16 or float32")
        _check_finite(array, path)
        return array

    def __len__(self) -> int:
        return self.count

    def meta(self, row: int) -> dict[str, Any]:
        """The meta.jsonl record of one row (id, label, caption, category, ext)."""
        start, end = self._meta_lines[row], self._meta_lines[row + 1]
        return json.loads(os.pread(self._meta_fd, int(end - start), int(start)))

    def image_bytes(self, row: int) -> bytes:
        """The encoded catalogue image of one row, as stored by export.index."""
        return bytes(self.images[self.image_offsets[row] : self.image_offsets[row + 1]])

    def content_type(self, row: int) -> str:
        ext = str(self.meta(row).get("ext", "")).lower().lstrip(".")
        return CONTENT_TYPES.get(ext, "application/octet-stream")

    def gather_reprs(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        """Stored image representations of ``rows`` (R,) -> {name: (R, ...) float32}."""
        order = np.asarray(rows, dtype=np.int64)
        return {
            name: np.asarray(array[order], dtype=np.float32) for name, array in self.reprs.items()
        }

    def close(self) -> None:
        os.close(self._meta_fd)


def _read_json(path: Path) -> Any:
    """A JSON file of the index; ``GalleryIndexError`` naming it when missing or malformed."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise GalleryIndexError(f"{path}: missing from the index") from None
    except (OSError, UnicodeDecodeError) as err:
        raise GalleryIndexError(f"{path}: unreadable ({err})") from None
    except json.JSONDecodeError as err:
        raise GalleryIndexError(f"{path}: not valid JSON ({err})") from None


def _load_npy(path: Path, mmap_mode: str | None = None) -> np.ndarray:
    """A .npy file of the index (never pickled objects); ``GalleryIndexError`` when bad."""
    if not path.is_file():
        raise GalleryIndexError(f"{path}: missing from the index")
    try:
        return np.load(path, mmap_mode=mmap_mode, allow_pickle=False)
    except (OSError, ValueError, EOFError) as err:
        raise GalleryIndexError(f"{path}: not a readable .npy array ({err})") from None


def _check_finite(array: np.ndarray, path: Path, chunk_rows: int = 65536) -> None:
    """Refuse an array with NaN or infinite values, read in chunks (it is memory-mapped)."""
    for start in range(0, len(array), chunk_rows):
        block = np.asarray(array[start : start + chunk_rows])
        if not np.isfinite(block).all():
            bad = start + int(np.flatnonzero(~np.isfinite(block).reshape(len(block), -1).all(1))[0])
            raise GalleryIndexError(
                f"{path}: row {bad} holds NaN or infinite values (a diverged model or a "
                "damaged file); rebuild the index"
            )


def _line_offsets(path: Path, count: int) -> np.ndarray:
    """Byte offsets of the first ``count`` lines of a JSONL file, plus the end: (count + 1,)."""
    if not path.is_file():
        raise GalleryIndexError(f"{path}: missing from the index")
    offsets = [0]
    with open(path, "rb") as fh:
        for line in fh:
            if line.strip():
                offsets.append(offsets[-1] + len(line))
            else:
                offsets[-1] += len(line)  # skip blank lines (a trailing newline)
    if len(offsets) - 1 != count:
        raise GalleryIndexError(f"{path}: {len(offsets) - 1} records, index.json says {count}")
    return np.asarray(offsets, dtype=np.int64)

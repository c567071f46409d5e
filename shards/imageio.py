"""Reading and validating the source image files of a raw dataset.

Converters keep each image's original encoded bytes (no re-encoding, so shards stay the
raw dataset's size and quality). An image is accepted when PIL can open it and decode all
of its pixel data; RGB/grey JPEG and 8-bit PNG are kept as they are, anything else the
reader's decoder would not take as is (GIF, WEBP, BMP, TIFF, 16-bit PNG, CMYK JPEG, ...)
is converted once to an 8-bit RGB PNG with ``pipeline.images.pil_to_rgb``'s scaling, the
same picture that serving makes of the same file.

Conversion is two passes over the images: ``check_images`` decodes every image once (in
threads) and says which ones are usable and with which extension, then the writer pass
reads the accepted files' bytes again with ``read_images`` (no second decode).
"""

from __future__ import annotations

import io
import logging
import os
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from pipeline.images import pil_to_rgb

log = logging.getLogger(__name__)

# PIL format -> extension kept in the shards; PNG modes the reader decodes to 8-bit RGB.
KEPT_FORMATS = {"JPEG": "jpg", "PNG": "png"}
KEPT_PNG_MODES = {"1", "L", "LA", "P", "RGB", "RGBA"}
KEPT_JPEG_MODES = {"L", "RGB"}  # nvJPEG and every reader decode these alike
# JPEGs are validated at 1/8 scale: the decoder still reads every byte (a truncated
# file fails) but does an eighth of the work.
_DRAFT_SIZE = (64, 64)


class ImageError(ValueError):
    """A source image that cannot be used; ``reason`` is what goes into the manifest."""

    def __init__(self, path: str | Path, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason


@dataclass(frozen=True)
class CheckedImage:
    """A usable source image: the extension it is stored with and whether it is converted."""

    path: str
    ext: str
    nbytes: int
    convert: bool = False


@dataclass(frozen=True)
class EncodedImage:
    """Image bytes as stored in a shard, with their extension (``jpg`` or ``png``)."""

    data: bytes
    ext: str


def default_workers() -> int:
    """Threads for image reading: PIL releases the GIL while decoding."""
    return min(8, os.cpu_count() or 1)


def check_image(path: str | Path) -> CheckedImage:
    """Decode ``path`` fully; return how it will be stored or raise ``ImageError``."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ImageError(path, "missing image file") from None
    except OSError as err:
        raise ImageError(path, f"unreadable image file: {err.strerror or err}") from None
    if not data:
        raise ImageError(path, "empty image file")
    try:
        with Image.open(io.BytesIO(data)) as image:
            fmt, mode = image.format, image.mode
            if fmt == "JPEG":
                image.draft("RGB", _DRAFT_SIZE)
            image.load()
    except Image.DecompressionBombError as err:
        raise ImageError(path, f"image too large: {err}") from None
    except Exception as err:  # noqa: BLE001 - PIL raises many types for corrupt data
        raise ImageError(path, _decode_reason(err)) from None
    keep = (fmt == "PNG" and mode in KEPT_PNG_MODES and png_bit_depth(data) <= 8) or (
        fmt == "JPEG" and mode in KEPT_JPEG_MODES
    )
    ext = KEPT_FORMATS[fmt] if keep else "png"
    return CheckedImage(str(path), ext, len(data), convert=not keep)


def encoded_image(image: CheckedImage | EncodedImage) -> EncodedImage:
    """What goes into the shards for an image: the checked file itself, or its PNG."""
    if isinstance(image, EncodedImage):
        return image
    data = Path(image.path).read_bytes()
    if not image.convert:
        return EncodedImage(data, image.ext)
    with Image.open(io.BytesIO(data)) as decoded:
        rgb = Image.fromarray(pil_to_rgb(decoded), mode="RGB")
    out = io.BytesIO()
    rgb.save(out, format="PNG")
    return EncodedImage(out.getvalue(), "png")


def png_bit_depth(data: bytes) -> int:
    """Bits per sample of a PNG (its IHDR chunk); Pillow shows 16-bit RGB as mode RGB."""
    return data[24] if len(data) > 24 and data[12:16] == b"IHDR" else 8


def check_images(
    paths: Iterable[str | Path], *, workers: int | None = None, desc: str = "checking images"
) -> dict[str, CheckedImage | ImageError]:
    """Check many images in threads: path -> ``CheckedImage`` or the ``ImageError``."""
    unique = list(dict.fromkeys(str(p) for p in paths))
    results: dict[str, CheckedImage | ImageError] = {}
    with ThreadPoolExecutor(max_workers=workers or default_workers()) as pool:
        outcomes = pool.map(_check_or_error, unique)
        for path, outcome in tqdm(
            zip(unique, outcomes),
            total=len(unique),
            desc=desc,
            unit="img",
            leave=False,
            disable=None,
        ):
            results[path] = outcome
    bad = sum(isinstance(r, ImageError) for r in results.values())
    log.info("%s: %d usable, %d unusable", desc, len(results) - bad, bad)
    return results


def read_images(
    images: Iterable[CheckedImage | EncodedImage], *, workers: int | None = None, window: int = 256
) -> Iterator[EncodedImage]:
    """``encoded_image`` of each of ``images`` in order, read ahead by a thread pool.

    At most ``window`` images are held in memory at once.
    """
    images = iter(images)
    with ThreadPoolExecutor(max_workers=workers or default_workers()) as pool:
        pending: deque = deque()
        for image in images:
            pending.append(pool.submit(encoded_image, image))
            if len(pending) >= window:
                yield pending.popleft().result()
        for future in pending:
            yield future.result()


def _check_or_error(path: str) -> CheckedImage | ImageError:
    try:
        return check_image(path)
    except ImageError as err:
        return err


def _decode_reason(err: Exception) -> str:
    text = str(err) or type(err).__name__
    if "truncated" in text.lower():
        return f"truncated image: {text}"
    if type(err).__name__ == "UnidentifiedImageError":
        return "not an image (unknown format)"
    return f"corrupt image: {text}"

"""Crafted inputs for the hostile-input tests and ``bench/serve_load.py``: PNGs written
byte by byte (any header, 16-bit samples), every Pillow mode of one picture, and a
checkpoint whose pickle would run code."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def raw_png(width: int, height: int, bit_depth: int, color_type: int, rows: bytes) -> bytes:
    """A PNG with exactly this IHDR and ``rows`` (filter byte + samples per row) as IDAT;
    the header may claim any size, whatever the pixel data holds."""
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return (
        PNG_SIGNATURE
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", zlib.compress(rows))
        + png_chunk(b"IEND", b"")
    )


def header_only_png(width: int, height: int) -> bytes:
    """An 8-bit RGB PNG header of ``width`` x ``height`` with a few bytes of pixel data."""
    return raw_png(width, height, 8, 2, b"\x00" * 64)


def png16(array16: np.ndarray) -> bytes:
    """A 16-bit PNG of a uint16 (H, W, 3) RGB or (H, W) grey array."""
    color_type = 2 if array16.ndim == 3 else 0
    height, width = array16.shape[:2]
    big_endian = array16.astype(">u2").reshape(height, -1)
    rows = b"".join(b"\x00" + row.tobytes() for row in big_endian)
    return raw_png(width, height, 16, color_type, rows)


def encode(image: Image.Image, fmt: str = "PNG", **options) -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt, **options)
    return out.getvalue()


def picture(width: int = 40, height: int = 30) -> np.ndarray:
    """A smooth uint8 RGB (H, W, 3) picture with few distinct colours (so a palette holds
    it exactly) and gradients (so JPEG keeps it close)."""
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([(x * 6) % 256, (y * 8) % 256, ((x + y) * 4) % 256], axis=-1)
    return (rgb // 8 * 8).astype(np.uint8)


def modes_of(rgb: np.ndarray) -> dict[str, tuple[bytes, np.ndarray]]:
    """The same picture in every mode serving must accept: name -> (encoded bytes, the
    uint8 RGB (H, W, 3) it must decode to)."""
    image = Image.fromarray(rgb, "RGB")
    palette = image.convert("P", palette=Image.ADAPTIVE, colors=256)
    grey = np.asarray(image.convert("L"))
    grey_rgb = np.repeat(grey[..., None], 3, axis=2)
    return {
        "rgb8_png": (encode(image), rgb),
        "rgb16_png": (png16(rgb.astype(np.uint16) * 257), rgb),
        "grey16_png": (png16(grey.astype(np.uint16) * 257), grey_rgb),
        "palette_png": (encode(palette), np.asarray(palette.convert("RGB"))),
        "la_png": (encode(image.convert("LA")), grey_rgb),
        "rgba_png": (encode(image.convert("RGBA")), rgb),
        "cmyk_jpeg": (encode(image.convert("CMYK"), "JPEG", quality=100), rgb),
        "i16_tiff": (encode(Image.fromarray(grey.astype(np.int32) * 257, "I"), "TIFF"), grey_rgb),
        "i8_tiff": (encode(Image.fromarray(grey.astype(np.int32), "I"), "TIFF"), grey_rgb),
        "f_tiff": (
            encode(Image.fromarray(grey.astype(np.float32) / 255.0, "F"), "TIFF"),
            grey_rgb,
        ),
    }


# Lossy encodings: compared with a tolerance, the others exactly.
LOSSY_MODES = {"cmyk_jpeg"}


class PickleBomb:
    """Unpickling this object runs ``open(path, "w")``: a file appears if code ran."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))

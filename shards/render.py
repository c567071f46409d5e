"""Render CSS-style scenes: coloured shapes on a 3x3 grid, seen from above.

The scenes follow the CSS dataset of TIRG (Vo et al., CVPR 2019): each object has a
shape, one of eight colours, a size and a grid cell. Drawing happens at 4x the requested
size and is downsampled with a Lanczos filter, which anti-aliases the edges at any output
size (64 px for the CSS default, 128/224 px for realism).

``render_scene`` is shared with ``shards.css3d``; keep its signature stable.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from PIL import Image, ImageDraw

SHAPES = ("rectangle", "circle", "triangle")
COLORS = ("gray", "red", "blue", "green", "brown", "purple", "cyan", "yellow")
SIZES = ("small", "large")
GRID = 3

RGB = {
    "gray": (128, 128, 128),
    "red": (215, 40, 40),
    "blue": (40, 75, 215),
    "green": (35, 155, 55),
    "brown": (135, 85, 35),
    "purple": (135, 50, 170),
    "cyan": (40, 200, 215),
    "yellow": (235, 205, 30),
}
BACKGROUND = (250, 250, 250)
SUPERSAMPLE = 4
# Half-extent of an object as a fraction of the cell width.
HALF_EXTENT = {"small": 0.19, "large": 0.36}
# Empty border kept between an object and its cell edge, and the fraction of the
# remaining slack that jitter may use ("slightly" within the cell).
CELL_MARGIN = 0.04
JITTER_FRACTION = 0.5


class UniformSource(Protocol):
    """Anything with ``uniform(low, high)``: ``random.Random`` or ``numpy.random.Generator``."""

    def uniform(self, low: float, high: float) -> float: ...


def render_scene(
    objects: Sequence[Mapping[str, Any]], image_size: int, rng_jitter: UniformSource | None = None
) -> Image.Image:
    """Draw ``objects`` on an ``image_size`` x ``image_size`` RGB canvas.

    Each object is ``{"shape": one of SHAPES, "color": one of COLORS, "size": "small" |
    "large", "pos": (row, col)}`` with row/col in 0..2 (floats allowed: the object is
    centred at the continuous position). With ``rng_jitter`` every object is shifted by a
    small random offset that keeps it inside its cell; without it objects sit centred.
    """
    if image_size < 8:
        raise ValueError(f"image_size must be >= 8 pixels, got {image_size}")
    canvas = image_size * SUPERSAMPLE
    cell = canvas / GRID
    image = Image.new("RGB", (canvas, canvas), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for obj in objects:
        shape, color, size, (row, col) = _checked(obj)
        half = HALF_EXTENT[size] * cell
        cx, cy = (col + 0.5) * cell, (row + 0.5) * cell
        if rng_jitter is not None:
            slack = JITTER_FRACTION * max(0.0, 0.5 * cell - half - CELL_MARGIN * cell)
            cx += rng_jitter.uniform(-slack, slack)
            cy += rng_jitter.uniform(-slack, slack)
        fill = RGB[color]
        if shape == "rectangle":
            draw.rectangle((cx - half, cy - half, cx + half, cy + half), fill=fill)
        elif shape == "circle":
            draw.ellipse((cx - half, cy - half, cx + half, cy + half), fill=fill)
        else:
            draw.polygon(
                [(cx, cy - half), (cx + half, cy + half), (cx - half, cy + half)], fill=fill
            )
    return image.resize((image_size, image_size), Image.Resampling.LANCZOS)


IMAGE_FORMATS = ("png", "jpg")  # the extensions the CSS generators write


def encode_png(image: Image.Image) -> bytes:
    """PNG bytes of ``image`` (deterministic: PIL writes no timestamp)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def encode_jpeg(image: Image.Image, quality: int = 90) -> bytes:
    """Baseline JPEG bytes of an RGB ``image`` (4:2:0 chroma, deterministic, no EXIF):
    the kind of file a photo catalogue holds and nvJPEG decodes on the GPU."""
    if not 1 <= quality <= 100:
        raise ValueError(f"JPEG quality must be in [1, 100], got {quality}")
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG", quality=quality, subsampling="4:2:0")
    return buffer.getvalue()


def encode_image(image: Image.Image, image_format: str, quality: int = 90) -> bytes:
    """``image`` as ``image_format`` bytes (one of ``IMAGE_FORMATS``; ``quality`` is JPEG's)."""
    if image_format == "png":
        return encode_png(image)
    if image_format == "jpg":
        return encode_jpeg(image, quality)
    raise ValueError(f"image format must be one of {IMAGE_FORMATS}, got {image_format!r}")


def _checked(obj: Mapping[str, Any]) -> tuple[str, str, str, tuple[float, float]]:
    shape, color, size = obj.get("shape"), obj.get("color"), obj.get("size")
    if shape not in SHAPES:
        raise ValueError(f"object {dict(obj)!r}: shape must be one of {SHAPES}")
    if color not in COLORS:
        raise ValueError(f"object {dict(obj)!r}: color must be one of {COLORS}")
    if size not in SIZES:
        raise ValueError(f"object {dict(obj)!r}: size must be one of {SIZES}")
    pos = obj.get("pos")
    if (
        not isinstance(pos, Sequence)
        or len(pos) != 2
        or not all(isinstance(v, int | float) and 0 <= v <= GRID - 1 for v in pos)
    ):
        raise ValueError(f"object {dict(obj)!r}: pos must be (row, col) with values in 0..2")
    return shape, color, size, (float(pos[0]), float(pos[1]))

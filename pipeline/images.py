"""Image decoding and preprocessing shared by training, evaluation, export and serving.

Images stay encoded (JPEG/PNG) in the shards; ``decode_image`` turns bytes into a
uint8 RGB tensor (3, H, W), on the GPU for JPEG when a CUDA device is given (nvJPEG).
Every image mode reaches the network as the same 8-bit RGB picture: 16-bit PNGs are
scaled (not passed on as uint16), and formats or modes torchvision cannot read (TIFF,
BMP, I, F, ...) go through Pillow with ``pil_to_rgb``'s scaling rules.
``ImagePreprocess`` resizes the shorter side to ``size``, centre-crops to
(size, size) and normalises with the ImageNet mean/std -- the input every model
expects (``pipeline.models.base``). ``to_dict`` records exactly these steps for
export's ``artifacts.json`` so serving can reproduce them. ``check_image_geometry``
bounds an upload's sides and aspect ratio from its header, before anything is decoded.
"""

from __future__ import annotations

import io
import math
import random
import warnings
from collections.abc import Sequence

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.io import decode_image as _tv_decode_image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_JPEG_MAGIC = b"\xff\xd8\xff"
# Pillow modes that hold 16-bit samples; "I" (32-bit int) and "F" (float) are scaled by
# the smallest standard range that holds their values (see ``pil_to_rgb``).
_PIL_16BIT_MODES = {"I;16", "I;16B", "I;16L", "I;16N"}


class ImageGeometryError(ValueError):
    """An image whose size (pixels, a side, or its aspect ratio) is over a limit."""


def check_image_geometry(
    width: int, height: int, *, max_pixels: int, max_side: int, max_aspect_ratio: float
) -> None:
    """Raise ``ImageGeometryError`` naming the limit when a ``width`` x ``height`` image is
    over any of them. Read from the header: nothing is decoded before this passes."""
    if width < 1 or height < 1:
        raise ImageGeometryError(f"the image is {width}x{height} pixels: a side is empty")
    if max(width, height) > max_side:
        raise ImageGeometryError(
            f"the image is {width}x{height} pixels; each side may be at most {max_side}"
        )
    if width * height > max_pixels:
        raise ImageGeometryError(
            f"the image is {width}x{height} pixels; at most {max_pixels} pixels are accepted"
        )
    aspect = max(width, height) / min(width, height)
    if aspect > max_aspect_ratio:
        raise ImageGeometryError(
            f"the image is {width}x{height} pixels (aspect ratio {aspect:.1f}:1); at most "
            f"{max_aspect_ratio:g}:1 is accepted"
        )


def pil_to_rgb(image) -> np.ndarray:
    """A Pillow image of any mode -> uint8 RGB array (H, W, 3) on the 0-255 scale.

    16-bit modes are scaled by 255/65535. ``I`` (32-bit int) and ``F`` (float) carry no
    range of their own: values are read on the smallest of [0, 1] (``F`` only), [0, 255]
    and [0, 65535] that holds the image's maximum, then clipped. Palette, LA, CMYK, RGBA
    and the rest go through Pillow's own RGB conversion (alpha is dropped, as
    torchvision's RGB decoding drops it).
    """
    mode = image.mode
    if mode not in _PIL_16BIT_MODES and mode not in ("I", "F"):
        return np.asarray(image.convert("RGB"))
    values = np.nan_to_num(np.asarray(image, dtype=np.float64), nan=0.0, posinf=0.0)
    top = float(values.max()) if values.size else 0.0
    if mode in _PIL_16BIT_MODES or top > 255:
        scale = 65535.0
    elif mode == "F" and top <= 1.0:
        scale = 1.0
    else:
        scale = 255.0
    gray = np.rint(np.clip(values / scale, 0.0, 1.0) * 255.0).astype(np.uint8)
    return np.repeat(gray[..., None], 3, axis=2)


def decode_with_pil(data: bytes) -> torch.Tensor:
    """Encoded bytes -> uint8 (3, H, W) through Pillow (formats and modes torchvision's
    decoder lacks); raises ``ValueError`` when Pillow cannot decode them either."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as image:
            rgb = pil_to_rgb(image)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise ValueError(
            f"cannot decode image ({len(data)} bytes, starts {bytes(data[:8])!r}): corrupt "
            f"or unsupported image data: {err}"
        ) from err
    # one explicit copy: Pillow's arrays are read-only, and a permuted view of a 1x1
    # image already counts as contiguous, so .contiguous() would not have copied it
    return torch.from_numpy(np.array(rgb.transpose(2, 0, 1), order="C"))


def to_uint8(image: torch.Tensor) -> torch.Tensor:
    """uint16 samples (16-bit PNGs) -> uint8 on the same scale; uint8 passes through."""
    if image.dtype == torch.uint8:
        return image
    if image.dtype == torch.uint16:
        wide = image.to(torch.int32)
        return ((wide * 255 + 32767) // 65535).to(torch.uint8)
    raise ValueError(f"decoded image has dtype {image.dtype}, expected uint8 or uint16")


def is_jpeg(data: bytes) -> bool:
    """True when ``data`` starts with the JPEG start-of-image marker."""
    return bytes(data[:3]) == _JPEG_MAGIC


def decode_image(data: bytes | torch.Tensor, device: str | torch.device = "cpu") -> torch.Tensor:
    """Encoded image bytes -> uint8 RGB tensor (3, H, W) on ``device``.

    JPEG bytes are decoded by nvJPEG when ``device`` is CUDA; other formats are decoded
    on the CPU and moved; 16-bit samples are scaled to 8 bits; what torchvision cannot
    read goes through Pillow (``decode_with_pil``). A uint8 tensor (an image a loader
    worker already decoded, see ``predecode_for_gpu``) is only moved. Raises
    ``ValueError`` for empty or undecodable (corrupt) bytes.
    """
    if isinstance(data, torch.Tensor):
        return data.to(device, non_blocking=True)
    if not data:
        raise ValueError("cannot decode image: empty bytes (corrupt or missing image)")
    raw = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    device = torch.device(device)
    try:
        with warnings.catch_warnings():
            # torchvision 0.29 deprecates its decoders in favour of TorchCodec, which is not
            # a dependency here; the warning would repeat for every image
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            if device.type == "cuda" and is_jpeg(data):
                image = decode_jpeg(raw, mode=ImageReadMode.RGB, device=device)
            else:
                image = _tv_decode_image(raw, mode=ImageReadMode.RGB)
    except (RuntimeError, ValueError):
        image = decode_with_pil(bytes(data))  # TIFF, BMP, ...; raises ValueError if corrupt
    image = to_uint8(image)
    if image.ndim != 3 or image.shape[0] != 3 or image.shape[1] == 0 or image.shape[2] == 0:
        raise ValueError(
            f"decoded image has shape {tuple(image.shape)}, expected (3, H, W): corrupt"
        )
    return image.to(device)


def predecode_for_gpu(data: bytes) -> bytes | torch.Tensor:
    """What a loader worker hands a CUDA training process: JPEG bytes stay encoded for
    one batched nvJPEG call on the GPU, anything else (PNG: nvJPEG cannot decode it) is
    decoded here, in the worker, so it runs in parallel with the training step instead of
    serialised with it in the main process. Raises ``ValueError`` like ``decode_image``.
    """
    return data if data and is_jpeg(data) else decode_image(data)


def decode_images(
    datas: Sequence[bytes | torch.Tensor], device: str | torch.device = "cpu"
) -> list[torch.Tensor]:
    """Decode a list of images; on CUDA all JPEGs go to nvJPEG in one batched call
    (already decoded uint8 tensors are moved to ``device``).

    Raises ``ValueError`` naming the position of the first undecodable image.
    """
    device = torch.device(device)
    if device.type != "cuda":
        return [_decode_at(i, d, device) for i, d in enumerate(datas)]
    out: list[torch.Tensor | None] = [None] * len(datas)
    jpeg_pos = [
        i for i, d in enumerate(datas) if not isinstance(d, torch.Tensor) and d and is_jpeg(d)
    ]
    if jpeg_pos:
        raws = [torch.frombuffer(bytearray(datas[i]), dtype=torch.uint8) for i in jpeg_pos]
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", category=DeprecationWarning)
                decoded = decode_jpeg(raws, mode=ImageReadMode.RGB, device=device)
            for i, img in zip(jpeg_pos, decoded):
                out[i] = img
        except RuntimeError:
            pass  # one bad JPEG fails the whole batch: fall back to one by one below
    return [
        img if img is not None else _decode_at(i, datas[i], device) for i, img in enumerate(out)
    ]


def _decode_at(position: int, data: bytes, device: torch.device) -> torch.Tensor:
    try:
        return decode_image(data, device)
    except ValueError as err:
        raise ValueError(f"image {position} of the batch: {err}") from err


def central_window(long: int, short: int, size: int) -> tuple[int, int, int] | None:
    """Where to cut an image with sides ``long`` > 2 x ``short`` (and ``short`` > ``size``)
    before resizing its shorter side to ``size`` and centre-cropping: ``(start, stop, first)``, the source
    pixels [start, stop) along the long axis and the first output pixel of the crop in
    the resized window. None for other images (they are resized whole).

    Cutting first keeps the resize's work and memory near the model's input whatever the
    aspect ratio (a 50000x2 upload would otherwise be resized to 5.6M x 224). The window
    is resized at the whole image's scale (``resize_window``) and starts on a source
    pixel that an output pixel starts on where one is near, so the kept square equals the
    whole image's resize and crop (to float rounding); otherwise the nearest start is
    used, off by less than half a source pixel (under half an output pixel). A margin keeps every kept pixel's filter
    window inside the cut.
    """
    if long <= 2 * short or short <= size:
        return None  # upscaled images stay small: whole, their resize is at most aspect x input
    new_long = int(size * long / short)  # torchvision's long side after the resize
    scale = long / new_long  # source pixels per output pixel
    top = int(round((new_long - size) / 2.0))  # TF.center_crop's first output pixel
    margin = math.ceil((max(scale, 1.0) + 2) / scale) + 1  # output pixels of filter reach
    candidates = range(top - margin, max(top - margin - 64, -1), -1)
    if not candidates:
        return None
    first_kept = min(candidates, key=lambda m: (abs(m * scale - round(m * scale)) > 1e-6, -m))
    start = round(first_kept * scale)
    stop = min(long, math.ceil((top + size + margin) * scale) + 1)
    return start, stop, top - first_kept


def resize_window(x: torch.Tensor, short_scale: float, long_scale: float, tall: bool):
    """Resize (..., h, w) by exact factors (output/input) on its short and long axes, the
    whole image's, so output pixel i of a window maps where the whole image's would."""
    factors = (long_scale, short_scale) if tall else (short_scale, long_scale)
    squeeze = x.ndim == 3
    out = torch.nn.functional.interpolate(
        x[None] if squeeze else x,
        scale_factor=factors,
        mode="bilinear",
        align_corners=False,
        antialias=True,
        recompute_scale_factor=False,
    )
    return out[0] if squeeze else out


def _to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 -> float32 in [0, 1]; float input is taken as already scaled."""
    return images.float().div_(255.0) if images.dtype == torch.uint8 else images.float()


def draw_crop_box(rng: random.Random, height: int, width: int) -> tuple[int, int, int, int] | None:
    """The training augmentation's crop: ``(top, left, h, w)`` covering 80-100 % of the
    area with aspect 3/4-4/3, or None when 10 draws found none inside the image (then
    the caller centre-crops)."""
    area = height * width
    for _ in range(10):
        target = area * rng.uniform(0.8, 1.0)
        ratio = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
        w = round(math.sqrt(target * ratio))
        h = round(math.sqrt(target / ratio))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, height - h), rng.randint(0, width - w), h, w
    return None


class ImagePreprocess:
    """uint8 (3, H, W) or (B, 3, H, W) -> float32 (..., 3, size, size), normalised.

    Resize the shorter side to ``size`` (bilinear, antialiased), centre-crop, scale to
    [0, 1], subtract ``mean`` and divide by ``std``. With ``augment`` a random crop of
    80-100 % of the area (aspect 3/4-4/3) replaces the centre crop. There is no
    horizontal flip: modification texts say "left"/"right" (CSS, Fashion-IQ) and a flip
    would contradict them. Images more than twice as long as wide are cut to their
    ``central_window`` first, so no aspect ratio makes the resize larger than the input.
    """

    interpolation = "bilinear"

    def __init__(
        self,
        size: int,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        augment: bool = False,
    ):
        if int(size) < 1:
            raise ValueError(f"image size must be >= 1, got {size}")
        if len(mean) != 3 or len(std) != 3:
            raise ValueError(f"mean and std need 3 values (RGB), got {mean} and {std}")
        if any(s <= 0 for s in std):
            raise ValueError(f"std values must be > 0, got {std}")
        self.size = int(size)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.augment = bool(augment)

    def __call__(self, images: torch.Tensor, rng: random.Random | None = None) -> torch.Tensor:
        if images.ndim not in (3, 4) or images.shape[-3] != 3:
            raise ValueError(
                f"expected uint8 images (3, H, W) or (B, 3, H, W), got {tuple(images.shape)}"
            )
        if not self.augment:
            x = self.square(images)
        else:
            x = self._random_crop(_to_float(images), rng or random.Random())
        return self.normalise(x)

    def square(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (..., 3, H, W) -> float32 (..., 3, size, size) in [0, 1]: the resize and
        centre crop, without normalisation (what ``pipeline.image_cache`` stores)."""
        window = self._central_square(images)
        if window is not None:
            return window
        x = TF.resize(_to_float(images), [self.size], antialias=True)
        return TF.center_crop(x, [self.size, self.size])

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        """float (..., 3, size, size) in [0, 1] -> ``(x - mean) / std``, contiguous."""
        # non_blocking: a blocking host-to-device copy waits for the GPU to finish the
        # training step in flight, which would serialise data preparation with it
        mean = torch.tensor(self.mean).view(3, 1, 1).to(x.device, non_blocking=True)
        std = torch.tensor(self.std).view(3, 1, 1).to(x.device, non_blocking=True)
        return ((x - mean) / std).contiguous()

    def _central_square(self, images: torch.Tensor) -> torch.Tensor | None:
        """The resize + centre crop of an elongated image through its ``central_window``
        (float32 (..., 3, size, size)), or None when the image is not elongated."""
        height, width = images.shape[-2:]
        tall = height > width
        long, short = (height, width) if tall else (width, height)
        window = central_window(long, short, self.size)
        if window is None:
            return None
        start, stop, first = window
        cut = images[..., start:stop, :] if tall else images[..., start:stop]
        new_long = int(self.size * long / short)
        x = resize_window(_to_float(cut), self.size / short, new_long / long, tall)
        if tall:
            return x[..., first : first + self.size, : self.size]
        return x[..., : self.size, first : first + self.size]

    def _random_crop(self, x: torch.Tensor, rng: random.Random) -> torch.Tensor:
        box = draw_crop_box(rng, *x.shape[-2:])
        if box is not None:
            top, left, h, w = box
            return TF.resized_crop(x, top, left, h, w, [self.size, self.size], antialias=True)
        x = TF.resize(x, [self.size], antialias=True)
        return TF.center_crop(x, [self.size, self.size])

    def to_dict(self) -> dict:
        """The preprocessing recipe, for ``artifacts.json`` (serving reproduces it)."""
        return {
            "resize": self.size,
            "crop": self.size,
            "mean": list(self.mean),
            "std": list(self.std),
            "interpolation": self.interpolation,
            "antialias": True,
            "resize_mode": "shorter_side",
            "crop_mode": "center",
            "scale": 1 / 255,
            "color": "RGB",
        }

    def __repr__(self) -> str:
        return (
            f"ImagePreprocess(size={self.size}, mean={self.mean}, std={self.std}, "
            f"augment={self.augment})"
        )

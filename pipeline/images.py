"""Image decoding and preprocessing shared by training, evaluation, export and serving.

Images stay encoded (JPEG/PNG) in the shards; ``decode_image`` turns bytes into a
uint8 RGB tensor (3, H, W), on the GPU for JPEG when a CUDA device is given (nvJPEG).
``ImagePreprocess`` resizes the shorter side to ``size``, centre-crops to
(size, size) and normalises with the ImageNet mean/std -- the input every model
expects (``pipeline.models.base``). ``to_dict`` records exactly these steps for
export's ``artifacts.json`` so serving can reproduce them.
"""

from __future__ import annotations

import math
import random
import warnings
from collections.abc import Sequence

import torch
import torchvision.transforms.v2.functional as TF
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.io import decode_image as _tv_decode_image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_JPEG_MAGIC = b"\xff\xd8\xff"


def is_jpeg(data: bytes) -> bool:
    """True when ``data`` starts with the JPEG start-of-image marker."""
    return bytes(data[:3]) == _JPEG_MAGIC


def decode_image(data: bytes | torch.Tensor, device: str | torch.device = "cpu") -> torch.Tensor:
    """Encoded image bytes -> uint8 RGB tensor (3, H, W) on ``device``.

    JPEG bytes are decoded by nvJPEG when ``device`` is CUDA; other formats are decoded
    on the CPU and moved. A uint8 tensor (an image a loader worker already decoded, see
    ``predecode_for_gpu``) is only moved. Raises ``ValueError`` for empty or undecodable
    (corrupt) bytes.
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
    except (RuntimeError, ValueError) as err:
        raise ValueError(
            f"cannot decode image ({len(data)} bytes, starts {bytes(data[:8])!r}): corrupt "
            f"or unsupported image data: {err}"
        ) from err
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


class ImagePreprocess:
    """uint8 (3, H, W) or (B, 3, H, W) -> float32 (..., 3, size, size), normalised.

    Resize the shorter side to ``size`` (bilinear, antialiased), centre-crop, scale to
    [0, 1], subtract ``mean`` and divide by ``std``. With ``augment`` a random crop of
    80-100 % of the area (aspect 3/4-4/3) replaces the centre crop. There is no
    horizontal flip: modification texts say "left"/"right" (CSS, Fashion-IQ) and a flip
    would contradict them.
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
        x = images.float().div_(255.0) if images.dtype == torch.uint8 else images.float()
        if self.augment:
            x = self._random_crop(x, rng or random.Random())
        else:
            x = TF.resize(x, [self.size], antialias=True)
            x = TF.center_crop(x, [self.size, self.size])
        mean = torch.tensor(self.mean, device=x.device).view(3, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(3, 1, 1)
        return ((x - mean) / std).contiguous()

    def _random_crop(self, x: torch.Tensor, rng: random.Random) -> torch.Tensor:
        height, width = x.shape[-2:]
        area = height * width
        for _ in range(10):
            target = area * rng.uniform(0.8, 1.0)
            ratio = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
            w = round(math.sqrt(target * ratio))
            h = round(math.sqrt(target / ratio))
            if 0 < w <= width and 0 < h <= height:
                top, left = rng.randint(0, height - h), rng.randint(0, width - w)
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

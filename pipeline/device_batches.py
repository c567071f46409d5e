"""Turning a reader's batch into training tensors on the device.

Two paths end here: the streaming reader's batches on a CUDA run (encoded JPEGs are
decoded in one batched nvJPEG call, then preprocessed on the GPU), and the image
cache's index batches (``pipeline.image_cache``: rows gathered on the device, the
augmentation crop drawn per image and applied to the whole batch in one
``grid_sample``). Both are seeded per batch, so a resumed epoch gets the same crops.
"""

from __future__ import annotations

import logging
import random
from typing import Any

import torch
import torch.nn.functional as F

from pipeline.images import ImagePreprocess, decode_image, decode_images, draw_crop_box

log = logging.getLogger(__name__)


def decode_batch_on_device(
    batch: dict[str, Any], preprocess: ImagePreprocess, device: torch.device, rng: random.Random
) -> dict[str, Any]:
    """Decode a batch's images on ``device`` (one batched nvJPEG call for JPEGs); triplets
    with an undecodable image are dropped with a warning, so the batch may shrink."""
    size = len(batch["texts"])
    try:
        images = decode_images(batch["ref_data"] + batch["target_data"], device)
        pairs = [(images[i], images[size + i]) for i in range(size)]
    except ValueError:
        pairs = []
        for i, (ref, tgt) in enumerate(zip(batch["ref_data"], batch["target_data"])):
            try:
                pairs.append((decode_image(ref, device), decode_image(tgt, device)))
            except ValueError as err:
                pairs.append(None)
                log.warning(
                    "skipping triplet %s -> %s: %s",
                    batch["ref_ids"][i],
                    batch["target_ids"][i],
                    err,
                )
    keep = [i for i, pair in enumerate(pairs) if pair is not None]
    if not keep:
        raise ValueError(f"every image of a batch failed to decode on {device}: {batch['ref_ids']}")
    index = torch.tensor(keep, dtype=torch.long)
    ref_images, target_images = preprocess_pairs([pairs[i] for i in keep], preprocess, rng)
    # non_blocking: nothing here waits for the training step in flight on the GPU
    return {
        "ref_images": ref_images,
        "target_images": target_images,
        "tokens": batch["tokens"][index].to(device, non_blocking=True),
        "lengths": batch["lengths"][index].to(device, non_blocking=True),
        "texts": [batch["texts"][i] for i in keep],
        "ref_ids": [batch["ref_ids"][i] for i in keep],
        "target_ids": [batch["target_ids"][i] for i in keep],
    }


def preprocess_pairs(
    pairs: list[tuple[torch.Tensor, torch.Tensor]], preprocess: ImagePreprocess, rng: random.Random
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decoded uint8 (reference, target) images -> two float32 (B, 3, S, S) batches.

    Without augmentation, images of one shape (a catalogue's usual case) go through the
    resize and normalisation as one batch: a few kernel launches instead of a few per
    image, which at batch 256 would keep the host busy for longer than the GPU's step.
    Otherwise each image is prepared alone, every reference first (the crops' draw order).
    """
    images = [ref for ref, _ in pairs] + [target for _, target in pairs]
    if not preprocess.augment and len({tuple(x.shape) for x in images}) == 1:
        both = preprocess(torch.stack(images))
    else:
        both = torch.stack([preprocess(x, rng) for x in images])
    return both[: len(pairs)], both[len(pairs) :]


def crop_boxes(rng: random.Random, count: int, size: int) -> torch.Tensor:
    """``count`` augmentation crops of a (size, size) image as (count, 4) float32
    ``(top, left, h, w)``; a failed draw keeps the whole image."""
    boxes = []
    for _ in range(count):
        box = draw_crop_box(rng, size, size)
        boxes.append(box if box is not None else (0, 0, size, size))
    return torch.tensor(boxes, dtype=torch.float32)


def resized_crops(images: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """float (B, 3, S, S), boxes (B, 4) ``(top, left, h, w)`` in pixels -> (B, 3, S, S):
    each image's box resized back to S x S (bilinear), all in one ``grid_sample``."""
    b, _, height, width = images.shape
    boxes = boxes.to(images.device, non_blocking=True)
    top, left, h, w = boxes.unbind(1)
    theta = torch.zeros(b, 2, 3, device=images.device, dtype=images.dtype)
    # affine_grid maps output [-1, 1] to input [-1, 1] (align_corners=False: pixel edges)
    theta[:, 0, 0] = w / width
    theta[:, 0, 2] = (2 * left + w) / width - 1
    theta[:, 1, 1] = h / height
    theta[:, 1, 2] = (2 * top + h) / height - 1
    grid = F.affine_grid(theta, [b, 3, height, width], align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


def preprocess_cached(
    rows: torch.Tensor, preprocess: ImagePreprocess, rng: random.Random
) -> torch.Tensor:
    """uint8 (B, 3, S, S) cache rows -> normalised float32 (B, 3, S, S) on their device;
    with ``preprocess.augment`` each image gets its own random crop (``draw_crop_box``,
    drawn from ``rng``) of the cached square."""
    x = rows.float().div_(255.0)
    if preprocess.augment:
        x = resized_crops(x, crop_boxes(rng, x.shape[0], x.shape[-1]))
    return preprocess.normalise(x)

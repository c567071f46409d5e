"""Gallery streaming (order, every image once), raw bytes access, image decoding and
preprocessing, and the decode-on-device batch path (exercised on the CPU)."""

from __future__ import annotations

import random

import pytest
import torch
from shard_fixtures import image_bytes, reader_batch, write_dataset

from pipeline.device_batches import decode_batch_on_device
from pipeline.gallery_data import gallery_loader, read_gallery_bytes
from pipeline.images import ImagePreprocess, decode_image, decode_images, predecode_for_gpu

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_dataset(
        tmp_path_factory.mktemp("gal") / "ds",
        explicit_groups=1,
        gallery_size=11,
        gallery_shard_size=4,
    )


@pytest.mark.parametrize("workers", [0, 2])
def test_gallery_loader_shard_order_every_image_once(dataset, workers):
    batches = list(gallery_loader(dataset, batch_size=3, image_size=32, loader_workers=workers))
    ids = [i for b in batches for i in b[0]]
    assert ids == [f"gal_{i:04d}" for i in range(11)]
    assert [len(b[0]) for b in batches] == [3, 3, 3, 2]
    for batch_ids, images, metas in batches:
        assert images.shape == (len(batch_ids), 3, 32, 32) and images.dtype == torch.float32
        assert [m["id"] for m in metas] == batch_ids
    stored = read_gallery_bytes(dataset, "gallery")
    assert list(stored) == ids
    preprocess = ImagePreprocess(32)
    first = preprocess(decode_image(stored["gal_0000"][0]))
    assert torch.allclose(batches[0][1][0], first)


def test_read_gallery_bytes_subset_and_missing(dataset):
    subset = read_gallery_bytes(dataset, "gallery", ids=["gal_0003", "gal_0007"])
    assert set(subset) == {"gal_0003", "gal_0007"}
    data, ext = subset["gal_0003"]
    assert ext == "png" and data == image_bytes(103)
    with pytest.raises(KeyError, match="nope"):
        read_gallery_bytes(dataset, "gallery", ids=["nope"])
    with pytest.raises(ValueError, match="not a 'gallery' split"):
        read_gallery_bytes(dataset, "train")


@pytest.mark.parametrize("ext", ["png", "jpg"])
def test_decode_image_rgb_uint8(ext):
    image = decode_image(image_bytes(5, size=40, ext=ext))
    assert image.dtype == torch.uint8 and image.shape == (3, 40, 56)


def test_decode_image_rejects_corrupt_bytes():
    with pytest.raises(ValueError, match="corrupt"):
        decode_image(b"not an image at all")
    with pytest.raises(ValueError, match="corrupt"):
        decode_image(b"")
    with pytest.raises(ValueError, match="image 1 of the batch"):
        decode_images([image_bytes(1), b"\xff\xd8\xffjunk"])


def test_preprocess_resizes_shorter_side_and_center_crops():
    image = torch.zeros(3, 20, 40, dtype=torch.uint8)
    image[:, :, 4:36] = 255  # the white centre band fills the crop; the black edges are cut off
    preprocess = ImagePreprocess(10, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    out = preprocess(image)
    assert out.shape == (3, 10, 10) and out.dtype == torch.float32
    assert torch.allclose(out, torch.ones_like(out))
    batch = preprocess(torch.stack([image, image]))
    assert batch.shape == (2, 3, 10, 10) and torch.allclose(batch[1], out)
    recipe = preprocess.to_dict()
    assert (recipe["resize"], recipe["crop"], recipe["mean"]) == (10, 10, [0.5, 0.5, 0.5])
    assert recipe["interpolation"] == "bilinear"
    augmented = ImagePreprocess(10, augment=True)(image, random.Random(0))
    assert augmented.shape == (3, 10, 10)
    with pytest.raises(ValueError, match="expected uint8 images"):
        preprocess(torch.zeros(4, 10, 10, dtype=torch.uint8))


def test_decode_on_device_batch_drops_corrupt_triplets():
    vocab_tokens = torch.tensor([[2, 3], [4, 0], [5, 0]])
    batch = {
        "ref_data": [image_bytes(1), image_bytes(2), image_bytes(3, ext="jpg")],
        "target_data": [image_bytes(4), b"broken", image_bytes(6, ext="jpg")],
        "tokens": vocab_tokens,
        "lengths": torch.tensor([2, 1, 1]),
        "texts": ["a b", "c", "d"],
        "ref_ids": ["r0", "r1", "r2"],
        "target_ids": ["t0", "t1", "t2"],
    }
    out = decode_batch_on_device(batch, ImagePreprocess(16), torch.device("cpu"), random.Random(0))
    assert out["ref_ids"] == ["r0", "r2"] and out["texts"] == ["a b", "d"]
    assert out["ref_images"].shape == out["target_images"].shape == (2, 3, 16, 16)
    assert out["tokens"].tolist() == [[2, 3], [5, 0]] and out["lengths"].tolist() == [2, 1]


@pytest.mark.parametrize(
    ("indices", "augment"),
    [((0, 3, 6, 9, 12, 15), False), ((0, 1, 2, 3, 4, 5), False), ((0, 3, 6, 9, 12, 15), True)],
    ids=["one-shape", "mixed-shapes", "augment"],
)
def test_decoded_batches_are_prepared_as_each_image_alone(indices, augment):
    """A batch of one shape goes through one resize; it gives what each image alone
    gives. Mixed shapes and augmentation go image by image, crops drawn references first."""
    datas = [image_bytes(i) for i in indices]
    batch = reader_batch(datas[:3], datas[3:])
    preprocess = ImagePreprocess(16, augment=augment)
    out = decode_batch_on_device(batch, preprocess, torch.device("cpu"), random.Random(5))
    rng = random.Random(5)
    alone = [preprocess(decode_image(data), rng) for data in datas]
    torch.testing.assert_close(out["ref_images"], torch.stack(alone[:3]), atol=1e-6, rtol=0)
    torch.testing.assert_close(out["target_images"], torch.stack(alone[3:]), atol=1e-6, rtol=0)


def test_gpu_readers_predecode_png_in_the_worker_and_keep_jpeg_bytes():
    png, jpg = image_bytes(1), image_bytes(2, ext="jpg")
    decoded = predecode_for_gpu(png)
    assert isinstance(decoded, torch.Tensor) and decoded.dtype == torch.uint8
    assert predecode_for_gpu(jpg) is jpg  # nvJPEG decodes it on the GPU, in one batch
    with pytest.raises(ValueError, match="corrupt"):
        predecode_for_gpu(b"broken")
    # the main process gets a mix of decoded PNGs and JPEG bytes: both come out alike
    mixed = decode_images([decoded, jpg], "cpu")
    assert torch.equal(mixed[0], decode_image(png)) and torch.equal(mixed[1], decode_image(jpg))
    batch = reader_batch([decoded, jpg], [predecode_for_gpu(image_bytes(3)), jpg])
    out = decode_batch_on_device(batch, ImagePreprocess(16), torch.device("cpu"), random.Random(0))
    assert out["ref_images"].shape == (2, 3, 16, 16) and out["ref_ids"] == ["r0", "r1"]

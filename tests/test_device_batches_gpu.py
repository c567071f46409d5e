"""Preparing a training batch on the GPU never waits for it (skipped without CUDA).

A blocking host-to-device copy or a read-back waits for the training step in flight,
so the host could not prepare batch i + 1 while the GPU runs step i: the data path
would add its time to every step instead of hiding under it."""

from __future__ import annotations

import random
from contextlib import contextmanager

import pytest
import torch
from shard_fixtures import image_bytes, reader_batch

from pipeline.device_batches import decode_batch_on_device, preprocess_cached
from pipeline.images import ImagePreprocess, predecode_for_gpu

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@contextmanager
def sync_is_an_error():
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("augment", [False, True])
def test_cached_rows_become_a_batch_without_a_sync(augment):
    rows = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8, device="cuda")
    with sync_is_an_error():
        out = preprocess_cached(rows, ImagePreprocess(32, augment=augment), random.Random(0))
    assert out.shape == (8, 3, 32, 32) and out.is_cuda


def test_a_streamed_batch_is_prepared_without_a_sync():
    # PNGs arrive decoded by the loader workers, whose work is not under test here
    datas = [predecode_for_gpu(image_bytes(i)) for i in (0, 3, 6, 9)]
    batch = reader_batch(datas[:2], datas[2:])
    with sync_is_an_error():
        out = decode_batch_on_device(
            batch, ImagePreprocess(16), torch.device("cuda"), random.Random(0)
        )
    assert out["ref_images"].is_cuda and out["tokens"].is_cuda

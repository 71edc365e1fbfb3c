"""The hand-over of a decoded batch: channels_last stacking, pickling by value or through shared memory."""

from __future__ import annotations

import pickle

import pytest
import torch
from conftest import encode, photo
from test_collate import mixed_blobs, rows_of

from lance_cookbook import Batch, ImageCollate


@pytest.mark.parametrize("decoder", ["pil", "torchvision"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.uint8])
def test_batch_is_channels_last_with_the_same_values(decoder, dtype):
    rows = rows_of(mixed_blobs())
    images = ImageCollate(size=20, decoder=decoder, dtype=dtype)(rows).image
    assert images.is_contiguous(memory_format=torch.channels_last)
    reference = ImageCollate(size=20, decoder=decoder, dtype=torch.uint8)(rows).image
    if dtype == torch.float32:
        reference = reference.float() / 255
    assert torch.equal(images.contiguous(), reference.contiguous())


@pytest.mark.parametrize("size", [16, 160])  # 147 KB: by value through the pipe; 4.9 MB: shared memory
def test_batch_crosses_processes_unchanged(size):
    """Batch pickling (what a worker does to hand a batch over) keeps shape, strides, dtype and values,
    by value when small, through torch's shared-memory reduction when large."""
    import io as _io
    from multiprocessing.reduction import ForkingPickler

    import torch.multiprocessing  # noqa: F401 - registers torch's shared-memory reductions

    from lance_cookbook.recipe.handover import BY_VALUE_MAX_BYTES

    batch = ImageCollate(size=size, decoder="torchvision", dtype=torch.uint8)(
        rows_of([encode(photo(i, (90, 70)), "JPEG") for i in range(64)])
    )
    buf = _io.BytesIO()
    ForkingPickler(buf, 2).dump(batch)
    small = batch.image.numel() <= BY_VALUE_MAX_BYTES
    assert (len(buf.getvalue()) > batch.image.numel()) == small  # the pixels are in the pickle, or not
    clone = pickle.loads(pickle.dumps(batch))
    assert isinstance(clone, Batch)
    for a, b in zip(clone, batch, strict=True):
        assert torch.equal(a, b) and a.stride() == b.stride() and a.dtype == b.dtype

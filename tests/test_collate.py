"""ImageCollate: shapes, dtypes, both decoders, both modes, non-RGB inputs, errors that name the row.

That both decoders give ImageFolder's pixels for every accepted format is tests/test_decode.py."""

from __future__ import annotations

import pickle

import pytest
import torch
from conftest import encode, id_image, photo
from PIL import Image

from lance_cookbook import Batch, DecodeError, ImageCollate


def rows_of(blobs, labels=None):
    labels = labels or list(range(len(blobs)))
    return [
        {"image": b, "label": y, "id": i, "source": f"s/{i}.img"}
        for i, (b, y) in enumerate(zip(blobs, labels, strict=True))
    ]


def mixed_blobs() -> list[bytes]:
    im = photo(1, (40, 30))
    rgba = im.convert("RGBA")
    rgba.putalpha(128)
    return [
        encode(im, "JPEG"),
        encode(im.convert("L"), "JPEG"),  # grayscale JPEG
        encode(im.convert("CMYK"), "JPEG"),  # CMYK JPEG
        encode(rgba, "PNG"),  # RGBA
        encode(im.convert("P"), "PNG"),  # palette
        encode(im.convert("L"), "PNG"),
        encode(im, "WEBP"),
        encode(im, "BMP"),  # TorchCodec cannot decode BMP: PIL fallback
        encode(im.convert("P"), "GIF"),
    ]


@pytest.mark.parametrize("decoder", ["pil", "torchvision"])
@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.uint8])
def test_shapes_dtypes_for_every_input_mode(decoder, train, dtype):
    blobs = mixed_blobs()
    batch = ImageCollate(size=24, train=train, decoder=decoder, dtype=dtype)(rows_of(blobs))
    assert isinstance(batch, Batch)
    images, labels = batch  # the documented loop unpacks the batch
    assert images is batch.image and labels is batch.label
    assert images.shape == (len(blobs), 3, 24, 24) and images.dtype == dtype
    assert labels.dtype == torch.int64 and labels.tolist() == list(range(len(blobs)))
    if dtype == torch.float32:
        assert 0.0 <= images.min() and images.max() <= 1.0


def test_eval_resize_keeps_solid_colours_exactly():
    batch = ImageCollate(size=8, decoder="torchvision", dtype=torch.uint8)(rows_of([id_image(300)]))
    assert batch.image[0, 0].unique().tolist() == [300 % 256]
    assert batch.image[0, 1].unique().tolist() == [300 // 256]


def test_train_mode_augments_and_eval_is_deterministic():
    rows = rows_of([encode(photo(3, (80, 60)), "JPEG")] * 8)
    train = ImageCollate(size=32, train=True, decoder="torchvision")(rows).image
    assert not all(torch.equal(train[0], t) for t in train[1:])
    evaluation = ImageCollate(size=32, decoder="torchvision")(rows).image
    assert all(torch.equal(evaluation[0], t) for t in evaluation[1:])


def test_picklable_for_spawn_workers():
    collate = ImageCollate(size=16, train=True, decoder="torchvision", dtype=torch.uint8)
    clone = pickle.loads(pickle.dumps(collate))
    assert clone(rows_of(mixed_blobs()[:2])).image.shape == (2, 3, 16, 16)


def test_bad_bytes_raise_naming_the_row():
    rows = rows_of([encode(photo(0), "JPEG"), b"not an image at all"])
    for decoder in ("pil", "torchvision"):
        with pytest.raises(DecodeError, match=r"source='s/1.img'"):
            ImageCollate(size=8, decoder=decoder)(rows)


def test_truncated_jpeg_inside_a_batch_is_found():
    good = encode(photo(0, (64, 64)), "JPEG")
    rows = rows_of([good, good[: len(good) // 2], good])
    with pytest.raises(DecodeError, match=r"s/1.img"):
        ImageCollate(size=8, decoder="torchvision")(rows)


def test_skip_drops_and_counts_bad_rows_but_never_returns_empty():
    good = encode(photo(0), "JPEG")
    collate = ImageCollate(size=8, decoder="torchvision", on_error="skip")
    with pytest.warns(UserWarning, match="s/1.img"):
        batch = collate(rows_of([good, b"", good, b"junk"], labels=[5, 6, 7, 8]))
    assert batch.label.tolist() == [5, 7] and collate.skipped == 2
    with pytest.warns(UserWarning), pytest.raises(DecodeError, match="no image in this batch"):
        collate(rows_of([b"junk"]))


@pytest.mark.parametrize(
    "kwargs", [{"decoder": "cv2"}, {"dtype": torch.float16}, {"on_error": "ignore"}, {"size": 0}]
)
def test_bad_arguments_are_refused(kwargs):
    with pytest.raises(ValueError):
        ImageCollate(**kwargs)


def test_pil_decode_bomb_guard_is_on():
    assert Image.MAX_IMAGE_PIXELS is not None


@pytest.mark.parametrize("train", [False, True])
def test_kernels_match_the_v2_transforms(train):
    """The torchvision path calls resize/crop/flip kernels directly: same pixels as the v2 pipeline."""
    from torchcodec.decoders import decode_jpeg
    from torchvision.transforms import v2

    blobs = [encode(photo(i, (90, 70)), "JPEG") for i in range(4)]
    geometry = (
        [v2.RandomResizedCrop(24, antialias=True), v2.RandomHorizontalFlip()]
        if train
        else [v2.Resize(24, antialias=True), v2.CenterCrop(24)]  # shorter side to 24, centre crop
    )
    torch.manual_seed(0)
    want = torch.stack(
        [v2.Compose(geometry)(decode_jpeg(torch.frombuffer(bytearray(b), dtype=torch.uint8))) for b in blobs]
    )
    torch.manual_seed(0)
    got = ImageCollate(size=24, train=train, decoder="torchvision", dtype=torch.uint8)(rows_of(blobs)).image
    assert torch.equal(got, want)


def test_evaluation_keeps_proportions_with_both_decoders():
    """train=False: shorter side resized, centre crop (torchvision's reference recipe), so a wide photo's
    middle fills the output instead of the whole photo being squashed."""
    wide = Image.new("RGB", (64, 16), (255, 0, 0))
    wide.paste((0, 0, 255), (24, 0, 40, 16))  # a blue band in the middle third of a red photo
    blob = encode(wide, "PNG")
    for decoder in ("pil", "torchvision"):
        collate = ImageCollate(14, decoder=decoder, dtype=torch.uint8, crop_fraction=0.875)
        assert collate.resize_size == 16
        image = collate([{"image": blob, "label": 0}]).image[0]
        # the 14 px crop of a 64x16 photo resized to 64x16 is columns 25-38: all blue
        assert image.shape == (3, 14, 14) and (image[2] > 200).all() and (image[0] < 55).all(), decoder

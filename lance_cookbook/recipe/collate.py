"""Decode stored image bytes into a batch in the DataLoader workers (docs/training.md; docs/benchmark.md)."""

from __future__ import annotations

import contextlib
import hashlib
import math
import warnings
from collections.abc import Mapping
from typing import Any

import torch
from torchvision import transforms as T
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from .decode import JPEG_MAGIC, decode_batch, pil_to_rgb
from .handover import Batch, stack_channels_last

# JPEG_MAGIC, Batch and stack_channels_last are imported from here by the benchmark, which times each step
__all__ = ["AUGMENT_SEED", "JPEG_MAGIC", "DecodeError", "ImageCollate", "augment_seed", "stack_channels_last"]

# The row key of a sample's own augmentation seed; rows without it draw from the process's generator.
AUGMENT_SEED = "augment_seed"

# The evaluation crop's share of the resized shorter side: torchvision's references/classification/presets.py
# uses 224 of 256 for ImageNet photos; 1.0 cuts nothing from a square image (the embedded digits).
REFERENCE_CROP_FRACTION = 0.875
EVAL_CROP_FRACTION = 1.0


def augment_seed(seed: int, epoch: int, position: int) -> int:
    """Return the seed of one sample's crop and flip: 63 bits of SHA-256 of ``(seed, epoch, position)``.

    The same in a resumed run as in an uninterrupted one, for any number of workers (starVLA#351).
    """
    digest = hashlib.sha256(f"{seed}:{epoch}:{position}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


@contextlib.contextmanager
def _seeded(seed: int | None):  # draw from a generator seeded with seed (None: the process's, unchanged)
    with torch.random.fork_rng(devices=[], enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)
        yield


class DecodeError(ValueError):
    """Stored bytes that do not decode; the message names the row."""


def _each(items: list[Any], step: Any, seeds: list[int | None] | None) -> list[torch.Tensor | Exception]:
    """Apply ``step`` to each item that is not an exception, under its seed; a failure gives its exception."""
    out = list(items)
    for i, (item, seed) in enumerate(zip(items, seeds or [None] * len(items), strict=True)):
        if not isinstance(item, Exception):
            try:
                with _seeded(seed):
                    out[i] = step(item)
            except Exception as e:  # noqa: BLE001 - reported per row by the caller
                out[i] = e
    return out


def _row_name(rows: list[dict[str, Any]], position: int) -> str:
    row = rows[position]
    for key in ("source", "id"):
        if row.get(key) is not None:
            return f"row {key}={row[key]!r}"
    describe = getattr(rows, "describe", None)  # dataset.Rows looks the source file up
    return describe(position) if describe is not None else f"batch position {position}"


class ImageCollate:
    """Collate rows (dicts of encoded ``image`` bytes and ``label``) into a :class:`Batch`; picklable.

    Parameters
    ----------
    size : int
        Output height and width in pixels.
    train : bool
        ``RandomResizedCrop`` + flip, seeded by the row's ``AUGMENT_SEED`` if any (:func:`augment_seed`);
        else shorter side to ``floor(size / crop_fraction)``, then a centre crop.
    decoder : {"pil", "torchvision"}
        The tensor path: bytes decoded by TorchCodec (:func:`.decode.decode_batch`, PIL for the formats it
        lacks), resized as uint8 tensors by torchvision.transforms.v2's kernels; or PIL per image
        (docs/training.md). Both give the pixels of torchvision's ImageFolder loader.
    dtype : {torch.float32, torch.uint8}
        float32 in [0, 1], or uint8 (4x fewer bytes between processes; finish with ``to_device``).
    on_error : {"raise", "skip"}
        Raise :class:`DecodeError` naming the row, or drop it with a warning, counted in ``self.skipped``.
    image_column, label_column : str
        Column names in the rows.
    crop_fraction : float
        Evaluation crop share of the resized side, in (0, 1]; torchvision's photo recipe is 0.875.

    Returns
    -------
    Batch
        ``(image [B, 3, size, size] channels_last, label int64 [B])``; for one row (a dict):
        ``(image [3, size, size], label int64 [])``. Any input mode comes out RGB.

    Raises
    ------
    ValueError, DecodeError
        Bad arguments at construction; bytes that do not decode (``on_error="raise"``) or no decodable row.
    """

    def __init__(
        self,
        size: int = 224,
        train: bool = False,
        decoder: str = "pil",
        dtype: torch.dtype = torch.float32,
        on_error: str = "raise",
        image_column: str = "image",
        label_column: str = "label",
        crop_fraction: float = EVAL_CROP_FRACTION,
    ):
        if decoder not in ("pil", "torchvision"):
            raise ValueError(f"decoder must be 'pil' or 'torchvision', got {decoder!r}")
        if dtype not in (torch.float32, torch.uint8):
            raise ValueError(f"dtype must be torch.float32 or torch.uint8, got {dtype}")
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        if int(size) < 1:
            raise ValueError(f"size must be a positive int, got {size!r}")
        if not 0 < crop_fraction <= 1:
            raise ValueError(f"crop_fraction must be in (0, 1], got {crop_fraction!r}")
        self.size = int(size)
        self.crop_fraction = crop_fraction
        self.resize_size = math.floor(self.size / crop_fraction)
        self.train, self.decoder, self.dtype, self.on_error = train, decoder, dtype, on_error
        self.image_column, self.label_column = image_column, label_column
        self.skipped = 0
        self._crop = v2.RandomResizedCrop(self.size, antialias=True)  # its scale and ratio serve both paths
        if train:
            geometry = [self._crop, v2.RandomHorizontalFlip()]
        else:
            geometry = [v2.Resize(self.resize_size, antialias=True), v2.CenterCrop(self.size)]
        self._pil_transform = v2.Compose([*geometry, v2.PILToTensor()])

    @property
    def columns(self) -> tuple[str, ...]:
        """The columns it reads; ``make_loader`` reads only these (a subclass may name more)."""
        return (self.image_column, self.label_column)

    def __repr__(self) -> str:
        return (
            f"ImageCollate(size={self.size}, train={self.train}, decoder={self.decoder!r}, "
            f"dtype={self.dtype}, on_error={self.on_error!r}, crop_fraction={self.crop_fraction})"
        )

    def _geometry(self, img: torch.Tensor) -> torch.Tensor:
        """Apply the PIL path's geometry to uint8 ``[3, H, W]`` through torchvision's kernels (no Compose)."""
        size = [self.size, self.size]
        if self.train:
            top, left, h, w = T.RandomResizedCrop.get_params(img, self._crop.scale, self._crop.ratio)
            img = F.resized_crop_image(img, top, left, h, w, size=size, antialias=True)
            return F.horizontal_flip_image(img) if torch.rand(1) < 0.5 else img
        img = F.resize_image(img, [self.resize_size], antialias=True)
        return F.center_crop_image(img, size)

    def _decode_pil(self, data: bytes) -> torch.Tensor:
        if not data:
            raise ValueError("empty image bytes")
        return self._pil_transform(pil_to_rgb(data))

    def _decode_torchvision(self, blobs: list[bytes], seeds: list[int | None] | None = None) -> list[Any]:
        """Decode and resize ``blobs``; ``seeds[i]`` (None: this process's generator) draws row i's crop."""
        return _each(decode_batch(blobs), self._geometry, seeds)

    def __call__(self, rows: list[dict[str, Any]] | Mapping[str, Any]) -> Batch:
        """Decode ``rows`` (or one row) into a :class:`Batch`; see the class for shapes and errors."""
        if isinstance(rows, Mapping):  # one row: a DataLoader with batch_size=None passes rows one by one
            image, label = self([rows])
            return Batch(image[0], label[0])
        blobs = [row[self.image_column] for row in rows]
        seeds = [row.get(AUGMENT_SEED) if self.train else None for row in rows]
        if self.decoder == "torchvision":
            decoded = self._decode_torchvision(blobs, seeds)
        else:
            decoded = _each(blobs, self._decode_pil, seeds)
        images, labels = [], []
        for position, (row, img) in enumerate(zip(rows, decoded, strict=True)):
            if isinstance(img, Exception):
                message = f"cannot decode image at {_row_name(rows, position)}: {img}"
                if self.on_error == "raise":
                    raise DecodeError(message) from img
                self.skipped += 1
                warnings.warn(f"skipped {message}", stacklevel=2)
                continue
            images.append(img)
            labels.append(row[self.label_column])
        if not images:
            raise DecodeError(f"no image in this batch of {len(rows)} rows could be decoded")
        return Batch(stack_channels_last(images, self.dtype), torch.tensor(labels, dtype=torch.int64))

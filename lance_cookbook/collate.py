"""Decode a batch of stored image bytes into tensors, inside the DataLoader workers.

Workers fetch raw encoded bytes with one batched ``take``; decoding and resizing happen here, in the
collate function, so they run in parallel across workers and only fixed-size tensors cross processes.
"""

from __future__ import annotations

import io
import warnings
from typing import Any, NamedTuple

import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_image, decode_jpeg
from torchvision.transforms import v2

__all__ = ["Batch", "ImageCollate", "DecodeError"]

JPEG_MAGIC = b"\xff\xd8\xff"


class Batch(NamedTuple):
    """A decoded batch: unpacks as ``images, labels`` and also has ``.image`` / ``.label``."""

    image: torch.Tensor  # [B, 3, S, S], float32 in [0, 1] or uint8 in [0, 255]
    label: torch.Tensor  # [B], int64


class DecodeError(ValueError):
    """Stored bytes that do not decode; the message names the row."""


def _row_name(row: dict[str, Any], position: int) -> str:
    for key in ("source", "id"):
        if row.get(key) is not None:
            return f"row {key}={row[key]!r}"
    return f"batch position {position}"


def _pil_to_rgb(data: bytes) -> Image.Image:
    # alpha is dropped, not composited, exactly as torchvision's ImageReadMode.RGB does
    with Image.open(io.BytesIO(data)) as im:
        return im.convert("RGB")


class ImageCollate:
    """Collate ``SafeLanceDataset`` rows (``list[dict]`` with encoded ``image`` bytes and ``label``).

    Args:
        size: output height and width.
        train: ``True`` adds ``RandomResizedCrop(size)`` + horizontal flip; ``False`` resizes to
            ``(size, size)``.
        decoder: ``"torchvision"`` decodes all JPEGs of the batch in one ``torchvision.io.decode_jpeg`` call
            (PNG/GIF/WebP through ``decode_image``, anything else through PIL) and resizes uint8 tensors;
            ``"pil"`` decodes and transforms each image with PIL.
        dtype: ``torch.float32`` (scaled to [0, 1]) or ``torch.uint8`` (raw pixels: 4x fewer bytes between
            processes; convert and normalize on the device with :func:`lance_cookbook.to_device`).
        on_error: ``"raise"`` (default) raises :class:`DecodeError` naming the row; ``"skip"`` drops the row
            with a warning and counts it in ``self.skipped`` (per process); a batch with no decodable row
            still raises.
        image_column, label_column: column names in the rows.

    Returns a :class:`Batch` ``(image [B, 3, size, size], label int64 [B])``. Grayscale, RGBA, palette and
    CMYK inputs all come out RGB. Picklable, so spawn workers can use it; transforms are built once.
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
    ):
        if decoder not in ("pil", "torchvision"):
            raise ValueError(f"decoder must be 'pil' or 'torchvision', got {decoder!r}")
        if dtype not in (torch.float32, torch.uint8):
            raise ValueError(f"dtype must be torch.float32 or torch.uint8, got {dtype}")
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        if int(size) < 1:
            raise ValueError(f"size must be a positive int, got {size!r}")
        self.size = int(size)
        self.train = train
        self.decoder = decoder
        self.dtype = dtype
        self.on_error = on_error
        self.image_column = image_column
        self.label_column = label_column
        self.skipped = 0
        if train:
            geometry = [v2.RandomResizedCrop(self.size, antialias=True), v2.RandomHorizontalFlip()]
        else:
            geometry = [v2.Resize((self.size, self.size), antialias=True)]
        # PIL path: geometry on the PIL image, then to tensor; torchvision path: geometry on uint8 tensors
        self._pil_transform = v2.Compose([*geometry, v2.PILToTensor()])
        self._tensor_transform = v2.Compose(geometry)

    def __repr__(self) -> str:
        return (
            f"ImageCollate(size={self.size}, train={self.train}, decoder={self.decoder!r}, "
            f"dtype={self.dtype}, on_error={self.on_error!r})"
        )

    # ------------------------------------------------------------------------------------------- decode
    def _decode_pil(self, data: bytes) -> torch.Tensor:
        return self._pil_transform(_pil_to_rgb(data))

    def _decode_torchvision(self, blobs: list[bytes]) -> list[torch.Tensor | Exception]:
        out: list[torch.Tensor | Exception | None] = [None] * len(blobs)
        tensors = [torch.frombuffer(bytearray(b), dtype=torch.uint8) if b else None for b in blobs]
        jpegs = [i for i, b in enumerate(blobs) if b and b.startswith(JPEG_MAGIC)]
        if jpegs:
            try:
                for i, img in zip(
                    jpegs, decode_jpeg([tensors[i] for i in jpegs], mode=ImageReadMode.RGB), strict=True
                ):
                    out[i] = img
            except RuntimeError:
                pass  # one bad or unsupported JPEG fails the whole call: decode those one by one below
        for i, b in enumerate(blobs):
            if out[i] is not None:
                continue
            try:
                if not b:
                    raise ValueError("empty image bytes")
                try:
                    out[i] = decode_image(tensors[i], mode=ImageReadMode.RGB)
                except RuntimeError:
                    out[i] = v2.functional.pil_to_tensor(_pil_to_rgb(b))  # formats torchvision lacks
            except Exception as e:  # noqa: BLE001 - reported per row by the caller
                out[i] = e
        return [img if isinstance(img, Exception) else self._tensor_transform(img) for img in out]

    def __call__(self, rows: list[dict[str, Any]]) -> Batch:
        blobs = [row[self.image_column] for row in rows]
        if self.decoder == "torchvision":
            decoded = self._decode_torchvision(blobs)
        else:
            decoded = []
            for b in blobs:
                try:
                    if not b:
                        raise ValueError("empty image bytes")
                    decoded.append(self._decode_pil(b))
                except Exception as e:  # noqa: BLE001 - reported per row below
                    decoded.append(e)
        images, labels = [], []
        for position, (row, img) in enumerate(zip(rows, decoded, strict=True)):
            if isinstance(img, Exception):
                message = f"cannot decode image at {_row_name(row, position)}: {img}"
                if self.on_error == "raise":
                    raise DecodeError(message) from img
                self.skipped += 1
                warnings.warn(f"skipped {message}", stacklevel=2)
                continue
            images.append(img)
            labels.append(row[self.label_column])
        if not images:
            raise DecodeError(f"no image in this batch of {len(rows)} rows could be decoded")
        batch = torch.stack(images)
        if self.dtype == torch.float32:
            batch = batch.to(torch.float32).div_(255)
        return Batch(batch, torch.tensor(labels, dtype=torch.int64))

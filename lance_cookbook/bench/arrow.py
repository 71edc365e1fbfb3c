"""Loader (i): the Arrow table of one ``take`` handed to the collate, JPEG bytes decoded in place.

Decoded as ``ImageCollate``'s JPEG path decodes (TorchCodec's ``decode_jpeg``, one call a batch), with the
same pixels: TorchCodec applies EXIF orientation, which ``ImageCollate`` hides from it, so a batch holding a
JPEG with an EXIF (APP1) segment goes through ``ImageCollate``. The bench's synthetic JPEGs carry none.

Spawn workers unpickle these classes by module name, so they live in an importable module.
"""

from __future__ import annotations

from typing import Any

import lance
import numpy as np
import pyarrow as pa
import torch
from torchcodec.decoders import decode_jpeg

from ..recipe.collate import JPEG_MAGIC, Batch, ImageCollate, stack_channels_last
from ..recipe.dataset import LanceImageDataset
from ..recipe.decode import _jpeg_exif_spans

__all__ = ["ArrowImageCollate", "ArrowLanceDataset", "jpeg_views"]


class ArrowLanceDataset(LanceImageDataset):
    """``LanceImageDataset`` whose ``__getitems__`` returns the ``pyarrow.Table`` of its sorted ``take``.

    Rows come in index order, not in the order asked for (a batch is a set), so the collate can read the
    binary column's buffers in place (see :class:`ArrowImageCollate`).
    """

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.__getitems__([index]).to_pylist()[0]

    def __getitems__(self, indices: list[int]) -> Any:
        if self._ds is None:
            self._ds = lance.dataset(self.uri, **self.dataset_options)
        return self._ds.take(sorted(indices), columns=self.columns)


def jpeg_views(column: pa.Array | pa.ChunkedArray) -> list[torch.Tensor] | None:
    """One uint8 tensor per value of an Arrow binary column, viewing the column's data buffer (no copy).

    ``None`` unless every value is a non-null JPEG (starts with FF D8 FF) whose header walks to its first
    scan without an APP1 (EXIF) segment: TorchCodec would apply an EXIF orientation that ``ImageCollate``
    ignores (it walks every JPEG's header too, to hide the EXIF).
    """
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if column.null_count or len(column) == 0:
        return None
    _, offsets_buffer, data_buffer = column.buffers()
    width = 8 if pa.types.is_large_binary(column.type) else 4
    offsets = np.frombuffer(
        offsets_buffer,
        dtype=np.int64 if width == 8 else np.int32,
        count=len(column) + 1,
        offset=column.offset * width,
    )
    starts, lengths = offsets[:-1], np.diff(offsets)
    if data_buffer is None or lengths.min() < len(JPEG_MAGIC):
        return None
    raw = np.frombuffer(data_buffer, dtype=np.uint8)
    if not all((raw[starts + i] == byte).all() for i, byte in enumerate(JPEG_MAGIC)):
        return None
    bounds = offsets.tolist()
    header = memoryview(data_buffer).cast("B")
    if any(_jpeg_exif_spans(header[bounds[i] : bounds[i + 1]]) != [] for i in range(len(column))):
        return None  # EXIF, or a header that cannot be walked: ImageCollate decodes (or names) it
    data = torch.frombuffer(data_buffer, dtype=torch.uint8)  # read-only: the views are only read
    return [data[bounds[i] : bounds[i + 1]] for i in range(len(column))]


class ArrowImageCollate(ImageCollate):
    """``ImageCollate`` that also takes the ``pyarrow.Table`` of one ``take`` (:class:`ArrowLanceDataset`).

    JPEG bytes are decoded straight from Arrow's buffer (no Python bytes, no dicts) and labels come from
    numpy. Anything but an all-JPEG, all-valid batch goes through ``ImageCollate``.
    """

    def __call__(self, rows: Any) -> Batch:
        """Decode a batch: the ``pyarrow.Table`` of one ``take``, or a list of rows (as ``ImageCollate``)."""
        if isinstance(rows, list):
            return super().__call__(rows)
        views = jpeg_views(rows.column(self.image_column)) if self.decoder == "torchvision" else None
        if views is None:
            return super().__call__(rows.to_pylist())
        try:
            decoded = decode_jpeg(views, mode="RGB")
        except (RuntimeError, ValueError):
            return super().__call__(rows.to_pylist())  # names the bad row, or skips it
        images = stack_channels_last([self._geometry(img) for img in decoded], self.dtype)
        labels = rows.column(self.label_column).to_numpy().astype(np.int64)  # a writable copy
        return Batch(images, torch.from_numpy(labels))

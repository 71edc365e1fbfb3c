"""Hand a decoded batch from a worker to the main process: small by value, large through shared memory."""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
import torch

__all__ = ["BY_VALUE_MAX_BYTES", "Batch", "stack_channels_last"]

# Tensors up to this size cross by value, larger ones through shared memory: the crossover measured with
# 2 spawn workers handing over uint8 batches of 64 lies between 64 px and 96 px (docs/benchmark.md).
BY_VALUE_MAX_BYTES = 1 << 20


def _pack(t: torch.Tensor) -> Any:
    """Return a small CPU tensor as a numpy array in its memory order (by value), else ``t`` (shared)."""
    if t.device.type != "cpu" or t.requires_grad or t.numel() * t.element_size() > BY_VALUE_MAX_BYTES:
        return t
    nhwc = t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)
    try:
        return ("nhwc", t.permute(0, 2, 3, 1).numpy()) if nhwc else ("dense", t.contiguous().numpy())
    except TypeError:  # a dtype numpy lacks (bfloat16)
        return t


def _unpack(part: Any) -> torch.Tensor:
    if isinstance(part, torch.Tensor):
        return part
    layout, array = part
    t = torch.from_numpy(array)
    return t.permute(0, 3, 1, 2) if layout == "nhwc" else t


def _rebuild_batch(image: Any, label: Any) -> Batch:
    return Batch(_unpack(image), _unpack(label))


class Batch(NamedTuple):
    """A decoded batch: unpacks as ``images, labels``; also ``.image`` and ``.label``.

    Pickled, tensors over ``BY_VALUE_MAX_BYTES`` go through shared memory; shapes and strides are kept.
    """

    image: torch.Tensor  # [B, 3, S, S], float32 in [0, 1] or uint8 in [0, 255]
    label: torch.Tensor  # [B], int64

    def __reduce__(self):
        return (_rebuild_batch, (_pack(self.image), _pack(self.label)))


def _empty(shape: tuple[int, ...], dtype: torch.dtype, shared: bool | None = None) -> torch.Tensor:
    """Return an uninitialised tensor, in shared memory when large and ``shared`` (None: in a worker)."""
    nbytes = int(np.prod(shape)) * torch.empty(0, dtype=dtype).element_size()
    in_worker = torch.utils.data.get_worker_info() is not None
    if nbytes > BY_VALUE_MAX_BYTES and (in_worker if shared is None else shared):
        storage = torch.UntypedStorage._new_shared(nbytes)  # as default_collate does in a worker
        return torch.empty(0, dtype=dtype).set_(storage).view(shape)
    return torch.empty(shape, dtype=dtype)


def stack_channels_last(
    images: list[torch.Tensor], dtype: torch.dtype | None = None, *, shared: bool | None = None
) -> torch.Tensor:
    """Stack ``[3, H, W]`` images into a ``[B, 3, H, W]`` batch stored NHWC (``channels_last``).

    ``dtype=torch.float32`` converts uint8 to float in [0, 1] in the same pass. A batch over
    ``BY_VALUE_MAX_BYTES`` goes into shared memory when ``shared`` (default: inside a DataLoader worker).
    """
    c, h, w = images[0].shape
    out = _empty((len(images), h, w, c), dtype or images[0].dtype, shared)
    hwc = [img.permute(1, 2, 0) for img in images]
    if out.dtype == images[0].dtype:
        torch.stack(hwc, out=out)
    else:
        for i, img in enumerate(hwc):
            out[i].copy_(img)
        if out.is_floating_point() and not images[0].is_floating_point():
            out.div_(255)
    return out.permute(0, 3, 1, 2)

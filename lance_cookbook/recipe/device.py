"""Move a batch to the device and finish the conversion there: uint8 -> float, normalize."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .handover import Batch

__all__ = ["to_device", "IMAGENET_MEAN", "IMAGENET_STD"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def to_device(
    batch: Batch | tuple[torch.Tensor, torch.Tensor],
    device: torch.device | str,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    *,
    non_blocking: bool = True,
    channels_last: bool = False,
) -> Batch:
    """Copy ``(images, labels)`` to ``device``; uint8 images become float32 in [0, 1] there, then normalized.

    Parameters
    ----------
    batch : Batch or tuple of (Tensor, Tensor)
        Images ``[B, 3, H, W]`` (uint8 or floating point) and labels ``[B]``.
    device : torch.device or str
    mean, std : sequence of float, optional
        Per-channel ``(x - mean) / std`` after scaling (``IMAGENET_MEAN``, ``IMAGENET_STD``); both or neither.
    non_blocking, channels_last : bool
        Overlap the copy with compute (when the loader pins memory); return NHWC strides.

    Returns
    -------
    Batch
        Float images and the labels on ``device``; a float input is not modified.

    Raises
    ------
    TypeError, ValueError
        Images neither uint8 nor floating point; only one of ``mean`` and ``std``.
    """
    images, labels = batch
    images = images.to(device, non_blocking=non_blocking)
    labels = labels.to(device, non_blocking=non_blocking)
    if images.dtype == torch.uint8:
        images = images.to(torch.float32).div_(255)
    elif not images.is_floating_point():
        raise TypeError(f"expected uint8 or floating point images, got {images.dtype}")
    if (mean is None) != (std is None):
        raise ValueError("give both mean and std, or neither")
    if mean is not None:
        m = torch.as_tensor(mean, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
        s = torch.as_tensor(std, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
        images = (images - m) / s  # not in place: float input may be the caller's own tensor
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return Batch(images, labels)

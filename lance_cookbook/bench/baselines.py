"""The loaders Lance is compared with: image files read as bytes, row-by-row reads, HF ``datasets``.

Spawn workers unpickle these classes by module name, so they live in an importable module.
"""

from __future__ import annotations

import math
import os
import time
from typing import Any

from torch.utils.data import Dataset
from torchvision import transforms as T
from torchvision.datasets import ImageFolder

from data_prep.disk_usage import dir_bytes

from ..recipe.collate import EVAL_CROP_FRACTION

__all__ = ["BytesImageFolder", "HFTransform", "RowByRowDataset", "load_hf", "pil_eval_transform"]


def pil_eval_transform(size: int) -> T.Compose:
    """What users write today for evaluation, on PIL images.

    ``Resize`` of the shorter side to ``floor(size / EVAL_CROP_FRACTION)``, ``CenterCrop(size)``, ``ToTensor``
    -> float32 ``[3, size, size]`` in [0, 1]; the same geometry as ``ImageCollate(size, train=False)``.
    """
    return T.Compose([T.Resize(math.floor(size / EVAL_CROP_FRACTION)), T.CenterCrop(size), T.ToTensor()])


class BytesImageFolder(ImageFolder):
    """``ImageFolder`` returning ``{"image": <file bytes>, "label": int}``, the rows of ``ImageCollate``."""

    def __getitem__(self, index: int) -> dict[str, Any]:
        path, target = self.samples[index]
        with open(path, "rb") as f:
            return {"image": f.read(), "label": target}


class RowByRowDataset(Dataset):
    """A map-style dataset without ``__getitems__``: the DataLoader fetches one row at a time."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Any:
        return self.dataset[index]


class HFTransform:
    """``set_transform`` callable: PIL images (decoded by ``datasets``) -> :func:`pil_eval_transform`."""

    def __init__(self, size: int):
        self.transform = pil_eval_transform(size)

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        """Transform each image of a batch of HF rows (as RGB); labels pass through."""
        return {
            "image": [self.transform(im.convert("RGB")) for im in batch["image"]],
            "label": batch["label"],
        }


def load_hf(folder: str, cache_dir: str, size: int, progress: bool) -> tuple[Any, dict[str, Any]]:
    """HF ``load_dataset("imagefolder")`` of ``folder`` with :class:`HFTransform`, and what preparing it cost.

    Rows, seconds, images/s and the bytes of its cache.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local builder needs no hub; never wait on a network
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import datasets

    if not progress:
        datasets.disable_progress_bars()
    start = time.perf_counter()
    ds = datasets.load_dataset("imagefolder", data_dir=folder, split="train", cache_dir=cache_dir)
    seconds = time.perf_counter() - start
    ds.set_transform(HFTransform(size))
    apparent, _ = dir_bytes(cache_dir)
    return ds, {
        "rows": len(ds),
        "seconds": seconds,
        "images_per_s": len(ds) / seconds,
        "cache_bytes": apparent,
    }

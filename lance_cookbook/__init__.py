"""lance-cookbook: train PyTorch image models from Lance datasets.

The map-style recipe: ``SafeLanceDataset`` (batched ``take`` of raw image bytes) + ``DistributedSampler``
+ ``DataLoader`` (forkserver or spawn workers, ``pin_memory``) + ``sampler.set_epoch`` + a collate that
decodes the bytes.

The public names below load on first use (PEP 562): most of them need torch (~1 GB of memory, ~3 s on 2
cores), and the conversion (``data_prep``) imports torch-free helpers such as ``lance_cookbook.cli`` that
must not pay for it, in the command nor in its worker processes.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# public name -> the submodule that defines it
_EXPORTS = {
    "BlockShuffleSampler": "block_sampler",
    "Batch": "collate",
    "DecodeError": "collate",
    "ImageCollate": "collate",
    "default_data_dir": "data",
    "DatasetNotFound": "dataset",
    "EmptyDataset": "dataset",
    "LanceImageDataset": "dataset",
    "Rows": "dataset",
    "dataset_options": "dataset",
    "label_names": "dataset",
    "latest_version": "dataset",
    "open_dataset": "dataset",
    "IMAGENET_MEAN": "device",
    "IMAGENET_STD": "device",
    "to_device": "device",
    "check_start_method": "start_method",
    "default_workers": "loader",
    "make_loader": "loader",
    "ReentrantDataLoader": "loader",
    "DataWaitMeter": "meters",
    "SmallCNN": "models",
    "build_model": "models",
    "ResumableDistributedSampler": "sampler",
    "ResumableSampler": "sampler",
    "ShardSampler": "sampler",
}

__all__ = [
    "Batch",
    "BlockShuffleSampler",
    "DataWaitMeter",
    "DecodeError",
    "DatasetNotFound",
    "EmptyDataset",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ImageCollate",
    "LanceImageDataset",
    "ReentrantDataLoader",
    "ResumableDistributedSampler",
    "ResumableSampler",
    "Rows",
    "ShardSampler",
    "SmallCNN",
    "build_model",
    "check_start_method",
    "default_data_dir",
    "dataset_options",
    "default_workers",
    "label_names",
    "latest_version",
    "make_loader",
    "open_dataset",
    "to_device",
]

if TYPE_CHECKING:  # what type checkers, IDEs and linters see; never runs
    from .block_sampler import BlockShuffleSampler
    from .collate import Batch, DecodeError, ImageCollate
    from .data import default_data_dir
    from .dataset import (
        DatasetNotFound,
        EmptyDataset,
        LanceImageDataset,
        Rows,
        dataset_options,
        label_names,
        latest_version,
        open_dataset,
    )
    from .device import IMAGENET_MEAN, IMAGENET_STD, to_device
    from .loader import ReentrantDataLoader, default_workers, make_loader
    from .meters import DataWaitMeter
    from .models import SmallCNN, build_model
    from .sampler import ResumableDistributedSampler, ResumableSampler, ShardSampler
    from .start_method import check_start_method


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))

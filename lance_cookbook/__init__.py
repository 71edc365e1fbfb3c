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
    "BlockShuffleSampler": "recipe.block_sampler",
    "Batch": "recipe.handover",
    "DecodeError": "recipe.collate",
    "ImageCollate": "recipe.collate",
    "default_data_dir": "data",
    "DatasetNotFound": "recipe.dataset",
    "EmptyDataset": "recipe.dataset",
    "InvalidFilter": "recipe.dataset",
    "LanceImageDataset": "recipe.dataset",
    "Rows": "recipe.dataset",
    "dataset_options": "recipe.dataset",
    "label_names": "recipe.dataset",
    "latest_version": "recipe.dataset",
    "open_dataset": "recipe.dataset",
    "resolve_version": "recipe.dataset",
    "IMAGENET_MEAN": "recipe.device",
    "IMAGENET_STD": "recipe.device",
    "to_device": "recipe.device",
    "check_start_method": "recipe.start_method",
    "default_workers": "recipe.loader",
    "make_loader": "recipe.loader",
    "ReentrantDataLoader": "recipe.loader",
    "DataWaitMeter": "recipe.meters",
    "SmallCNN": "training.models",
    "build_model": "training.models",
    "ResumableDistributedSampler": "recipe.sampler",
    "ResumableSampler": "recipe.sampler",
    "ShardSampler": "recipe.sampler",
    "WeightedResumableSampler": "recipe.weighted_sampler",
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
    "InvalidFilter",
    "LanceImageDataset",
    "ReentrantDataLoader",
    "ResumableDistributedSampler",
    "ResumableSampler",
    "Rows",
    "ShardSampler",
    "SmallCNN",
    "WeightedResumableSampler",
    "build_model",
    "check_start_method",
    "default_data_dir",
    "dataset_options",
    "default_workers",
    "label_names",
    "latest_version",
    "make_loader",
    "open_dataset",
    "resolve_version",
    "to_device",
]

if TYPE_CHECKING:  # what type checkers, IDEs and linters see; never runs
    from .data import default_data_dir
    from .recipe.block_sampler import BlockShuffleSampler
    from .recipe.collate import DecodeError, ImageCollate
    from .recipe.dataset import (
        DatasetNotFound,
        EmptyDataset,
        InvalidFilter,
        LanceImageDataset,
        Rows,
        dataset_options,
        label_names,
        latest_version,
        open_dataset,
        resolve_version,
    )
    from .recipe.device import IMAGENET_MEAN, IMAGENET_STD, to_device
    from .recipe.handover import Batch
    from .recipe.loader import ReentrantDataLoader, default_workers, make_loader
    from .recipe.meters import DataWaitMeter
    from .recipe.sampler import ResumableDistributedSampler, ResumableSampler, ShardSampler
    from .recipe.start_method import check_start_method
    from .recipe.weighted_sampler import WeightedResumableSampler
    from .training.models import SmallCNN, build_model


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))

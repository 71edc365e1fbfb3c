"""lance-cookbook: train PyTorch image models from Lance datasets.

The map-style recipe: ``SafeLanceDataset`` (batched ``take`` of raw image bytes) + ``DistributedSampler``
+ ``DataLoader`` (spawn workers, ``pin_memory``) + ``sampler.set_epoch`` + a collate that decodes the bytes.
"""

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
from .loader import check_start_method, default_workers, make_loader
from .meters import DataWaitMeter
from .models import SmallCNN, build_model
from .sampler import ResumableDistributedSampler, ShardSampler

__version__ = "0.1.0"

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
    "ResumableDistributedSampler",
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

"""The datasets of a training run.

Opened at versions all ranks agree on, refused when empty or when their labels cannot size a model, and the
wrappers that seed each training sample's augmentation.
"""

from __future__ import annotations

import argparse
import json
import shlex

import lance
import pyarrow as pa
import pyarrow.compute as pc
from torch.utils.data import Dataset, Sampler

from ..recipe.collate import AUGMENT_SEED, augment_seed
from ..recipe.dataset import EmptyDataset, label_names, open_dataset
from .checkpoint import CheckpointError
from .distributed import agreed_versions


def require_rows(dataset, role: str) -> None:
    """Raise :class:`EmptyDataset` naming ``role``, the URI and the version when ``dataset`` has no rows.

    Training on nothing would otherwise report loss 0 and exit 0 with an untrained model.
    """
    if len(dataset) == 0:
        raise EmptyDataset(
            f"the {role} set {dataset.uri!r} (version {dataset.version}) is empty: it has 0 rows"
        )


# The most classes a model is built for. label_names comes with the data and is not checked by anyone else: a
# corrupt or hostile list of 2,000,000 names made a 7.6 GB model for a 10-class dataset
# (t3-train-label-names-mismatch). ImageNet-21k has 21,841 classes.
MAX_CLASSES = 100_000


class LabelError(ValueError):
    """A dataset whose ``label_names`` metadata or ``label`` column cannot size a model.

    The message names the dataset and the fault.
    """


def checked_label_names(dataset) -> list[str]:
    """The dataset's stored ``label_names`` (:func:`lance_cookbook.label_names`); ``[]`` when it stores none.

    Refused unless it is a JSON list of at most ``MAX_CLASSES`` strings.

    Raises
    ------
    LabelError
        The metadata is not JSON, not a list of strings (another tool wrote ``"cat,dog,eel"``, whose
        ``len`` counted characters: t3-train-label-names-mismatch), or longer than ``MAX_CLASSES``.
    """
    where = f"{dataset.uri!r} (version {dataset.version})"
    try:
        names = label_names(dataset.uri, **dataset.dataset_options)
    except json.JSONDecodeError as e:
        raise LabelError(f"the label_names metadata of {where} is not JSON ({e})") from None
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        shown = json.dumps(names)
        raise LabelError(
            f"the label_names metadata of {where} is not a JSON list of class names: "
            f"{shown[:80]}{'...' if len(shown) > 80 else ''}; rewrite it as a list of strings in class-index "
            "order"
        )
    if len(names) > MAX_CLASSES:
        raise LabelError(
            f"the label_names metadata of {where} names {len(names):,} classes, more than the "
            f"{MAX_CLASSES:,} a model is built for here; check where this metadata came from"
        )
    return names


def count_classes(dataset) -> int:
    """The number of outputs the model needs for ``dataset``.

    ``len(label_names)`` when the dataset stores names (classes without rows in this split included), else the
    largest label + 1; checked against the ``label`` column (read alone, which is cheap in Lance) before any
    training.

    Parameters
    ----------
    dataset : LanceImageDataset
        From :func:`lance_cookbook.open_dataset`; read at its pinned version with its storage options.

    Returns
    -------
    int
        At least 1, at most ``MAX_CLASSES``.

    Raises
    ------
    LabelError
        ``label_names`` is refused by :func:`checked_label_names`; the label column is missing, not of an
        integer type, has nulls or negative values; a label is not covered by ``label_names`` (rows of new
        classes appended without updating the metadata gave a bare "IndexError: Target 6 is out of bounds"
        mid-epoch: ultralytics#4514); or the largest label exceeds ``MAX_CLASSES``.
    """
    names = checked_label_names(dataset)
    where = f"{dataset.uri!r} (version {dataset.version})"
    try:
        labels = lance.dataset(dataset.uri, **dataset.dataset_options).to_table(columns=["label"])["label"]
    except (KeyError, ValueError, OSError) as e:
        raise LabelError(f"cannot read the label column of {where}: {e}") from None
    if not pa.types.is_integer(labels.type):
        raise LabelError(f"the label column of {where} is {labels.type}, not integer class indices")
    if labels.null_count:
        raise LabelError(f"the label column of {where} has {labels.null_count} rows without a label")
    bounds = pc.min_max(labels)
    low, high = bounds["min"].as_py() or 0, bounds["max"].as_py() or 0
    if low < 0:
        raise LabelError(f"the label column of {where} holds {low}: class indices start at 0")
    if names and high >= len(names):
        raise LabelError(
            f"the labels of {where} go up to {high} but its label_names names {len(names)} classes "
            f"({', '.join(names[:5])}{', ...' if len(names) > 5 else ''}): rows of other classes were added "
            "without updating label_names; rewrite label_names to cover every label"
        )
    if high >= MAX_CLASSES:
        raise LabelError(f"the labels of {where} go up to {high:,}: more classes than {MAX_CLASSES:,}")
    return len(names) if names else max(1, high + 1)


def open_datasets(args: argparse.Namespace, rank: int, path=None, state: dict | None = None):
    """Open the rows of ``--train`` and ``--val`` that the filters select, at versions rank 0 resolves.

    ``--version``/``--val-version`` (a number or a tag) or, resuming the checkpoint ``path`` whose loaded
    ``state`` is given, the checkpoint's version, so the resumed epoch reads the rows it began with; else the
    latest. Every rank then opens the same number and evaluates the filters on it, so all agree on the rows.

    Returns
    -------
    tuple
        ``(train_ds, val_ds, selection)``; ``selection`` is ``{"versions", "filters", "tags"}``, each
        ``{"train": ..., "val": ...}``: the numbers read, the filters, the tags given (or resumed).

    Raises
    ------
    DatasetNotFound
        On every rank: no dataset at a URI, or no such version or tag (the message lists those there are).
    CheckpointError
        Resuming on another filter or version (:func:`check_same_rows`).
    InvalidFilter, EmptyDataset
        A filter that is not a predicate over the dataset's columns; an empty set or filter match.
    """
    storage_options = dict(args.storage_option) or None
    uris = {"train": args.train, "val": args.val}
    asked = {"train": args.version, "val": args.val_version}
    saved = state["metrics"] if state else None
    requested, tags = dict(asked), {}
    for key, version in asked.items():
        if version is None and saved:  # resuming: the checkpoint's version, and the tag it was given by
            requested[key], tags[key] = saved["versions"][key], (saved.get("tags") or {}).get(key)
        else:
            tags[key] = version if isinstance(version, str) else None
    selection = {
        "versions": agreed_versions(uris, requested, storage_options, rank),
        "filters": {"train": args.filter, "val": args.val_filter},
        "tags": tags,
    }
    if saved:
        check_same_rows(path, saved, selection, asked)
    opened = {}
    for key, role in (("train", "training"), ("val", "evaluation")):
        ds = open_dataset(
            uris[key],
            filter=selection["filters"][key],
            version=selection["versions"][key],
            storage_options=storage_options,
        )
        ds.tag = tags[key]  # opened by number, like every rank; the tag names it in messages
        require_rows(ds, role)
        opened[key] = ds
    return opened["train"], opened["val"], selection


class EpochPositions(Sampler):
    """A training sampler that yields ``(epoch, position, index)`` instead of ``index``.

    ``position`` is the sample's place in the epoch's global order; every other attribute is the wrapped
    sampler's (:class:`lance_cookbook.recipe.sampler.ResumableDistributedSampler` or
    :class:`lance_cookbook.recipe.block_sampler.BlockShuffleSampler`). With :class:`SeededRows` it gives each
    sample its own augmentation seed.
    """

    def __init__(self, sampler):
        self.sampler = sampler

    def __getattr__(self, name: str):
        if name == "sampler":  # not set yet (copy, unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.sampler, name)

    def __iter__(self):
        epoch = self.sampler.epoch
        pairs = zip(self.sampler.positions(), self.sampler, strict=True)
        return ((epoch, position, index) for position, index in pairs)

    def __len__(self) -> int:
        return len(self.sampler)


class SeededRows(Dataset):
    """Reads the rows of ``(epoch, position, index)`` keys from ``dataset`` and adds each one's seed.

    The seed (``AUGMENT_SEED``: :func:`lance_cookbook.recipe.collate.augment_seed` of ``seed``, epoch and
    position) makes the collate crop and flip a sample the same way in an uninterrupted and in a resumed
    run (t3-ckpt-augment-resume-differs). Pickles with its dataset (cheaply) to the workers.
    """

    def __init__(self, dataset, seed: int):
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitems__(self, keys: list[tuple[int, int, int]]):
        rows = self.dataset.__getitems__([index for _, _, index in keys])
        for row, (epoch, position, _) in zip(rows, keys, strict=True):
            row[AUGMENT_SEED] = augment_seed(self.seed, epoch, position)
        return rows


def check_same_rows(path, saved: dict, selection: dict, asked: dict) -> None:
    """Refuse to resume the checkpoint ``path`` on other rows than it read: another filter or version.

    ``saved`` is the checkpoint's metrics (one written before filters were recorded has none: no filter);
    ``selection`` this run's (``{"versions", "filters", "tags"}``, each ``{"train", "val"}``), versions
    resolved to numbers; ``asked`` the ``--version`` and ``--val-version`` given. Reading the checkpoint's
    rows instead would silently ignore the command line (pytorch/examples#816); reading others would continue
    an epoch whose sampler state describes other rows.

    Raises
    ------
    CheckpointError
        One line naming the checkpoint, what it read, what was asked, and what to do.
    """
    for key, prefix in (("train", "--"), ("val", "--val-")):
        was, now = (saved.get("filters") or {}).get(key), selection["filters"][key]
        if was != now:
            fix = f"pass {prefix}filter {_shell_quoted(was)}" if was else f"drop {prefix}filter"
            was, now = _rows(key, prefix, was), _rows(key, prefix, now)
        elif saved["versions"][key] != selection["versions"][key]:
            tag = (saved.get("tags") or {}).get(key)
            was = f"version {saved['versions'][key]}{f' (tag {tag!r})' if tag else ''} of --{key}"
            now = f"version {selection['versions'][key]} ({prefix}version {asked[key]})"
            fix = f"drop {prefix}version (or pass {prefix}version {saved['versions'][key]})"
        else:
            continue
        raise CheckpointError(
            f"cannot resume from {path}: it read {was}, not {now}: {fix} to resume, or start a new "
            "--checkpoint-dir"
        )


def _rows(key: str, prefix: str, filter: str | None) -> str:
    if filter is None:
        return f"every row of --{key} (no {prefix}filter)"
    return f"the rows of --{key} matching {prefix}filter {_shell_quoted(filter)}"


def _shell_quoted(text: str) -> str:
    """``text`` quoted for a shell, readably: in double quotes unless it holds what they would expand."""
    return f'"{text}"' if not any(c in text for c in '"$`\\!') else shlex.quote(text)

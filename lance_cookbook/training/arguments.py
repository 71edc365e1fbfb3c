"""Argument types and the help formatter of the training script's command line."""

from __future__ import annotations

import argparse
from pathlib import Path


def location(text: str) -> str | Path:
    """Parse where files go (argparse ``type=``): a URI stays a string, anything else is a local ``Path``.

    ``Path("s3://b/k")`` would be the local ``s3:/b/k`` (syne-tune#232).
    """
    return text if "://" in text else Path(text)


def local_dir(text: str) -> Path:
    """Parse a folder that must be local (argparse ``type=``; TensorBoard's ``--log-dir``).

    Raises
    ------
    argparse.ArgumentTypeError
        ``text`` is a URI.
    """
    if "://" in text:
        raise argparse.ArgumentTypeError(f"{text!r} is a URI: TensorBoard logs go to a local folder")
    return Path(text)


def version_or_tag(text: str) -> int | str:
    """Parse a dataset version (argparse ``type=``): an all-digit string is a number, anything else a tag.

    Raises
    ------
    argparse.ArgumentTypeError
        ``text`` is empty.
    """
    if not text:
        raise argparse.ArgumentTypeError("expected a version number or a tag name, got ''")
    return int(text) if text.isascii() and text.isdigit() else text


def add_selection_arguments(parser: argparse.ArgumentParser) -> None:
    """Add which rows a run reads: ``--version``, ``--val-version``, ``--filter`` and ``--val-filter``.

    A version is a number or a tag (:func:`version_or_tag`). Rank 0 resolves a tag, or the latest version, to
    its number, which every rank then reads (:func:`lance_cookbook.training.distributed.agreed_versions`).
    Metrics and checkpoints record the filters, the tags given and the numbers; a resume refuses others
    (:func:`lance_cookbook.training.setup.check_same_rows`).
    """
    latest = "the latest when the job starts, the same on every rank; resuming: the checkpoint's"
    parser.add_argument(
        "--version",
        type=version_or_tag,
        metavar="N|TAG",
        help=f"version of --train to read: a number or a tag name (default: {latest})",
    )
    parser.add_argument(
        "--val-version",
        type=version_or_tag,
        metavar="N|TAG",
        help=f"version of --val to read: a number or a tag name (default: {latest})",
    )
    parser.add_argument(
        "--filter",
        metavar="SQL",
        help='train on the rows of --train matching this Lance SQL predicate, e.g. "label < 5" '
        "(default: all)",
    )
    parser.add_argument(
        "--val-filter",
        metavar="SQL",
        help="evaluate on the rows of --val matching this Lance SQL predicate (default: all)",
    )


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Append "(default: X)" to an option's help unless the help already states it or there is none."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        unstated = action.default is None or action.default is False or action.default == []
        if action.required or unstated or "(default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)

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


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Append "(default: X)" to an option's help unless the help already states it or there is none."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        unstated = action.default is None or action.default is False or action.default == []
        if action.required or unstated or "(default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)

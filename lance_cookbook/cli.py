"""Command-line pieces shared by the package's scripts: the repeatable ``--storage-option KEY=VALUE``."""

from __future__ import annotations

import argparse

__all__ = ["storage_option_arg", "add_storage_option_argument"]


def storage_option_arg(text: str) -> tuple[str, str]:
    """The argparse ``type=`` for one ``KEY=VALUE``; the value may itself contain ``=``.

    Parameters
    ----------
    text : str
        The argument as typed, e.g. ``aws_region=us-east-1``.

    Returns
    -------
    tuple of (str, str)
        ``(key, value)``; ``dict(args.storage_option)`` turns the repeated option into Lance's
        ``storage_options``.

    Raises
    ------
    argparse.ArgumentTypeError
        No ``=``, or an empty key; argparse reports it as a usage error naming the option.
    """
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def add_storage_option_argument(parser: argparse.ArgumentParser, help: str) -> None:
    """Add the repeatable ``--storage-option KEY=VALUE`` to ``parser``.

    Read it as ``dict(args.storage_option)`` (empty when not given).

    Parameters
    ----------
    parser : argparse.ArgumentParser
        The parser to extend.
    help : str
        What the options apply to, shown by ``--help``.
    """
    parser.add_argument(
        "--storage-option",
        action="append",
        type=storage_option_arg,
        default=[],
        metavar="KEY=VALUE",
        help=help,
    )

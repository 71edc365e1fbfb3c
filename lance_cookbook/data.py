"""Where the cookbook keeps its datasets: ``$LANCE_COOKBOOK_DATA`` or ``data/`` beside the notebooks."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["default_data_dir"]


def default_data_dir() -> Path:
    """``$LANCE_COOKBOOK_DATA``, else ``data/`` at the repository root (next to ``notebooks/``). The
    embedded digits are converted there by the conversion package (``ensure_digits``)."""
    env = os.environ.get("LANCE_COOKBOOK_DATA")
    if env:
        return Path(env)
    return Path(__file__).resolve().parent.parent / "data"

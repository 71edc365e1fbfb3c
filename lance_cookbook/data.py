"""Where the cookbook keeps its datasets.

``$LANCE_COOKBOOK_DATA``, else ``data/`` of the checkout or of the current directory.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["default_data_dir"]


def default_data_dir() -> Path:
    """The folder the embedded digits are converted into (``data_prep.digits.ensure_digits``).

    In order: ``$LANCE_COOKBOOK_DATA`` if set; ``data/`` at the root of the repository checkout this
    package runs from (a clone, or an editable install: the root holds ``pyproject.toml`` and
    ``notebooks/``), where ``make run`` writes it; otherwise, for a package installed from a wheel into
    site-packages, ``data/`` in the current working directory, never a folder inside site-packages.

    Returns
    -------
    pathlib.Path
        Not necessarily existing yet; nothing is created here.
    """
    env = os.environ.get("LANCE_COOKBOOK_DATA")
    if env:
        return Path(env)
    root = Path(__file__).resolve().parent.parent
    if (root / "pyproject.toml").is_file() and (root / "notebooks").is_dir():
        return root / "data"
    return Path.cwd() / "data"

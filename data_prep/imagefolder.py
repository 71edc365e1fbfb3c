"""``imagefolder:DIR``: the images of ``DIR/<class>/**`` in torchvision ``ImageFolder``'s order.

They are listed without reading them.

Hidden entries and ``__MACOSX`` are ignored; links are followed unless they loop or lead to something listed
already (named in the source's warnings). File names are untrusted, so every one shown goes through
:func:`~data_prep.sources.printable`.
"""

from __future__ import annotations

import os
from bisect import bisect_right
from collections.abc import Iterable, Iterator
from pathlib import Path, PurePosixPath

from .check import ConversionError
from .sources import IMAGE_EXTENSIONS, Record, Source, printable

__all__ = ["imagefolder_source"]


def _ignored(name: str) -> bool:
    # Hidden entries (.git, .ipynb_checkpoints, macOS's ._x.jpg resource forks) and the __MACOSX folder a
    # macOS zip adds are never images of the dataset; ImageFolder would make a class of them and fail on them.
    return name.startswith(".") or name == "__MACOSX"


def _unfollowed(real: str, root_real: str, seen: set[str]) -> str | None:
    """Why a link resolving to ``real`` is not followed (None: follow it).

    ``root_real`` is the source folder's real path and ``seen`` the real paths already walked or linked to.
    """
    if real == root_real or root_real.startswith(real.rstrip(os.sep) + os.sep):
        return "it leads back to the source folder or above it (a loop)"
    if real.startswith(root_real + os.sep):
        # its target is listed at its own place, under its own class: following it would list it twice
        return f"it leads to {printable(os.path.relpath(real, root_real))} inside the source folder"
    if real in seen:
        return "it leads to a file or folder already listed (a loop or a duplicate)"
    return None


def _walk(
    top: str, top_real: str, root_real: str, seen: set[str], notes: list[str]
) -> list[tuple[str, list]]:
    """``(folder, [(file name, problem | None), ...])`` for ``top`` and every folder under it.

    In the order of torchvision's ``sorted(os.walk(top, followlinks=True))``, names sorted within each
    folder. ``seen``: real paths already listed, updated.

    Hidden entries and ``__MACOSX`` are left out. Links are followed (as ImageFolder does) unless
    :func:`_unfollowed` says otherwise; each link not followed is described in ``notes``. An unreadable
    folder is one entry named ``""`` whose problem says why; a file that is not a regular file (a broken
    link, a pipe) has its problem set too, so the check never blocks on reading it.
    """
    found: list[tuple[str, list]] = []
    stack = [(top, top_real)]
    while stack:
        folder, real = stack.pop()
        seen.add(real)
        try:
            with os.scandir(folder) as it:
                # in name order, so which of two links to one target is followed never depends on the disk
                entries = sorted(it, key=lambda entry: entry.name)
        except OSError as e:
            found.append((folder, [("", f"cannot read folder: {e.strerror or e}")]))
            continue
        # Only links lead out of the tree: out there, every entry is checked against what was listed
        outside = real != root_real and not real.startswith(root_real + os.sep)
        files = []
        for entry in entries:
            if _ignored(entry.name):
                continue
            link = entry.is_symlink()
            target = os.path.realpath(entry.path) if link else os.path.join(real, entry.name)
            if link or outside:
                why = _unfollowed(target, root_real, seen)
                if why is not None:
                    notes.append(f"{printable(entry.path)} not followed: {why}")
                    continue
                seen.add(target)
            try:
                is_dir = entry.is_dir()
                regular = is_dir or entry.is_file()
            except OSError:
                is_dir = regular = False
            if is_dir:
                stack.append((entry.path, target))
                continue
            problem = None
            if not regular:
                problem = "broken link" if link else "not a regular file"
            files.append((entry.name, problem))
        found.append((folder, files))
    found.sort(key=lambda item: item[0])
    return found


def imagefolder_source(root: str | os.PathLike) -> Source:
    r"""``root/<class>/**/<image>`` in torchvision ``ImageFolder`` order.

    Sorted class folders, then, inside each, ``sorted(os.walk(class_folder, followlinks=True))`` with each
    folder's files sorted.

    Hidden files and folders and ``__MACOSX`` folders are ignored. Any other file whose extension is not an
    image extension is reported as invalid (so a stray ``notes.txt`` is not silently dropped), and so is an
    unreadable folder. Links are followed like ImageFolder does, except those leading back to the source
    folder or above it (loops), to anything inside it (listed at its own place already) or to a target
    already listed: those are listed in the source's ``warnings``. File names that are not UTF-8 are read
    as they are and shown (``source`` column, messages) with their odd bytes as ``\xNN``.

    Raises :class:`ConversionError` when ``root`` is not a readable folder, holds no class folder, a class
    folder is a link that is not followed, or a class folder holds no files.
    """
    root = Path(root)
    if not root.exists():
        raise ConversionError(f"imagefolder: source folder {printable(str(root))} does not exist")
    if not root.is_dir():
        raise ConversionError(f"imagefolder: source {printable(str(root))} is not a folder")
    try:
        classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not _ignored(e.name))
    except OSError as e:
        where = printable(str(root))
        raise ConversionError(f"imagefolder: {where}: cannot read folder: {e.strerror or e}") from None
    if not classes:
        raise ConversionError(
            f"imagefolder: {printable(str(root))} holds no class folders (expected "
            f"{printable(str(root))}/<class>/<image>)"
        )
    root_real = os.path.realpath(root)
    seen: set[str] = set()
    notes: list[str] = []
    # Relative paths as plain strings, one list for all classes: Path objects cost ~5x the memory and time.
    rels: list[str] = []
    problems: dict[int, str] = {}  # position in rels -> what is wrong with it (rare)
    ends: list[int] = []  # ends[label]: one past the class's last entry in rels
    for name in classes:
        top = str(root / name)
        top_real = os.path.realpath(top)
        if os.path.islink(top) and (why := _unfollowed(top_real, root_real, seen)) is not None:
            raise ConversionError(f"imagefolder: class folder {printable(top)} is a link not followed: {why}")
        before = len(rels)
        for dirpath, files in _walk(top, top_real, root_real, seen, notes):
            folder = name + dirpath[len(top) :].replace(os.sep, "/")
            for file, problem in files:
                if problem is not None:
                    problems[len(rels)] = problem
                rels.append(f"{folder}/{file}")
        if len(rels) == before:
            raise ConversionError(f"imagefolder: class folder {printable(top)} holds no files")
        ends.append(len(rels))
    # Resolved here, where the command runs: a worker process or Ray task may run in another directory
    base = os.path.abspath(root)
    expected = ", ".join(IMAGE_EXTENSIONS)

    def at(positions: Iterable[int]) -> Iterator[Record]:
        for i in positions:
            rel = rels[i]
            problem = problems.get(i)
            if problem is None and not rel.lower().endswith(IMAGE_EXTENSIONS):
                suffix = PurePosixPath(rel).suffix
                problem = f"unsupported extension {suffix or '(none)'!r} (expected one of {expected})"
            path = os.path.join(base, rel)
            # the label is the class whose slice of rels holds i
            yield Record(source=printable(rel), label=bisect_right(ends, i), path=path, problem=problem)

    names = [printable(c) for c in classes]
    description = f"image folder {printable(str(root))}"
    return Source(at(range(len(rels))), names, description, total=len(rels), warnings=notes, at=at)

"""What a conversion produced: :class:`Written` and :class:`Summary`.

:class:`Written` is counted while its rows are written; :class:`Summary` is what
:func:`data_prep.convert.convert` returns after the commit.

Neither loads Lance: the checking workers import the conversion's modules again.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .check import ConversionError, InvalidImage
from .sources import printable

if TYPE_CHECKING:
    from lance.fragment import FragmentMetadata

__all__ = ["Summary", "Written"]


@dataclass
class Written:
    """What a conversion wrote before its commit, counted as its rows are written.

    ``fragments``: the data files, in source order; ``rows``: valid rows written, ``labels`` how many of
    them per label (-1: no label) and ``image_bytes`` the bytes of their images; ``skipped``: the message
    of each invalid image passed over.
    """

    fragments: list[FragmentMetadata] = field(default_factory=list)
    rows: int = 0
    labels: Counter[int] = field(default_factory=Counter)
    image_bytes: int = 0
    skipped: list[str] = field(default_factory=list)

    def add(self, label: int, n_bytes: int) -> None:
        """Count one valid row: its label and the bytes of its image."""
        self.rows += 1
        self.labels[label] += 1
        self.image_bytes += n_bytes

    def skip(self, error: InvalidImage, skip_invalid: bool, progress) -> None:
        """Raise ``error``, or with ``skip_invalid`` list it and show the count on the ``progress`` bar."""
        if not skip_invalid:
            raise error
        self.skipped.append(str(error))
        progress.set_postfix(skipped=len(self.skipped))

    def require_rows(self, description: str) -> None:
        """Raise :class:`ConversionError` naming ``description`` (the source) when no row was valid."""
        if self.rows == 0:
            more = f" ({len(self.skipped)} invalid skipped)" if self.skipped else ""
            raise ConversionError(f"{description}: no valid images to write{more}")


@dataclass
class Summary:
    """What a conversion wrote.

    ``rows`` and ``classes`` at ``output`` (dataset ``version``), the bytes of the images and (local output)
    on disk, and ``seconds`` it took; ``skipped`` lists invalid images passed over, ``unlabelled`` counts
    rows with label -1, ``warnings`` the source's notes (links not followed).
    """

    output: str
    rows: int
    classes: int
    image_bytes: int
    disk_bytes: int | None
    seconds: float
    version: int
    skipped: list[str]
    unlabelled: int = 0  # rows with label -1 (no label in the source, e.g. a hub test split)
    warnings: list[str] = field(default_factory=list)

    @property
    def images_per_s(self) -> float:
        """Rows written per second (``inf`` when ``seconds`` is 0)."""
        return self.rows / self.seconds if self.seconds > 0 else float("inf")

    def __str__(self) -> str:
        """The summary as printed.

        Names of files, the output and the source's notes are shown with :func:`~data_prep.sources.printable`,
        so no control character reaches the terminal (bat#3691).
        """
        disk = f", {self.disk_bytes / 1e6:,.1f} MB on disk" if self.disk_bytes is not None else ""
        line = (
            f"wrote {printable(self.output)} (version {self.version}): {self.rows:,} rows, "
            f"{self.classes} classes, "
            f"{self.image_bytes / 1e6:,.1f} MB of image bytes{disk}, {self.seconds:.1f} s "
            f"({self.images_per_s:,.0f} images/s)"
        )
        if self.unlabelled:
            some = "all" if self.unlabelled == self.rows else f"{self.unlabelled:,} of"
            line += f"\nunlabelled: {some} {self.rows:,} rows have label -1 (the source gives no label)"
        if self.skipped:
            skipped = "\n  ".join(map(printable, self.skipped))
            line += f"\nskipped {len(self.skipped)} invalid image(s):\n  {skipped}"
        if self.warnings:
            line += "\nnote:\n  " + "\n  ".join(map(printable, self.warnings))
        return line

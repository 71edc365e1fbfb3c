"""Shuffle quality: how well a sampler's batches mix the classes, against a full shuffle."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence

__all__ = ["mean_batch_entropy"]


def mean_batch_entropy(labels: Sequence[int], order: Iterable[int], batch_size: int) -> float:
    """Shuffle quality: the mean Shannon entropy (bits) of the label mix of each full batch of ``order``.

    Compare it with the same figure for a uniformly random permutation: a sampler whose batches mix classes
    as well as a full shuffle scores the same; batches of one class score 0.

    Parameters
    ----------
    labels : Sequence[int]
        Label of each row, length ``n``.
    order : Iterable[int]
        Row positions in the order a sampler yields them (one rank's, or all ranks' concatenated).
    batch_size : int
        Rows per batch; a last, partial batch is left out.

    Returns
    -------
    float
        Mean entropy in bits (0.0 if there is no full batch); at most ``log2(min(batch_size, classes))``.

    Raises
    ------
    ValueError
        If ``batch_size < 1``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    rows = list(order)
    entropies = []
    for start in range(0, len(rows) - batch_size + 1, batch_size):
        counts = Counter(labels[r] for r in rows[start : start + batch_size]).values()
        entropies.append(-sum(c / batch_size * math.log2(c / batch_size) for c in counts))
    return sum(entropies) / len(entropies) if entropies else 0.0

"""Weighted and class-balanced sampling under DDP that resumes mid-epoch (pytorch/pytorch#77154).

``WeightedRandomSampler`` has no DDP form: ranks with the same seed draw the same rows. Here every rank
makes the epoch's same global draws and takes draws ``r, r + w, ...`` (:class:`.sampler.ResumableSampler`),
so each draw goes to one rank and ``(epoch, samples consumed)`` resumes exactly, on any world size.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np
import torch

from .sampler import ResumableSampler, pad_order

__all__ = ["WeightedResumableSampler"]


class WeightedResumableSampler(ResumableSampler):
    """Draw ``num_samples`` rows an epoch with probability proportional to ``weights``, one rank a draw.

    With replacement, draws are by inverse CDF over a float64 cumulative sum (``torch.searchsorted``), not
    ``torch.multinomial``, which refuses more than 2**24 rows: O(n + draws) time, ``8 n`` bytes a rank.
    Without replacement, the rows of largest key ``log(u) / weight`` (Efraimidis & Spirakis 2006).

    Parameters
    ----------
    weights : array-like of float
        Shape ``[n]``, one per dataset row (``len(dataset)``), finite, ``>= 0``, not all 0: a weight column,
        or :meth:`from_labels` for class balance. Rows of weight 0 are never drawn.
    num_samples : int, optional
        Draws an epoch for all ranks together (default ``n``); rounded up to a multiple of the world size
        with further draws (down with ``drop_last``).
    num_replicas, rank, seed, drop_last
        As :class:`.sampler.ResumableSampler`'s: epoch ``e`` draws from ``seed + e``, the same on every rank.
    replacement : bool, default True
        ``False``: distinct rows; ``num_samples`` must not exceed the rows of positive weight.

    Raises
    ------
    ValueError
        Weights not 1-D, empty, negative, NaN/inf or all 0; ``num_samples < 1``; more samples than rows of
        positive weight without replacement; a bad rank. :meth:`load_state_dict` refuses a checkpoint whose
        weights (their SHA-256), ``num_samples``, ``replacement``, seed or dataset length differ.
    """

    _order_keys = (*ResumableSampler._order_keys, "num_samples", "replacement", "weights_sha256")

    def __init__(
        self,
        weights: Sequence[float] | np.ndarray | torch.Tensor,
        num_samples: int | None = None,
        num_replicas: int | None = None,
        rank: int | None = None,
        replacement: bool = True,
        seed: int = 0,
        drop_last: bool = False,
    ):
        w = torch.as_tensor(np.asarray(weights, dtype=np.float64))
        if w.ndim != 1 or len(w) == 0 or not torch.isfinite(w).all() or (w < 0).any():
            raise ValueError(f"weights must be 1-D, non-empty, finite and >= 0 (shape {tuple(w.shape)})")
        self.positive = int((w > 0).sum())
        if self.positive == 0:
            raise ValueError("weights are all 0: nothing can be drawn")
        self.weights, self.replacement = w, bool(replacement)
        self.num_samples = len(w) if num_samples is None else int(num_samples)
        if self.num_samples < 1 or (not self.replacement and self.num_samples > self.positive):
            raise ValueError(
                f"num_samples={self.num_samples} must be >= 1 and, without replacement, at most the "
                f"{self.positive} rows of positive weight"
            )
        self.weights_sha256 = hashlib.sha256(w.numpy().tobytes()).hexdigest()
        super().__init__(w, num_replicas, rank, shuffle=True, seed=seed, drop_last=drop_last)

    @classmethod
    def from_labels(
        cls, labels: Sequence[int] | np.ndarray, class_weights: Sequence[float] | None = None, **kwargs
    ) -> WeightedResumableSampler:
        """Class-balanced sampler: row ``i`` weighs ``class_weights[labels[i]] / count(labels[i])``.

        ``labels``: int, shape ``[n]``, values ``>= 0`` (e.g. a dataset's label column); ``class_weights``:
        float, shape ``[num_classes]``, each class's share (default: every class present equally often).
        Other arguments are the constructor's. Raises ``ValueError`` on negative or no labels, or
        ``class_weights`` shorter than the largest label + 1.
        """
        labels = np.asarray(labels, dtype=np.int64)
        if labels.ndim != 1 or len(labels) == 0 or labels.min() < 0:
            raise ValueError("labels must be a non-empty 1-D sequence of class indices >= 0")
        counts = np.bincount(labels)
        share = (counts > 0).astype(np.float64) if class_weights is None else np.asarray(class_weights, float)
        if len(share) < len(counts):
            raise ValueError(f"class_weights has {len(share)} entries but labels go up to {len(counts) - 1}")
        return cls(share[labels] / counts[labels], **kwargs)

    def _padded_size(self) -> int:
        n, w = self.num_samples, self.num_replicas
        return n - n % w if self.drop_last else -(-n // w) * w

    def _order(self) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        if self.replacement:
            cdf = torch.cumsum(self.weights, 0)
            u = torch.rand(self.total_size, generator=g, dtype=torch.float64) * cdf[-1]
            # right=True: a weight-0 row repeats the cdf value before it, so it is never the first above u
            return torch.searchsorted(cdf, u, right=True).clamp_(max=len(cdf) - 1)
        keys = torch.rand(len(self.weights), generator=g, dtype=torch.float64).log_() / self.weights
        chosen = torch.topk(keys, min(self.total_size, self.positive)).indices  # -inf keys (weight 0) last
        return pad_order(chosen, self.total_size)

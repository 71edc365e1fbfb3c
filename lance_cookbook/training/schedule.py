"""Learning-rate schedule as a function of training progress, so it survives a change of world size."""

from __future__ import annotations

import math

import torch

__all__ = ["OneCycleSchedule"]


class OneCycleSchedule:
    """One-cycle learning rate read at a point of training **progress** in [0, 1], not at a step count.

    It has ``torch.optim.lr_scheduler.OneCycleLR``'s cosine shape and defaults.

    ``OneCycleLR`` counts optimizer steps, and the number of steps per epoch changes when a job restarts
    with another number of processes; progress (``(epoch + samples consumed / epoch size) / epochs``)
    does not. Only the learning rate is scheduled (``OneCycleLR`` also cycles the momentum by default).

    Parameters
    ----------
    optimizer : torch.optim.Optimizer
        Its param groups' ``lr`` is set by :meth:`set_progress`.
    max_lr : float
        The peak learning rate, reached at ``pct_start``.
    pct_start : float
        Share of training spent rising from ``max_lr / div_factor`` to ``max_lr``.
    div_factor, final_div_factor : float
        Start at ``max_lr / div_factor``; end at that divided by ``final_div_factor``.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        max_lr: float,
        *,
        pct_start: float = 0.3,
        div_factor: float = 25.0,
        final_div_factor: float = 1e4,
    ):
        if not 0 < pct_start < 1:
            raise ValueError(f"pct_start must be in (0, 1), got {pct_start}")
        self.optimizer = optimizer
        self.max_lr = max_lr
        self.pct_start = pct_start
        self.div_factor = div_factor
        self.final_div_factor = final_div_factor
        self.set_progress(0.0)

    def lr_at(self, progress: float) -> float:
        """The learning rate at ``progress`` (clamped to [0, 1])."""
        progress = min(1.0, max(0.0, progress))
        initial = self.max_lr / self.div_factor
        if progress < self.pct_start:
            start, end, pct = initial, self.max_lr, progress / self.pct_start
        else:
            start, end = self.max_lr, initial / self.final_div_factor
            pct = (progress - self.pct_start) / (1 - self.pct_start)
        return end + (start - end) / 2 * (math.cos(math.pi * pct) + 1)

    def set_progress(self, progress: float) -> float:
        """Set every param group's ``lr`` for ``progress``; return it."""
        self.progress = progress
        lr = self.lr_at(progress)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr

    def state_dict(self) -> dict[str, float]:
        """The schedule's parameters and the progress last set."""
        return {
            "max_lr": self.max_lr,
            "pct_start": self.pct_start,
            "div_factor": self.div_factor,
            "final_div_factor": self.final_div_factor,
            "progress": self.progress,
        }

    def load_state_dict(self, state: dict[str, float]) -> None:
        """Restore the parameters and set the learning rate for the saved progress."""
        self.max_lr = state["max_lr"]
        self.pct_start = state["pct_start"]
        self.div_factor = state["div_factor"]
        self.final_div_factor = state["final_div_factor"]
        self.set_progress(state["progress"])

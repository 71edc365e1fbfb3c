"""Plotting helpers for the notebooks: an image grid with titles and a training-curve plot.

matplotlib is imported inside the functions, so ``import lance_cookbook`` (and every DataLoader worker)
stays free of it.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from PIL import Image

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["show_images", "plot_history"]


def _to_display(image: Any) -> Any:
    """An array matplotlib can draw: encoded bytes, a PIL image, or a ``[C, H, W]`` tensor."""
    if isinstance(image, (bytes, bytearray, memoryview)):
        with Image.open(io.BytesIO(image)) as im:
            image = im.convert("RGB")
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, torch.Tensor):
        t = image.detach().cpu()
        if t.ndim != 3:
            raise ValueError(f"expected one [C, H, W] image, got shape {tuple(t.shape)}")
        t = t.float() / 255 if t.dtype == torch.uint8 else t.float()
        t = t.clamp(0, 1)  # normalized or augmented floats may leave [0, 1]
        return t.permute(1, 2, 0).squeeze(-1).numpy()
    raise TypeError(f"cannot show {type(image).__name__}: give bytes, a PIL image or a [C, H, W] tensor")


def show_images(
    images: Sequence[Any] | torch.Tensor,
    titles: Sequence[str] | None = None,
    *,
    ncols: int = 8,
    size: float = 1.3,
    suptitle: str | None = None,
) -> Figure:
    """Draw ``images`` in a grid, each with its title (e.g. its label name); return the figure.

    ``images``: encoded image bytes, PIL images, ``[C, H, W]`` tensors (uint8 in [0, 255] or float in
    [0, 1]; other floats are clipped), or one ``[B, C, H, W]`` batch. Small images are drawn with
    ``nearest`` interpolation, so 8x8 digits stay sharp squares. ``size``: inches per cell.
    """
    import matplotlib.pyplot as plt

    items = list(images.unbind(0)) if isinstance(images, torch.Tensor) else list(images)
    if not items:
        raise ValueError("no images to show")
    if titles is not None and len(titles) != len(items):
        raise ValueError(f"{len(titles)} titles for {len(items)} images")
    ncols = max(1, min(ncols, len(items)))
    nrows = math.ceil(len(items) / ncols)
    fig, axes = plt.subplots(
        nrows, ncols, figsize=(ncols * size, nrows * (size + 0.25)), squeeze=False, layout="constrained"
    )
    for i, ax in enumerate(axes.flat):
        ax.set_axis_off()
        if i >= len(items):
            continue
        ax.imshow(_to_display(items[i]), cmap="gray", interpolation="nearest")
        if titles is not None:
            ax.set_title(str(titles[i]), fontsize=9)
    if suptitle:
        fig.suptitle(suptitle)
    return fig


def plot_history(epochs: Sequence[Mapping[str, float]], *, title: str | None = None) -> Figure:
    """Plot ``train_loss`` and ``val_accuracy`` per epoch side by side; return the figure.

    ``epochs``: the ``"epochs"`` list of the metrics JSON that ``lance_cookbook.train`` writes, one
    mapping per epoch with at least ``epoch``, ``train_loss`` and ``val_accuracy`` (a fraction).
    """
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator, PercentFormatter

    if not epochs:
        raise ValueError("no epochs to plot")
    x = [int(e["epoch"]) + 1 for e in epochs]  # metrics of epoch index e are measured after e + 1 epochs
    accuracy = [e["val_accuracy"] for e in epochs]
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.2), layout="constrained")
    left.plot(x, [e["train_loss"] for e in epochs], marker="o")
    left.set(xlabel="epochs trained", ylabel="training loss", title="training loss (mean over all ranks)")
    right.plot(x, accuracy, marker="o", color="tab:green")
    right.set(xlabel="epochs trained", ylabel="held-out accuracy", title="held-out accuracy", ylim=(0, 1.05))
    right.yaxis.set_major_formatter(PercentFormatter(1.0))
    right.annotate(
        f"{accuracy[-1]:.1%}", (x[-1], accuracy[-1]), xytext=(0, -14), textcoords="offset points", ha="right"
    )
    for ax in (left, right):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    return fig

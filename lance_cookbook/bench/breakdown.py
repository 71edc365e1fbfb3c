"""Where a worker's time goes: CPU microseconds per image of each step of loader (g), timed on its own."""

from __future__ import annotations

import io
import time
from typing import Any

import lance
import torch
from torchvision.io import ImageReadMode, decode_jpeg

from ..recipe.collate import JPEG_MAGIC, Batch, ImageCollate, stack_channels_last
from ..recipe.dataset import LanceImageDataset

__all__ = ["breakdown"]


def breakdown(
    uri: str, files: list[str], order: list[int], size: int, batch_size: int, images: int
) -> list[dict[str, Any]]:
    """CPU microseconds per image of each step a worker of (g) (``lance_tv_uint8``) takes, and of others.

    The others are the alternatives to each step. Measured in this process with one torch thread, best of 3
    passes over the first ``images`` of ``order`` in batches. ``files[i]`` is the image file of row ``i`` of
    ``uri``.

    Lance's own threads count (``time.process_time``), so a ``take`` is charged all the CPU it uses.
    """
    from multiprocessing.reduction import ForkingPickler

    order = order[:images]
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    ds = lance.dataset(uri)
    n_rows = ds.count_rows()
    run = max(1, min(16, n_rows))  # rows per contiguous run: what a block-shuffled order reads
    per_batch = max(1, batch_size // run)  # runs per batch
    runs = [min(start, n_rows - run) for start in order[: max(1, len(order) // run)]]
    run_batches = [
        sorted(r + j for r in runs[i : i + per_batch] for j in range(run))
        for i in range(0, len(runs), per_batch)
    ]
    dataset = LanceImageDataset(uri)
    collate = ImageCollate(size, decoder="torchvision", dtype=torch.uint8)
    rows = [dataset.__getitems__(b) for b in batches]
    blobs = [[row["image"] for row in batch] for batch in rows]
    if not all(b.startswith(JPEG_MAGIC) for batch in blobs for b in batch):
        raise ValueError(f"--breakdown times the JPEG path: {uri} holds images of other formats")
    views = [[torch.frombuffer(b, dtype=torch.uint8) for b in batch] for batch in blobs]
    decoded = [decode_jpeg(v, mode=ImageReadMode.RGB) for v in views]
    resized = [[collate._geometry(img) for img in batch] for batch in decoded]
    stacked = [Batch(stack_channels_last(batch, shared=False), torch.zeros(len(batch))) for batch in resized]

    def read_files() -> None:
        for batch in batches:
            for i in batch:
                with open(files[i], "rb") as f:
                    f.read()

    def pickle_batches() -> None:
        for batch in stacked:
            ForkingPickler(io.BytesIO(), 2).dump(batch)

    steps: list[tuple[str, Any, int]] = [
        (
            "Lance take, random rows, image + label",
            lambda: [ds.take(b, columns=["image", "label"]) for b in batches],
            len(order),
        ),
        (
            f"Lance take, runs of {run} contiguous rows",
            lambda: [ds.take(b, columns=["image", "label"]) for b in run_batches],
            sum(map(len, run_batches)),
        ),
        (
            "Lance take + rows as Python dicts (the rows)",
            lambda: [ds.take(b, columns=["image", "label"]).to_pylist() for b in batches],
            len(order),
        ),
        ("read the same files (ImageFolder)", read_files, len(order)),
        (
            "decode_jpeg, one call per batch",
            lambda: [decode_jpeg(v, mode=ImageReadMode.RGB) for v in views],
            len(order),
        ),
        (
            "resize (torchvision kernels)",
            lambda: [[collate._geometry(i) for i in b] for b in decoded],
            len(order),
        ),
        (
            "stack channels_last, private memory",
            lambda: [stack_channels_last(b, shared=False) for b in resized],
            len(order),
        ),
        (
            "stack channels_last, new shared memory",
            lambda: [stack_channels_last(b, shared=True) for b in resized],
            len(order),
        ),
        ("torch.stack into NCHW (for comparison)", lambda: [torch.stack(b) for b in resized], len(order)),
        ("pickle the batch (worker -> main)", pickle_batches, len(order)),
    ]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    out = []
    try:
        for name, fn, count in steps:
            fn()  # warm-up
            best = min(_cpu_pass(fn) for _ in range(3))
            out.append({"step": name, "cpu_us_per_image": best * 1e6 / max(count, 1)})
    finally:
        torch.set_num_threads(threads)
    return out


def _cpu_pass(fn: Any) -> float:
    start = time.process_time()
    fn()
    return time.process_time() - start

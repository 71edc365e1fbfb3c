"""Where a worker's time goes: CPU microseconds per image of each step of loader (g), timed on its own."""

from __future__ import annotations

import io
import time
from typing import Any

import lance
import torch
from torchcodec.decoders import decode_jpeg

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
    order = order[:images]
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    ds = lance.dataset(uri)
    run, run_batches = _run_batches(ds.count_rows(), order, batch_size)
    collate = ImageCollate(size, decoder="torchvision", dtype=torch.uint8)
    stages = _stages(uri, batches, collate)
    steps = _read_steps(ds, files, batches, run, run_batches) + _worker_steps(stages, collate, len(order))
    return _time_steps(steps)


def _run_batches(n_rows: int, order: list[int], batch_size: int) -> tuple[int, list[list[int]]]:
    """Rows per contiguous run and the batches of runs a block-shuffled order of ``order``'s length reads."""
    run = max(1, min(16, n_rows))  # rows per contiguous run: what a block-shuffled order reads
    per_batch = max(1, batch_size // run)  # runs per batch
    runs = [min(start, n_rows - run) for start in order[: max(1, len(order) // run)]]
    run_batches = [
        sorted(r + j for r in runs[i : i + per_batch] for j in range(run))
        for i in range(0, len(runs), per_batch)
    ]
    return run, run_batches


def _stages(uri: str, batches: list[list[int]], collate: ImageCollate) -> dict[str, list[Any]]:
    """Each step's input, made once: the JPEG views, decoded, resized and stacked batches.

    Raises
    ------
    ValueError
        If an image of ``batches`` is not a JPEG.
    """
    dataset = LanceImageDataset(uri)
    rows = [dataset.__getitems__(b) for b in batches]
    blobs = [[row["image"] for row in batch] for batch in rows]
    if not all(b.startswith(JPEG_MAGIC) for batch in blobs for b in batch):
        raise ValueError(f"--breakdown times the JPEG path: {uri} holds images of other formats")
    views = [[torch.frombuffer(b, dtype=torch.uint8) for b in batch] for batch in blobs]
    decoded = [decode_jpeg(v, mode="RGB") for v in views]
    resized = [[collate._geometry(img) for img in batch] for batch in decoded]
    stacked = [Batch(stack_channels_last(batch, shared=False), torch.zeros(len(batch))) for batch in resized]
    return {"views": views, "decoded": decoded, "resized": resized, "stacked": stacked}


def _read_steps(
    ds: Any, files: list[str], batches: list[list[int]], run: int, run_batches: list[list[int]]
) -> list[tuple[str, Any, int]]:
    """The reads timed: Lance ``take`` (random rows, runs, to Python dicts) and the image files."""
    images = sum(map(len, batches))

    def read_files() -> None:
        for batch in batches:
            for i in batch:
                with open(files[i], "rb") as f:
                    f.read()

    return [
        (
            "Lance take, random rows, image + label",
            lambda: [ds.take(b, columns=["image", "label"]) for b in batches],
            images,
        ),
        (
            f"Lance take, runs of {run} contiguous rows",
            lambda: [ds.take(b, columns=["image", "label"]) for b in run_batches],
            sum(map(len, run_batches)),
        ),
        (
            "Lance take + rows as Python dicts (the rows)",
            lambda: [ds.take(b, columns=["image", "label"]).to_pylist() for b in batches],
            images,
        ),
        ("read the same files (ImageFolder)", read_files, images),
    ]


def _worker_steps(
    stages: dict[str, list[Any]], collate: ImageCollate, images: int
) -> list[tuple[str, Any, int]]:
    """The rest of a worker's steps timed, each on the output of the one before (:func:`_stages`)."""
    from multiprocessing.reduction import ForkingPickler

    views, decoded, resized = stages["views"], stages["decoded"], stages["resized"]

    def pickle_batches() -> None:
        for batch in stages["stacked"]:
            ForkingPickler(io.BytesIO(), 2).dump(batch)

    return [
        (
            "decode_jpeg, one call per batch (TorchCodec)",
            lambda: [decode_jpeg(v, mode="RGB") for v in views],
            images,
        ),
        (
            "resize (torchvision kernels)",
            lambda: [[collate._geometry(i) for i in b] for b in decoded],
            images,
        ),
        (
            "stack channels_last, private memory",
            lambda: [stack_channels_last(b, shared=False) for b in resized],
            images,
        ),
        (
            "stack channels_last, new shared memory",
            lambda: [stack_channels_last(b, shared=True) for b in resized],
            images,
        ),
        ("torch.stack into NCHW (for comparison)", lambda: [torch.stack(b) for b in resized], images),
        ("pickle the batch (worker -> main)", pickle_batches, images),
    ]


def _time_steps(steps: list[tuple[str, Any, int]]) -> list[dict[str, Any]]:
    """Best of 3 CPU passes of each step (after a warm-up), in microseconds per image, on one torch thread."""
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

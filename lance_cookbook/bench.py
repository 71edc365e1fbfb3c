"""Loader benchmark: images/s of PyTorch loaders over the same images, from an image folder and from Lance.

    python -m lance_cookbook.bench --imagefolder DIR [--lance URI] [--image-size S] [--batch-size B]
        [--workers W] [--epochs E] [--json FILE] [--plot FILE] [--quick]
        [--generate N --generate-size WxH]

Every loader reads the same images in the same shuffled order, with the same batch size, the same number
of ``spawn`` workers (kept alive across epochs) and the same output size. The first epoch of each loader is
a warm-up (its time to the first batch is reported as start-up); the timed epochs of all loaders are
interleaved, round after round, and the best round of each is kept, so a burst of load from elsewhere on
the machine hurts every loader alike instead of one. The decode bounds are the decode + resize of one
image format in a plain loop on one core (one torch thread), times the workers: what the workers could
reach if reading, batching and handing tensors to the main process cost nothing.

Loaders (keys for ``--loaders``):
  bound_pil          (a) PIL decode + Resize + ToTensor in a loop, 1 core x workers
  bound_tv           (a) torchvision decode_jpeg + uint8 Resize in a loop, 1 core x workers
  imagefolder_pil    (b) torchvision ImageFolder + Resize((S, S)) + ToTensor: what users write today
  imagefolder_tv     (c) ImageFolder reading bytes + the collate of (g): isolates the storage format
  hf_datasets        (d) HF datasets load_dataset("imagefolder") + set_transform(Resize + ToTensor)
  lance_rows         (e) SafeLanceDataset row by row (one take per image) + the collate of (g)
  lance_documented   (f) make_loader + ImageCollate(S) (decoder="pil", float32): the recipe as printed
  lance_ours         (g) make_loader + ImageCollate(S, decoder="torchvision", dtype=torch.uint8): the recipe
                         (LanceImageDataset: image and label columns only, one sorted take per batch)
  lance_all_columns  (h) (g) through SafeLanceDataset as is: every column, indices in sampler order
  lance_arrow        (i) (g) with the Arrow table handed to the collate: JPEG bytes decoded in place, no
                         Python bytes or dicts

``--breakdown`` also times each step of a worker of (g) on its own (CPU us per image), and every loader
reports the CPU time per image its main process and its workers spent in the best timed epoch.

Also reported: conversion images/s and peak RSS (in a fresh process), bytes on disk per format, peak RSS
of the main process (per loader) and of the workers. Output: a table on stdout, ``--json``, ``--plot``.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import lance
import numpy as np
import pyarrow as pa
import torch
from lance.torch.data import SafeLanceDataset
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T
from torchvision.datasets import ImageFolder
from torchvision.io import ImageReadMode, decode_jpeg

from data_prep.convert import dir_bytes

from .collate import JPEG_MAGIC, Batch, ImageCollate, stack_channels_last
from .dataset import LanceImageDataset
from .loader import default_workers, make_loader

__all__ = [
    "BytesImageFolder",
    "RowByRowDataset",
    "HFTransform",
    "ArrowLanceDataset",
    "ArrowImageCollate",
    "jpeg_views",
    "LOADERS",
    "run",
    "main",
]

LOADERS: dict[str, str] = {
    "bound_pil": "(a) decode bound: PIL, 1 core x workers",
    "bound_tv": "(a) decode bound: torchvision, 1 core x workers",
    "imagefolder_pil": "(b) ImageFolder + PIL Resize+ToTensor",
    "imagefolder_tv": "(c) ImageFolder bytes + torchvision collate",
    "hf_datasets": "(d) HF datasets imagefolder + set_transform",
    "lance_rows": "(e) SafeLanceDataset row by row",
    "lance_documented": "(f) documented: ImageCollate pil float32",
    "lance_ours": "(g) ours: ImageCollate torchvision uint8",
    "lance_all_columns": "(h) (g) via SafeLanceDataset: all columns",
    "lance_arrow": "(i) (g) + Arrow table decoded in place",
}
BOUNDS = ("bound_pil", "bound_tv")
MB = 1024 * 1024


# ---------------------------------------------------------------------------------- worker-side pieces
# Everything a spawn worker unpickles lives here, in an importable module.
class BytesImageFolder(ImageFolder):
    """``ImageFolder`` returning ``{"image": <file bytes>, "label": int}``, the rows of ``ImageCollate``."""

    def __getitem__(self, index: int) -> dict[str, Any]:
        path, target = self.samples[index]
        with open(path, "rb") as f:
            return {"image": f.read(), "label": target}


class RowByRowDataset(Dataset):
    """A map-style dataset without ``__getitems__``: the DataLoader fetches one row at a time."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Any:
        return self.dataset[index]


class HFTransform:
    """``set_transform`` callable: PIL images (decoded by ``datasets``) -> Resize((S, S)) + ToTensor."""

    def __init__(self, size: int):
        self.transform = T.Compose([T.Resize((size, size)), T.ToTensor()])

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        return {
            "image": [self.transform(im.convert("RGB")) for im in batch["image"]],
            "label": batch["label"],
        }


class ArrowLanceDataset(LanceImageDataset):
    """``LanceImageDataset`` whose ``__getitems__`` returns the ``pyarrow.Table`` of its sorted ``take``
    (rows in index order, not in the order asked for: a batch is a set), so the collate can read the binary
    column's buffers in place (see :class:`ArrowImageCollate`)."""

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.__getitems__([index]).to_pylist()[0]

    def __getitems__(self, indices: list[int]) -> Any:
        if self._ds is None:
            self._ds = lance.dataset(self.uri, **self.dataset_options)
        return self._ds.take(sorted(indices), columns=self.columns)


def jpeg_views(column: pa.Array | pa.ChunkedArray) -> list[torch.Tensor] | None:
    """One uint8 tensor per value of an Arrow binary column, viewing the column's data buffer (no copy);
    ``None`` unless every value is a non-null JPEG (starts with FF D8 FF)."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if column.null_count or len(column) == 0:
        return None
    _, offsets_buffer, data_buffer = column.buffers()
    width = 8 if pa.types.is_large_binary(column.type) else 4
    offsets = np.frombuffer(
        offsets_buffer,
        dtype=np.int64 if width == 8 else np.int32,
        count=len(column) + 1,
        offset=column.offset * width,
    )
    starts, lengths = offsets[:-1], np.diff(offsets)
    if data_buffer is None or lengths.min() < len(JPEG_MAGIC):
        return None
    raw = np.frombuffer(data_buffer, dtype=np.uint8)
    if not all((raw[starts + i] == byte).all() for i, byte in enumerate(JPEG_MAGIC)):
        return None
    data = torch.frombuffer(data_buffer, dtype=torch.uint8)  # read-only: the views are only read
    bounds = offsets.tolist()
    return [data[bounds[i] : bounds[i + 1]] for i in range(len(column))]


class ArrowImageCollate(ImageCollate):
    """``ImageCollate`` that also takes the ``pyarrow.Table`` of one ``take`` (:class:`ArrowLanceDataset`):
    JPEG bytes are decoded straight from Arrow's buffer (no Python bytes, no dicts) and labels come from
    numpy. Anything but an all-JPEG, all-valid batch goes through ``ImageCollate``."""

    def __call__(self, rows: Any) -> Batch:
        if isinstance(rows, list):
            return super().__call__(rows)
        views = jpeg_views(rows.column(self.image_column)) if self.decoder == "torchvision" else None
        if views is None:
            return super().__call__(rows.to_pylist())
        try:
            decoded = decode_jpeg(views, mode=ImageReadMode.RGB)
        except RuntimeError:
            return super().__call__(rows.to_pylist())  # names the bad row, or skips it
        images = stack_channels_last([self._geometry(img) for img in decoded], self.dtype)
        labels = rows.column(self.label_column).to_numpy().astype(np.int64)  # a writable copy
        return Batch(images, torch.from_numpy(labels))


# ------------------------------------------------------------------------------------------ measuring
def _proc_status(pid: int | str = "self") -> dict[str, int]:
    """VmRSS / VmHWM (bytes) of a process from /proc; empty where there is no /proc."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return {}
    return {k: int(v) * 1024 for k, v in re.findall(r"^(VmRSS|VmHWM):\s+(\d+) kB", text, re.M)}


def _reset_peak() -> None:
    """Reset this process's peak RSS (Linux: writing 5 to clear_refs), so each loader gets its own."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _cpu_seconds(pid: int | str = "self") -> float | None:
    """User + system CPU seconds of a process (all its threads) from /proc; None where there is none."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _count(batch: Any) -> int:
    labels = batch["label"] if isinstance(batch, dict) else batch[1]
    return len(labels)


@dataclass
class Result:
    key: str
    label: str
    images_per_s: float = 0.0
    rounds: list[float] = field(default_factory=list)
    startup_s: float | None = None
    warmup_s: float | None = None
    main_peak_rss_mb: float | None = None
    worker_peak_rss_mb: list[float] = field(default_factory=list)
    # CPU time per image during the best timed epoch, from /proc (Linux; None elsewhere): where the cores go
    main_cpu_us: float | None = None
    worker_cpu_us: float | None = None
    note: str = ""


class Candidate:
    """A loader under test: ``warmup()`` once, then ``epoch()`` returns (images, seconds)."""

    def __init__(self, key: str, loader: DataLoader, note: str = ""):
        self.key = key
        self.loader = loader
        self.result = Result(key, LOADERS[key], note=note)
        self._it: Any = None
        self._t0 = 0.0

    def start(self) -> None:
        """Start the workers and wait for the first batch (the start-up time)."""
        self._t0 = time.perf_counter()
        self._it = iter(self.loader)
        next(self._it)
        self.result.startup_s = time.perf_counter() - self._t0

    def finish_warmup(self) -> None:
        for _ in self._it:
            pass
        self._it = None
        self.result.warmup_s = time.perf_counter() - self._t0

    def epoch(self) -> tuple[int, float]:
        pids: list[int | str] = ["self", *self.worker_pids()]
        cpu_before = [_cpu_seconds(pid) for pid in pids]
        start = time.perf_counter()
        n = sum(_count(batch) for batch in self.loader)
        seconds = time.perf_counter() - start
        cpu = [
            None if a is None or b is None else (b - a) * 1e6 / max(n, 1)
            for a, b in zip(cpu_before, (_cpu_seconds(pid) for pid in pids), strict=True)
        ]
        if n / seconds > max(self.result.rounds, default=0.0):  # keep the best round's split
            self.result.main_cpu_us = cpu[0]
            worker = cpu[1:]  # a worker that could not be read (gone) leaves the sum unknown
            self.result.worker_cpu_us = sum(worker) if worker and None not in worker else None
        return n, seconds

    def worker_pids(self) -> list[int]:
        it = getattr(self.loader, "_iterator", None)
        return [w.pid for w in getattr(it, "_workers", []) if w.pid]

    def close(self) -> None:
        it = getattr(self.loader, "_iterator", None)
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()
        self.loader = None


class DecodeBound(Candidate):
    """Decode + resize of in-memory files in a plain loop, one torch thread; the rate is scaled by the
    number of workers."""

    def __init__(
        self, key: str, blobs: list[bytes], size: int, batch_size: int, workers: int, seconds: float
    ):
        self.key = key
        self.blobs = blobs
        self.size = size
        self.batch_size = batch_size
        self.scale = max(1, workers)
        self.seconds = seconds
        self.count = min(len(blobs), batch_size)
        self.result = Result(key, LOADERS[key], note=f"1 core x {self.scale}")
        self.pil = T.Compose([T.Resize((size, size)), T.ToTensor()])
        self.tv = ImageCollate(size, decoder="torchvision", dtype=torch.uint8)

    def _pass(self, count: int) -> float:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # as in a DataLoader worker
        try:
            start = time.perf_counter()
            if self.key == "bound_pil":
                for blob in self.blobs[:count]:
                    with Image.open(io.BytesIO(blob)) as im:
                        self.pil(im.convert("RGB"))
            else:
                for i in range(0, count, self.batch_size):
                    self.tv._decode_torchvision(self.blobs[i : min(count, i + self.batch_size)])
            return time.perf_counter() - start
        finally:
            torch.set_num_threads(threads)

    def start(self) -> None:
        self.result.startup_s = 0.0

    def finish_warmup(self) -> None:
        seconds = self._pass(self.count)
        self.result.warmup_s = seconds
        rate = self.count / max(seconds, 1e-9)
        self.count = int(min(len(self.blobs), max(self.batch_size, rate * self.seconds)))

    def epoch(self) -> tuple[int, float]:
        seconds = self._pass(self.count)
        return self.count * self.scale, seconds

    def worker_pids(self) -> list[int]:
        return []

    def close(self) -> None:
        self.blobs = []


# ---------------------------------------------------------------------------------------- breakdown
def breakdown(
    uri: str, files: list[str], order: list[int], size: int, batch_size: int, images: int
) -> list[dict[str, Any]]:
    """CPU microseconds per image of each step a worker of (g) takes, and of the alternatives, in this
    process with one torch thread, best of 3 passes over the first ``images`` of ``order`` in batches.

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


# --------------------------------------------------------------------------------------- conversion
_CONVERT_CHILD = r"""
import json, re, sys, time
from pathlib import Path
def status():
    text = Path("/proc/self/status").read_text() if Path("/proc/self/status").exists() else ""
    return {k: int(v) * 1024 for k, v in re.findall(r"^(VmRSS|VmHWM):\s+(\d+) kB", text, re.M)}
args = json.loads(sys.argv[1])
from data_prep.convert import convert
before = status()
summary = convert(args["source"], args["output"], overwrite=args["overwrite"], progress=args["progress"])
after = status()
print(json.dumps({"rows": summary.rows, "seconds": summary.seconds, "image_bytes": summary.image_bytes,
                  "disk_bytes": summary.disk_bytes, "rss_before": before.get("VmRSS"),
                  "peak_rss": after.get("VmHWM")}))
"""


def convert_in_child(folder: str, output: str, *, progress: bool) -> dict[str, Any]:
    """Run ``data_prep.convert`` in a fresh interpreter: its time and its own peak RSS (VmHWM)."""
    root = str(Path(__file__).resolve().parent.parent)
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    )
    spec = {"source": f"imagefolder:{folder}", "output": output, "overwrite": True, "progress": progress}
    proc = subprocess.run(
        [sys.executable, "-c", _CONVERT_CHILD, json.dumps(spec)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=None,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"conversion of {folder} failed (exit {proc.returncode})")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["images_per_s"] = out["rows"] / out["seconds"] if out["seconds"] else float("inf")
    return out


# ---------------------------------------------------------------------------------------------- run
def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _folder_stats(folder: str) -> dict[str, Any]:
    files = [os.path.join(d, f) for d, _, names in os.walk(folder) for f in names if not f.startswith(".")]
    apparent, allocated = dir_bytes(folder)
    sizes = set()
    for path in files[:: max(1, len(files) // 20)][:20]:
        with Image.open(path) as im:
            sizes.add(im.size)
    return {
        "images": len(files),
        "bytes": apparent,
        "allocated_bytes": allocated,
        "mean_image_bytes": apparent / max(1, len(files)),
        "sample_sizes": sorted(sizes),
    }


def _build(
    key: str,
    *,
    folder: str,
    uri: str,
    hf: Any,
    size: int,
    batch_size: int,
    workers: int,
    order: list[int],
    blobs: list[bytes],
    bound_seconds: float,
) -> Candidate:
    common: dict[str, Any] = dict(batch_size=batch_size, sampler=order, num_workers=workers, pin_memory=False)
    if workers > 0:
        common.update(multiprocessing_context="spawn", persistent_workers=True)
    ours = ImageCollate(size, decoder="torchvision", dtype=torch.uint8)
    if key in BOUNDS:
        return DecodeBound(key, blobs, size, batch_size, workers, bound_seconds)
    if key == "imagefolder_pil":
        dataset = ImageFolder(folder, transform=T.Compose([T.Resize((size, size)), T.ToTensor()]))
        return Candidate(key, DataLoader(dataset, **common), "float32")
    if key == "imagefolder_tv":
        return Candidate(key, DataLoader(BytesImageFolder(folder), collate_fn=ours, **common), "uint8")
    if key == "hf_datasets":
        return Candidate(key, DataLoader(hf, **common), "float32")
    if key == "lance_rows":
        dataset = RowByRowDataset(SafeLanceDataset(uri))
        return Candidate(key, DataLoader(dataset, collate_fn=ours, **common), "uint8")
    make = dict(batch_size=batch_size, sampler=order, num_workers=workers, pin_memory=False)
    if key == "lance_documented":
        return Candidate(key, make_loader(uri, collate_fn=ImageCollate(size), **make), "float32")
    if key == "lance_ours":
        return Candidate(key, make_loader(uri, collate_fn=ours, **make), "uint8")
    if key == "lance_all_columns":
        return Candidate(key, make_loader(SafeLanceDataset(uri), collate_fn=ours, **make), "uint8")
    if key == "lance_arrow":
        dataset = ArrowLanceDataset(uri)
        collate = ArrowImageCollate(size, decoder="torchvision", dtype=torch.uint8)
        return Candidate(key, make_loader(dataset, collate_fn=collate, **make), "uint8")
    raise ValueError(f"unknown loader {key!r}")


def _load_hf(folder: str, cache_dir: str, size: int, progress: bool) -> tuple[Any, dict[str, Any]]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local builder needs no hub; never wait on a network
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import datasets

    if not progress:
        datasets.disable_progress_bars()
    start = time.perf_counter()
    ds = datasets.load_dataset("imagefolder", data_dir=folder, split="train", cache_dir=cache_dir)
    seconds = time.perf_counter() - start
    ds.set_transform(HFTransform(size))
    apparent, _ = dir_bytes(cache_dir)
    return ds, {
        "rows": len(ds),
        "seconds": seconds,
        "images_per_s": len(ds) / seconds,
        "cache_bytes": apparent,
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    """The whole benchmark; returns what ``--json`` writes."""
    from tqdm.auto import tqdm

    progress = not args.no_progress
    folder = os.path.abspath(args.imagefolder)
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="lance-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {
        "config": {
            "imagefolder": folder,
            "image_size": args.image_size,
            "batch_size": args.batch_size,
            "workers": args.workers,
            "epochs": args.epochs,
            "timed_rounds": args.epochs - 1,
            "start_method": "spawn",
            "quick": args.quick,
            "cores": os.cpu_count(),
            "torch": torch.__version__,
            "pylance": lance.__version__,
            "load_average_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        }
    }
    try:
        if args.generate:
            from .synthetic import generate_imagefolder

            if Path(folder).exists() and any(Path(folder).iterdir()):
                _log(f"{folder} is not empty: using the images already there (--generate ignored)")
            else:
                made = generate_imagefolder(
                    folder, args.generate, args.generate_size, args.classes, args.seed, progress=progress
                )
                _log(str(made))
        stats = _folder_stats(folder)
        report["imagefolder"] = stats
        _log(f"{stats['images']:,} images in {folder}, {stats['mean_image_bytes'] / 1024:,.1f} KB on average")

        # --- conversion, in a fresh process so its peak RSS is its own
        uri = args.lance
        if uri and (Path(uri) / "_versions").is_dir():
            report["conversion"] = None
            _log(f"using the existing Lance dataset {uri} (no conversion measured)")
        else:
            uri = uri or str(work / "images.lance")
            _log(f"converting {folder} -> {uri}")
            report["conversion"] = convert_in_child(folder, uri, progress=progress)
        report["lance_uri"] = uri
        lance_bytes = dir_bytes(uri)
        report["storage"] = {
            "imagefolder_bytes": stats["bytes"],
            "imagefolder_allocated_bytes": stats["allocated_bytes"],
            "lance_bytes": lance_bytes[0],
            "lance_allocated_bytes": lance_bytes[1],
        }
        n = lance.dataset(uri).count_rows()
        if n != stats["images"]:
            _log(f"note: {uri} holds {n:,} rows and {folder} {stats['images']:,} files")
        n = min(n, stats["images"])

        keys = [k for k in LOADERS if k in args.loaders]
        hf = None
        if "hf_datasets" in keys:
            _log("preparing the HF datasets imagefolder")
            hf, report["hf_prepare"] = _load_hf(folder, str(work / "hf-cache"), args.image_size, progress)
            report["storage"]["hf_cache_bytes"] = report["hf_prepare"]["cache_bytes"]

        # the same shuffled order for every loader (a plain list is a valid sampler and pickles cheaply)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(args.seed)).tolist()
        blobs: list[bytes] = []
        if any(k in BOUNDS for k in keys):
            files = ImageFolder(folder).samples
            cap = min(n, 512 if args.quick else 4096)
            for i in order[:cap]:
                with open(files[i][0], "rb") as f:
                    blobs.append(f.read())

        main_rss = _proc_status().get("VmRSS")
        candidates = [
            _build(
                key,
                folder=folder,
                uri=uri,
                hf=hf,
                size=args.image_size,
                batch_size=args.batch_size,
                workers=args.workers,
                order=order,
                blobs=blobs,
                bound_seconds=0.25 if args.quick else 1.5,
            )
            for key in keys
        ]
        if args.quick:
            # smoke test: all workers start at once (start-up figures then include the others' start-up)
            _log(f"starting the workers of {len(candidates)} loaders at once (--quick)")
            for cand in candidates:
                cand.start()
            for cand in candidates:
                cand.finish_warmup()
        else:
            for cand in candidates:
                _log(f"warm-up (start-up + one epoch): {cand.result.label}")
                cand.start()
                cand.finish_warmup()
        report["config"]["startup_concurrent"] = bool(args.quick)

        rounds = max(1, args.epochs - 1)
        bar = tqdm(total=rounds * len(candidates), desc="timed epochs", unit="epoch", disable=not progress)
        for r in range(rounds):
            shift = r % max(1, len(candidates))
            for cand in candidates[shift:] + candidates[:shift]:  # rotate: no loader always goes first
                _reset_peak()
                images, seconds = cand.epoch()
                peak = _proc_status().get("VmHWM")
                res = cand.result
                res.rounds.append(images / seconds)
                if peak is not None:
                    res.main_peak_rss_mb = max(res.main_peak_rss_mb or 0.0, peak / MB)
                bar.update(1)
        bar.close()

        for cand in candidates:
            res = cand.result
            res.images_per_s = max(res.rounds)
            res.worker_peak_rss_mb = [
                _proc_status(pid).get("VmHWM", 0) / MB for pid in cand.worker_pids() if _proc_status(pid)
            ]
            cand.close()
        report["main_rss_before_loaders_mb"] = main_rss / MB if main_rss else None
        if args.breakdown:  # after the loaders: its decoded images must not count in their memory figures
            _log("timing each step of a worker (--breakdown)")
            files = [path for path, _ in ImageFolder(folder).samples]
            try:
                report["breakdown"] = breakdown(
                    uri, files, order, args.image_size, args.batch_size, min(n, 256 if args.quick else 1024)
                )
            except ValueError as e:  # not JPEG: the loaders' figures still stand
                report["breakdown_error"] = str(e)
                _log(f"--breakdown skipped: {e}")
        report["loaders"] = {c.key: asdict(c.result) for c in candidates}
        report["ratios"], report["targets"] = _ratios(report)
        if hasattr(os, "getloadavg"):
            report["config"]["load_average_end"] = list(os.getloadavg())
    finally:
        if not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)
    return report


def _ratios(report: dict[str, Any]) -> tuple[dict[str, float], list[dict[str, Any]]]:
    rate = {k: v["images_per_s"] for k, v in report.get("loaders", {}).items()}
    ratios: dict[str, float] = {}
    for num in ("lance_ours", "lance_all_columns", "lance_arrow", "lance_documented", "imagefolder_tv"):
        for den in ("imagefolder_pil", "imagefolder_tv", "bound_tv", "bound_pil", "hf_datasets"):
            if num != den and rate.get(num) and rate.get(den):
                ratios[f"{num}/{den}"] = rate[num] / rate[den]
    small = all(max(s) <= 64 for s in report["imagefolder"]["sample_sizes"])
    wanted = (
        [("lance_ours/imagefolder_pil", 4.0), ("lance_ours/imagefolder_tv", 1.5)]
        if small
        else [("lance_ours/imagefolder_pil", 2.0), ("lance_ours/bound_tv", 0.9)]
    )
    targets = [
        {"ratio": name, "value": ratios.get(name), "target": goal, "met": (ratios.get(name) or 0) >= goal}
        for name, goal in wanted
    ]
    conv = report.get("conversion")
    if small and conv:
        rate_ = conv["images_per_s"]
        targets.append(
            {"ratio": "conversion images/s", "value": rate_, "target": 10_000, "met": rate_ >= 10_000}
        )
    return ratios, targets


# ------------------------------------------------------------------------------------------- output
def format_table(report: dict[str, Any]) -> str:
    cfg, stats = report["config"], report["imagefolder"]
    sizes = ", ".join(f"{w}x{h}" for w, h in stats["sample_sizes"][:3])
    lines = [
        f"{stats['images']:,} JPEGs ({sizes}; {stats['mean_image_bytes'] / 1024:,.1f} KB each) -> "
        f"{cfg['image_size']}x{cfg['image_size']}, batch {cfg['batch_size']}, "
        f"{cfg['workers']} spawn workers, best of {cfg['timed_rounds']} timed epoch(s) after a warm-up",
        "",
    ]
    loaders = report.get("loaders", {})
    base = loaders.get("imagefolder_pil", {}).get("images_per_s")
    bound = loaders.get("bound_tv", {}).get("images_per_s")
    head = f"{'loader':48s} {'images/s':>9s} {'x (b)':>6s} {'x tv bnd':>8s} {'start s':>7s} "
    head += f"{'main MB':>7s} {'wrk MB':>6s} {'CPU us/img main':>15s} {'wrk':>5s}"
    lines += [head, "-" * len(head)]
    for res in loaders.values():
        rate = res["images_per_s"]
        workers = res["worker_peak_rss_mb"]
        lines.append(
            f"{res['label']:48s} {rate:9,.0f} "
            f"{rate / base if base else float('nan'):6.2f} {rate / bound if bound else float('nan'):8.2f} "
            f"{res['startup_s'] if res['key'] not in BOUNDS else float('nan'):7.2f} "
            f"{res['main_peak_rss_mb'] or float('nan'):7.0f} "
            f"{max(workers) if workers else float('nan'):6.0f} "
            f"{_num(res.get('main_cpu_us')):>15s} {_num(res.get('worker_cpu_us')):>5s}"
        )
    if report.get("breakdown"):
        lines += ["", "where a worker's time goes (--breakdown; CPU us per image, one torch thread):"]
        lines += [f"  {step['step']:44s} {step['cpu_us_per_image']:8.1f}" for step in report["breakdown"]]
    conv = report.get("conversion")
    lines.append("")
    if conv:
        lines.append(
            f"conversion (imagefolder -> Lance, fresh process): {conv['rows']:,} images in "
            f"{conv['seconds']:.2f} s "
            f"= {conv['images_per_s']:,.0f} images/s; peak RSS {conv['peak_rss'] / MB:,.0f} MB "
            f"({conv['rss_before'] / MB:,.0f} MB after imports)"
        )
    hfp = report.get("hf_prepare")
    if hfp:
        lines.append(
            f"HF datasets load_dataset(imagefolder): {hfp['seconds']:.2f} s = "
            f"{hfp['images_per_s']:,.0f} images/s"
        )
    st = report["storage"]
    disk = (
        f"bytes on disk: image folder {st['imagefolder_bytes'] / MB:,.1f} MB "
        f"({st['imagefolder_allocated_bytes'] / MB:,.1f} MB allocated in blocks), "
        f"Lance {st['lance_bytes'] / MB:,.1f} MB ({st['lance_allocated_bytes'] / MB:,.1f} MB allocated)"
    )
    if "hf_cache_bytes" in st:
        disk += f", HF cache {st['hf_cache_bytes'] / MB:,.2f} MB (+ the image folder it points to)"
    lines.append(disk)
    for t in report.get("targets", []):
        value = t["value"]
        shown = "n/a" if value is None else (f"{value:,.0f}" if value > 100 else f"{value:.2f}x")
        lines.append(f"target {t['ratio']} >= {t['target']:g}: {shown} {'met' if t['met'] else 'NOT met'}")
    return "\n".join(lines)


def _num(value: float | None) -> str:
    return "n/a" if value is None else f"{value:,.0f}"


def plot(report: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    loaders = list(report["loaders"].values())
    colors = {"bound": "#9e9e9e", "imagefolder": "#ef8a17", "hf": "#d1495b", "lance": "#00798c"}
    fig, ax = plt.subplots(figsize=(9, 0.45 * len(loaders) + 1.5))
    names = [r["label"] for r in loaders][::-1]
    rates = [r["images_per_s"] for r in loaders][::-1]
    bar_colors = [
        colors["lance"] if r["key"].startswith("lance") else colors[r["key"].split("_")[0]] for r in loaders
    ][::-1]
    bars = ax.barh(names, rates, color=bar_colors)
    for bar, rate in zip(bars, rates, strict=True):
        ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, f" {rate:,.0f}", va="center", fontsize=8)
    cfg = report["config"]
    ax.set_xlabel("images/s (best timed epoch)")
    ax.set_title(
        f"{report['imagefolder']['images']:,} images -> {cfg['image_size']} px, batch {cfg['batch_size']}, "
        f"{cfg['workers']} spawn workers",
        fontsize=10,
    )
    ax.set_xlim(0, max(rates) * 1.18 if rates else 1)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------- CLI
def _loader_list(text: str) -> list[str]:
    if text in ("all", ""):
        return list(LOADERS)
    if text == "none":
        return []
    keys = [k.strip() for k in text.split(",") if k.strip()]
    unknown = [k for k in keys if k not in LOADERS]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown loader(s) {', '.join(unknown)}; choose from {', '.join(LOADERS)}"
        )
    return keys


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m lance_cookbook.bench",
        description="Images/s of PyTorch loaders over the same images: image folder vs HF datasets vs Lance.",
        epilog="loaders: " + "; ".join(f"{k} = {v}" for k, v in LOADERS.items()),
    )
    p.add_argument("--imagefolder", required=True, metavar="DIR", help="images as DIR/<class>/<image>")
    p.add_argument(
        "--lance",
        metavar="URI",
        help="Lance dataset of DIR: used as is if it exists (no conversion measured), else DIR is converted "
        "into it and kept (default: a temporary dataset)",
    )
    p.add_argument("--image-size", type=int, default=224, metavar="S", help="output height and width (224)")
    p.add_argument("--batch-size", type=int, default=64, metavar="B", help="images per batch (64)")
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        metavar="W",
        help="DataLoader workers (default: one per core, <= 8)",
    )
    p.add_argument(
        "--epochs",
        type=int,
        default=None,
        metavar="E",
        help="epochs per loader: one warm-up, then E-1 timed rounds interleaved across the loaders "
        "(4; --quick: 2)",
    )
    p.add_argument("--json", metavar="FILE", help="write every figure to FILE as JSON")
    p.add_argument("--plot", metavar="FILE", help="write a bar chart of images/s to FILE (PNG)")
    p.add_argument("--quick", action="store_true", help="smoke test: 2 epochs, short decode-bound loops")
    p.add_argument(
        "--generate",
        type=int,
        metavar="N",
        help="first write N synthetic JPEGs into DIR (lance_cookbook.synthetic), unless DIR has files",
    )
    p.add_argument(
        "--generate-size", default="500x375", metavar="WxH", help="size of the --generate images (500x375)"
    )
    p.add_argument("--classes", type=int, default=10, metavar="K", help="class folders for --generate (10)")
    p.add_argument(
        "--seed", type=int, default=0, help="seed of --generate and of the shared shuffled order (0)"
    )
    p.add_argument(
        "--loaders",
        type=_loader_list,
        default=list(LOADERS),
        metavar="LIST",
        help="comma-separated loader keys to run (default all; 'none' measures conversion and storage only)",
    )
    p.add_argument(
        "--work-dir",
        metavar="DIR",
        help="keep the converted dataset and the HF cache here (default: a temporary folder, removed)",
    )
    p.add_argument(
        "--breakdown",
        action="store_true",
        help="also time each step of a worker of (g) in this process (CPU us per image: Lance take, file "
        "reads, decode, resize, stacking, shared memory, pickling): where the time goes",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.workers is None:
        args.workers = default_workers()
    if args.epochs is None:
        args.epochs = 2 if args.quick else 4
    if args.epochs < 2:
        print("error: --epochs must be at least 2 (one warm-up, one timed)", file=sys.stderr)
        return 2
    if not args.generate and not Path(args.imagefolder).is_dir():
        print(f"error: {args.imagefolder} is not a folder (pass --generate N to make one)", file=sys.stderr)
        return 2
    report = run(args)
    print(format_table(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2, default=str))
    if args.plot and report.get("loaders"):
        plot(report, args.plot)
    return 0


if __name__ == "__main__":
    # run as lance_cookbook.bench, not __main__, so spawn workers unpickle its classes by their module name
    from lance_cookbook.bench import main as _main

    sys.exit(_main())

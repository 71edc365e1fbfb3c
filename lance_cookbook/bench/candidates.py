"""The loaders under test: their keys and labels, how each is built, and how one epoch of each is timed."""

from __future__ import annotations

import io
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from lance.torch.data import SafeLanceDataset
from PIL import Image
from torch.utils.data import DataLoader, Sampler
from torchvision.datasets import ImageFolder

from ..recipe.block_sampler import BlockShuffleSampler
from ..recipe.collate import ImageCollate
from ..recipe.loader import make_loader
from .arrow import ArrowImageCollate, ArrowLanceDataset
from .baselines import BytesImageFolder, RowByRowDataset, pil_eval_transform
from .cache import evict
from .iterable import iterable_loader
from .lancedb_loaders import LANCEDB_LOADERS, build_lancedb
from .measure import MiB, PeakRSS, cpu_seconds
from .peers import PEER_LOADERS, build_peer
from .shuffle_quality import mean_batch_entropy

__all__ = [
    "ALL_LOADERS",
    "BOUNDS",
    "LOADERS",
    "OPT_IN_LOADERS",
    "Candidate",
    "DecodeBound",
    "Result",
    "build_candidate",
]

LOADERS: dict[str, str] = {
    "bound_pil": "(a) decode bound: PIL, 1 core x workers",
    "bound_tv": "(a) decode bound: torchvision, 1 core x workers",
    "imagefolder_pil": "(b) ImageFolder + PIL Resize+ToTensor",
    "imagefolder_tv": "(c) ImageFolder bytes + torchvision collate",
    "hf_datasets": "(d) HF datasets imagefolder + set_transform",
    "lance_rows": "(e) SafeLanceDataset row by row",
    "lance_pil_float32": "(f) make_loader + ImageCollate pil float32",
    "lance_tv_uint8": "(g) make_loader + ImageCollate torchvision uint8",
    "lance_all_columns": "(h) (g) via SafeLanceDataset: all columns",
    "lance_arrow": "(i) (g) + Arrow table decoded in place",
    "lance_tv_uint8_block": "(j) (g) + BlockShuffleSampler (contiguous reads)",
}
BOUNDS = ("bound_pil", "bound_tv")
# core loaders run only when --loaders names them (kept out of the default set the test suite runs)
OPT_IN_LOADERS: dict[str, str] = {
    "lance_iterable": "(n) Lance iterable LanceDataset + fragment sampler + (g)'s collate",
    **LANCEDB_LOADERS,  # (o)-(r), LanceDB's own loaders: the `lancedb` extra; 'lancedb' names the four
}
# every key --loaders accepts: the core loaders (the default), the peers, which need the peer environment,
# and the opt-in ones
ALL_LOADERS: dict[str, str] = {**LOADERS, **PEER_LOADERS, **OPT_IN_LOADERS}


@dataclass
class Result:
    """Every figure of one loader, as ``--json`` writes it (memory in MiB, CPU in us per image)."""

    key: str
    label: str
    images_per_s: float = 0.0
    rounds: list[float] = field(default_factory=list)
    startup_s: float | None = None
    # how its DataLoader starts workers: "spawn", "forkserver" (make_loader's default), None (no workers)
    start_method: str | None = None
    warmup_s: float | None = None
    main_peak_rss_mib: float | None = None
    worker_peak_rss_mib: list[float] = field(default_factory=list)
    # CPU time per image during the best timed epoch (None where a process could not be read): where the
    # cores go
    main_cpu_us: float | None = None
    worker_cpu_us: float | None = None
    # the cold regime (--cache cold|both): the loader's files evicted from the page cache before each of
    # these epochs, as for a dataset larger than memory; the warm figures above stay 0 / empty under
    # --cache cold
    cold_images_per_s: float | None = None
    cold_rounds: list[float] = field(default_factory=list)
    cold_main_cpu_us: float | None = None
    cold_worker_cpu_us: float | None = None
    # shuffle quality as the training loop sees it: the mean label entropy (bits) of the full batches of
    # the last timed epoch, and that as a fraction of uniformly random batches (a shard or buffer shuffle
    # is not a global one; 1.0 mixes classes as well as a full shuffle)
    batch_label_entropy: float | None = None
    batch_label_entropy_vs_random: float | None = None
    # and whether the order changes between epochs: the fraction of the batches of the last timed epoch
    # whose exact label sequence was also a batch of the epoch before (1.0: the same batches every epoch,
    # however they are ordered; about 0 for any order that reshuffles rows into new batches)
    repeated_batches: float | None = None
    note: str = ""


def _labels(batch: Any) -> list[int]:
    labels = batch["label"] if isinstance(batch, dict) else batch[1]
    # plain ints: holding the batch's tensor would keep its shared-memory segment (a file descriptor) open
    return labels.tolist() if hasattr(labels, "tolist") else list(labels)


def batch_entropy(batches: list[list[int]]) -> float | None:
    """Mean label entropy (bits) of the full batches (the longest length seen); ``None`` if none."""
    full = max(map(len, batches), default=0)
    values = [mean_batch_entropy(b, range(full), full) for b in batches if full and len(b) == full]
    return sum(values) / len(values) if values else None


class EpochPermutations(Sampler[int]):
    """A new random permutation of ``range(n)`` on every pass, as a ``DistributedSampler`` gives.

    The same as a training run's ``DistributedSampler`` with ``set_epoch``: pass ``k`` is
    ``torch.randperm(n)`` seeded with ``seed + k``, so the k-th epoch of every loader built with the same
    ``seed`` reads the same order (the comparison stays fair) while no loader reads the same batches twice in
    a row. Lives in the main process (the DataLoader iterates it there), so the pass counter is this loader's
    own.
    """

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.passes = n, seed, 0

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.passes)
        self.passes += 1
        return iter(torch.randperm(self.n, generator=generator).tolist())


class Candidate:
    """A loader under test: ``start()`` and ``finish_warmup()`` once, then ``epoch()`` per timed round."""

    measures_cpu = True

    def __init__(self, key: str, loader: Any, note: str = "", paths: list[str] | None = None):
        self.key = key
        self.loader = loader
        self.result = Result(key, ALL_LOADERS[key], note=note)
        context = getattr(loader, "multiprocessing_context", None)
        if context is not None and getattr(loader, "num_workers", 0) > 0:
            self.result.start_method = context.get_start_method()
        # the files this loader reads: what the cold regime evicts before each of its epochs
        self.paths = list(paths or [])
        self._it: Any = None
        self._t0 = 0.0
        self._previous_batches: set[tuple[int, ...]] = set()
        self._epoch = 0  # passed to the sampler's set_epoch before each pass, as a training loop does

    def _next_epoch(self) -> None:
        # a sampler's set_epoch, or the loader's own where it builds each pass (lancedb_loaders)
        set_epoch = getattr(getattr(self.loader, "sampler", None), "set_epoch", None) or getattr(
            self.loader, "set_epoch", None
        )
        if callable(set_epoch):
            set_epoch(self._epoch)
        self._epoch += 1
        self._worker_peaks: dict[int, int] = {}

    def start(self) -> None:
        """Start the workers and wait for the first batch (the start-up time)."""
        self._t0 = time.perf_counter()
        self._next_epoch()
        self._it = iter(self.loader)
        next(self._it)
        self.result.startup_s = time.perf_counter() - self._t0

    def finish_warmup(self) -> None:
        """Run the rest of the first (untimed) pass and record the warm-up time."""
        for _ in self._it:
            pass
        self._it = None
        self.result.warmup_s = time.perf_counter() - self._t0

    def _pass(self) -> tuple[int, float]:
        batches = []
        self._next_epoch()
        start = time.perf_counter()
        for batch in self.loader:
            batches.append(_labels(batch))
        seconds = time.perf_counter() - start
        self.result.batch_label_entropy = batch_entropy(batches)
        these = [tuple(b) for b in batches]
        if self._previous_batches and these:
            repeated = sum(b in self._previous_batches for b in these)
            self.result.repeated_batches = repeated / len(these)
        self._previous_batches = set(these)
        return sum(map(len, batches)), seconds

    def epoch(self, cold: bool = False) -> tuple[int, float]:
        """One timed epoch: (images, seconds).

        Records its rate, the peak RSS of the main process and of each worker, and, if it is the best round so
        far, the CPU time per image of each. ``cold``: this loader's files are evicted from the page cache
        first (outside the timing), and the figures go to the ``cold_`` fields.
        """
        if cold:
            evict(self.paths)
        prefix = "cold_" if cold else ""
        pids = self.worker_pids()
        cpu_before = [cpu_seconds(), *map(cpu_seconds, pids)]
        # workers started during the pass (a loader that starts them every epoch, as LanceDB's
        # StreamingDataLoader must) are gone when it ends: their CPU time is read while they run, from 0
        late: dict[int, float] = {}

        def watched() -> list[int | None]:
            started = [pid for pid in self.worker_pids() if pid not in pids]
            for pid in started:
                seconds = cpu_seconds(pid)
                if seconds is not None:
                    late[pid] = seconds
            return [None, *pids, *started]

        with PeakRSS(watched) as rss:
            n, seconds = self._pass()
            cpu_after = [cpu_seconds(), *map(cpu_seconds, pids)]
        cpu_before += [0.0] * len(late)
        cpu_after += list(late.values())
        res = self.result
        rounds: list[float] = getattr(res, prefix + "rounds")
        if self.measures_cpu and n / seconds > max(rounds, default=0.0):  # keep the best round's split
            cpu = [
                None if a is None or b is None else (b - a) * 1e6 / max(n, 1)
                for a, b in zip(cpu_before, cpu_after, strict=True)
            ]
            setattr(res, prefix + "main_cpu_us", cpu[0])
            worker = cpu[1:]  # a worker that could not be read (gone) leaves the sum unknown
            setattr(res, prefix + "worker_cpu_us", sum(worker) if worker and None not in worker else None)
        rounds.append(n / seconds)
        if None in rss.peaks:
            res.main_peak_rss_mib = max(res.main_peak_rss_mib or 0.0, rss.peaks[None] / MiB)
        for pid in [*pids, *late]:
            self._worker_peaks[pid] = max(self._worker_peaks.get(pid, 0), rss.peaks.get(pid, 0))
        res.worker_peak_rss_mib = [peak / MiB for peak in self._worker_peaks.values() if peak]
        return n, seconds

    def worker_pids(self) -> list[int]:
        # DataLoader keeps its worker processes in a private attribute of its iterator; read here only
        """The pids of the DataLoader's worker processes now running."""
        it = getattr(self.loader, "_iterator", None)
        return [w.pid for w in getattr(it, "_workers", []) if w.pid]

    def close(self) -> None:
        """Shut the workers down and drop the loader."""
        it = getattr(self.loader, "_iterator", None)
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()
        self.loader = None


class DecodeBound(Candidate):
    """Decode + resize of in-memory files in a plain loop, one torch thread.

    The rate is scaled by the number of workers (so no CPU time per image is recorded: it would be divided by
    images not decoded).
    """

    measures_cpu = False

    def __init__(
        self, key: str, blobs: list[bytes], size: int, batch_size: int, workers: int, seconds: float
    ):
        self.key = key
        self.loader = None
        self.blobs = blobs
        self.size = size
        self.batch_size = batch_size
        self.scale = max(1, workers)
        self.seconds = seconds
        self.count = min(len(blobs), batch_size)
        self.result = Result(key, LOADERS[key], note=f"1 core x {self.scale}")
        self._worker_peaks = {}
        self.paths = []  # decodes bytes already in memory: nothing to evict
        self.pil = pil_eval_transform(size)
        self.tv = ImageCollate(size, decoder="torchvision", dtype=torch.uint8)

    def _loop(self, count: int) -> float:
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
        """Nothing to start: the start-up time is 0."""
        self.result.startup_s = 0.0

    def finish_warmup(self) -> None:
        """Time one pass over ``count`` images; then size ``count`` to last about ``seconds``."""
        seconds = self._loop(self.count)
        self.result.warmup_s = seconds
        rate = self.count / max(seconds, 1e-9)
        self.count = int(min(len(self.blobs), max(self.batch_size, rate * self.seconds)))

    def _pass(self) -> tuple[int, float]:
        return self.count * self.scale, self._loop(self.count)

    def worker_pids(self) -> list[int]:
        """None: the decode runs in this process."""
        return []

    def close(self) -> None:
        """Drop the in-memory files."""
        self.blobs = []


def build_candidate(
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
    seed: int = 0,
    peer_dirs: dict[str, str] | None = None,
) -> Candidate:
    """The loader ``key`` of :data:`LOADERS` over ``folder`` / ``uri`` / ``hf``.

    It reads ``order`` in its first pass and a new permutation in each later one (:class:`EpochPermutations`;
    the block sampler and the peers shuffle in their own way).
    """
    perms = EpochPermutations(len(order), seed)  # pass 0 is torch.randperm seeded with `seed`: `order`
    common: dict[str, Any] = dict(batch_size=batch_size, sampler=perms, num_workers=workers, pin_memory=False)
    if workers > 0:
        common.update(multiprocessing_context="spawn", persistent_workers=True)
    tv_uint8 = ImageCollate(size, decoder="torchvision", dtype=torch.uint8)
    if key in PEER_LOADERS:
        loader, paths, note = build_peer(
            key, (peer_dirs or {})[key], size=size, batch_size=batch_size, workers=workers, seed=seed
        )
        return Candidate(key, loader, f"uint8; {note}", paths)
    if key in BOUNDS:
        return DecodeBound(key, blobs, size, batch_size, workers, bound_seconds)
    if key == "imagefolder_pil":
        dataset = ImageFolder(folder, transform=pil_eval_transform(size))
        return Candidate(key, DataLoader(dataset, **common), "float32", [folder])
    if key == "imagefolder_tv":
        loader = DataLoader(BytesImageFolder(folder), collate_fn=tv_uint8, **common)
        return Candidate(key, loader, "uint8", [folder])
    if key == "hf_datasets":
        # its Arrow cache holds the file paths; the images are read from the folder
        cache = [f["filename"] for f in getattr(hf, "cache_files", [])]
        return Candidate(key, DataLoader(hf, **common), "float32", [folder, *cache])
    if key == "lance_rows":
        dataset = RowByRowDataset(SafeLanceDataset(uri))
        return Candidate(key, DataLoader(dataset, collate_fn=tv_uint8, **common), "uint8", [uri])
    make = dict(batch_size=batch_size, sampler=perms, num_workers=workers, pin_memory=False)
    if key == "lance_pil_float32":
        return Candidate(key, make_loader(uri, collate_fn=ImageCollate(size), **make), "float32", [uri])
    if key == "lance_tv_uint8":
        return Candidate(key, make_loader(uri, collate_fn=tv_uint8, **make), "uint8", [uri])
    if key == "lance_tv_uint8_block":
        # blocks of one batch, shuffled with the run's seed: each batch reads about two runs of rows instead
        # of the shared random order's 64 scattered rows (the point of this loader)
        sampler = BlockShuffleSampler(range(len(order)), 1, 0, seed=seed, block_size=batch_size)
        block = dict(make, sampler=sampler)
        return Candidate(key, make_loader(uri, collate_fn=tv_uint8, **block), "uint8", [uri])
    if key == "lance_iterable":
        # every row of the dataset in stored order, split by fragment between the workers (not `order`: an
        # iterable dataset takes no sampler of indices); see iterable.py
        loader = iterable_loader(uri, tv_uint8, batch_size=batch_size, workers=workers)
        fragments = len(loader.dataset.dataset.get_fragments())
        return Candidate(key, loader, f"uint8; {fragments} fragment(s), {max(workers, 1)} worker(s)", [uri])
    if key in LANCEDB_LOADERS:
        loader, note = build_lancedb(
            key, uri, size=size, batch_size=batch_size, workers=workers, sampler=perms, seed=seed
        )
        return Candidate(key, loader, note, [uri])
    if key == "lance_all_columns":
        loader = make_loader(SafeLanceDataset(uri), collate_fn=tv_uint8, **make)
        return Candidate(key, loader, "uint8", [uri])
    if key == "lance_arrow":
        dataset = ArrowLanceDataset(uri)
        collate = ArrowImageCollate(size, decoder="torchvision", dtype=torch.uint8)
        return Candidate(key, make_loader(dataset, collate_fn=collate, **make), "uint8", [uri])
    raise ValueError(f"unknown loader {key!r}")

"""The whole benchmark run: images, conversion, warm-up, interleaved timed epochs, breakdown -> the report."""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

import lance
import torch
from PIL import Image
from torchvision.datasets import ImageFolder

from data_prep.disk_usage import dir_bytes

from .baselines import load_hf
from .breakdown import breakdown
from .candidates import ALL_LOADERS, BOUNDS, Candidate, DecodeBound, build_candidate
from .conversion import convert_in_child
from .measure import MiB, rss_bytes
from .peers import PEER_LOADERS, write_in_child
from .report import ratios_and_targets
from .shuffle_quality import mean_batch_entropy

__all__ = ["folder_stats", "run"]


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def folder_stats(folder: str) -> dict[str, Any]:
    """Image count, bytes (apparent, allocated), mean bytes per image and a sample of image sizes."""
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


def _config(args: argparse.Namespace, folder: str) -> dict[str, Any]:
    return {
        "imagefolder": folder,
        "image_size": args.image_size,
        "batch_size": args.batch_size,
        "workers": args.workers,
        "epochs": args.epochs,
        "timed_rounds": args.epochs - 1,
        # per loader in loaders.*.start_method: spawn, or forkserver where make_loader starts the workers
        "start_method": "spawn; forkserver for make_loader (its default)",
        "cache": getattr(args, "cache", "warm"),
        "quick": args.quick,
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "pylance": lance.__version__,
        "load_average_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


def _images(args: argparse.Namespace, folder: str, progress: bool) -> dict[str, Any]:
    """Generate the images if asked and the folder is empty; the folder's statistics."""
    if args.generate:
        from .synthetic import generate_imagefolder

        if Path(folder).exists() and any(Path(folder).iterdir()):
            _log(f"{folder} is not empty: using the images already there (--generate ignored)")
        else:
            made = generate_imagefolder(
                folder, args.generate, args.generate_size, args.classes, args.seed, progress=progress
            )
            _log(str(made))
    stats = folder_stats(folder)
    _log(f"{stats['images']:,} images in {folder}, {stats['mean_image_bytes'] / 1024:,.1f} KiB on average")
    return stats


def _lance(args: argparse.Namespace, folder: str, work: Path, progress: bool) -> tuple[str, Any]:
    """The Lance dataset to read and the conversion's figures (``None`` if none ran).

    An existing ``--lance`` is read as is, else ``folder`` is converted in a fresh process, so that the
    conversion's peak RSS is its own.
    """
    uri = args.lance
    if uri and (Path(uri) / "_versions").is_dir():
        _log(f"using the existing Lance dataset {uri} (no conversion measured)")
        return uri, None
    uri = uri or str(work / "images.lance")
    _log(f"converting {folder} -> {uri}")
    return uri, convert_in_child(folder, uri, progress=progress, shuffle=getattr(args, "shuffle", None))


def _blobs(folder: str, order: list[int], cap: int) -> list[bytes]:
    """The first ``cap`` files of ``order``, in memory: what the decode bounds decode."""
    files = ImageFolder(folder).samples
    blobs = []
    for i in order[:cap]:
        with open(files[i][0], "rb") as f:
            blobs.append(f.read())
    return blobs


def _warm_up(candidates: list[Candidate], *, concurrent: bool) -> None:
    if concurrent:
        # smoke test: all workers start at once (start-up figures then include the others' start-up)
        _log(f"starting the workers of {len(candidates)} loaders at once (--quick)")
        for cand in candidates:
            cand.start()
        for cand in candidates:
            cand.finish_warmup()
        return
    for cand in candidates:
        _log(f"warm-up (start-up + one epoch): {cand.result.label}")
        cand.start()
        cand.finish_warmup()


def _later_first_batches(candidates: list[Candidate], *, concurrent: bool) -> dict[str, float] | None:
    """Seconds to the first batch of every forkserver loader started after the first one, by loader key.

    Keys are in start order; the first loader is left out because it also started the fork server. ``None``
    when loaders were started at once (``--quick``) or fewer than two use forkserver. The issue-14 target is
    <= 1 s for a second loader.
    """
    started = [c for c in candidates if c.result.start_method == "forkserver"]
    if concurrent or len(started) < 2:
        return None
    return {c.key: c.result.startup_s for c in started[1:] if c.result.startup_s is not None}


def _timed_rounds(candidates: list[Candidate], rounds: int, progress: bool, cache: str = "warm") -> None:
    """``rounds`` timed epochs of every loader, interleaved; each keeps its best.

    ``cache`` "cold" evicts each loader's files before each of its epochs; "both" runs a cold epoch then a
    warm one (the cold epoch has just read every file back into the page cache, so the warm one follows a full
    read).
    """
    from tqdm.auto import tqdm

    regimes = {"warm": [False], "cold": [True], "both": [True, False]}[cache]
    bar = tqdm(
        total=rounds * len(candidates) * len(regimes), desc="timed epochs", unit="epoch", disable=not progress
    )
    for r in range(rounds):
        shift = r % max(1, len(candidates))
        for cand in candidates[shift:] + candidates[:shift]:  # rotate: no loader always goes first
            for cold in regimes:
                # a decode bound reads bytes held in memory: its "cold" epoch would be a second warm one
                cand.epoch(cold=cold and not isinstance(cand, DecodeBound))
                bar.update(1)
    bar.close()
    for cand in candidates:
        res = cand.result
        res.images_per_s = max(res.rounds, default=0.0)
        res.cold_images_per_s = max(res.cold_rounds) if res.cold_rounds else None


def _data(args: argparse.Namespace, folder: str, work: Path, progress: bool, report: dict[str, Any]) -> str:
    """The images and the Lance dataset, with their statistics and bytes on disk in ``report``; its uri."""
    stats = report["imagefolder"] = _images(args, folder, progress)
    uri, report["conversion"] = _lance(args, folder, work, progress)
    report["lance_uri"] = uri
    lance_bytes = dir_bytes(uri)
    report["storage"] = {
        "imagefolder_bytes": stats["bytes"],
        "imagefolder_allocated_bytes": stats["allocated_bytes"],
        "lance_bytes": lance_bytes[0],
        "lance_allocated_bytes": lance_bytes[1],
    }
    return uri


def _rows(uri: str, folder: str, images: int) -> int:
    """The rows every loader reads: those of both the dataset and the folder."""
    n = lance.dataset(uri).count_rows()
    if n != images:
        _log(f"note: {uri} holds {n:,} rows and {folder} {images:,} files")
    return min(n, images)


def _other_formats(
    args: argparse.Namespace, keys: list[str], folder: str, work: Path, progress: bool, report: dict[str, Any]
) -> tuple[dict[str, str], Any]:
    """Write the peers' formats and prepare HF datasets, for the loaders of ``keys`` that read them.

    Returns each peer's folder by loader key and the HF dataset (``None`` if not asked for).
    """
    peer_dirs: dict[str, str] = {}
    for key in (k for k in keys if k in PEER_LOADERS):
        # each peer writes the same images into its own format, in a fresh process (its own figures)
        peer_dirs[key] = str(work / key)
        _log(f"writing {folder} -> {peer_dirs[key]} ({key})")
        report.setdefault("peer_conversion", {})[key] = write_in_child(key, folder, peer_dirs[key], args.seed)
        report["storage"][f"{key}_bytes"] = dir_bytes(peer_dirs[key])[0]
    hf = None
    if "hf_datasets" in keys:
        _log("preparing the HF datasets imagefolder")
        hf, report["hf_prepare"] = load_hf(folder, str(work / "hf-cache"), args.image_size, progress)
        report["storage"]["hf_cache_bytes"] = report["hf_prepare"]["cache_bytes"]
    return peer_dirs, hf


def _shuffle_quality(args: argparse.Namespace, folder: str, n: int, candidates: list[Candidate]) -> float:
    """The label entropy of uniformly random batches; each loader's own relative to it."""
    labels = [label for _, label in ImageFolder(folder).samples][:n]
    random_order = torch.randperm(n, generator=torch.Generator().manual_seed(args.seed + 1)).tolist()
    reference = mean_batch_entropy(labels, random_order, args.batch_size)
    for cand in candidates:
        if cand.result.batch_label_entropy is not None and reference > 0:
            cand.result.batch_label_entropy_vs_random = cand.result.batch_label_entropy / reference
    return reference


def _breakdown(
    args: argparse.Namespace, folder: str, uri: str, order: list[int], n: int, report: dict[str, Any]
) -> None:
    """``--breakdown``'s figures into ``report``, or why there are none (not JPEG)."""
    _log("timing each step of a worker (--breakdown)")
    files = [path for path, _ in ImageFolder(folder).samples]
    try:
        report["breakdown"] = breakdown(
            uri, files, order, args.image_size, args.batch_size, min(n, 256 if args.quick else 1024)
        )
    except ValueError as e:  # not JPEG: the loaders' figures still stand
        report["breakdown_error"] = str(e)
        _log(f"--breakdown skipped: {e}")


def run(args: argparse.Namespace) -> dict[str, Any]:
    """The whole benchmark, with the options of ``python -m lance_cookbook.bench`` in ``args``.

    Returns what ``--json`` writes.
    """
    progress = not args.no_progress
    folder = os.path.abspath(args.imagefolder)
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="lance-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"config": _config(args, folder)}
    try:
        uri = _data(args, folder, work, progress, report)
        n = _rows(uri, folder, report["imagefolder"]["images"])
        keys = [k for k in ALL_LOADERS if k in args.loaders]
        peer_dirs, hf = _other_formats(args, keys, folder, work, progress, report)

        # the same shuffled order for every loader (a plain list is a valid sampler and pickles cheaply)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(args.seed)).tolist()
        need_blobs = any(k in BOUNDS for k in keys)
        blobs = _blobs(folder, order, min(n, 512 if args.quick else 4096)) if need_blobs else []

        main_rss = rss_bytes()
        candidates = [
            build_candidate(
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
                seed=args.seed,
                peer_dirs=peer_dirs,
            )
            for key in keys
        ]
        _warm_up(candidates, concurrent=args.quick)
        report["config"]["startup_concurrent"] = bool(args.quick)
        report["later_loader_first_batch_s"] = _later_first_batches(candidates, concurrent=args.quick)
        _timed_rounds(candidates, max(1, args.epochs - 1), progress, getattr(args, "cache", "warm"))
        # the label entropy of uniformly random batches, the reference of each loader's shuffle quality
        report["random_batch_label_entropy"] = _shuffle_quality(args, folder, n, candidates)
        for cand in candidates:
            cand.close()
        report["main_rss_before_loaders_mib"] = main_rss / MiB if main_rss else None
        if args.breakdown:  # after the loaders: its decoded images must not count in their memory figures
            _breakdown(args, folder, uri, order, n, report)
        report["loaders"] = {c.key: asdict(c.result) for c in candidates}
        report["ratios"], report["targets"] = ratios_and_targets(report)
        if hasattr(os, "getloadavg"):
            report["config"]["load_average_end"] = list(os.getloadavg())
    finally:
        if not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)
    return report

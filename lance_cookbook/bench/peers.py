"""The formats people pick instead of Lance, on equal terms: WebDataset, MosaicML Streaming, LitData.

Each peer writes the same images (the benchmark's image folder, in the run's shuffled order) into its own
format with its documented defaults, and is read with the same collate as the Lance recipe
(``ImageCollate(S, decoder="torchvision", dtype=torch.uint8)`` on rows ``{"image": bytes, "label": int}``),
the same batch size and the same ``spawn`` workers, kept alive across epochs.

The peer libraries are imported inside functions: the core environment imports this module without them.
The peer run needs the ``bench`` extra, in an environment of its own (``make bench`` builds ``.venv-bench``:
Streaming's ``transformers`` caps ``huggingface_hub`` below 1.0, which the newest ``datasets`` rejects; see
docs/benchmark.md). Spawn workers unpickle the row functions below by module name, so they are module-level.

Writing runs in a fresh process (``python <this file> write KIND FOLDER OUT SEED``), run as a script so the
benchmark package (and Lance, which is not fork-safe) is not imported there: LitData's ``optimize`` starts
its own worker processes. Its figures (images/s, peak RSS) are then its own, as for the Lance conversion.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from typing import Any

__all__ = ["PEER_LOADERS", "build_peer", "write_in_child"]

PEER_LOADERS: dict[str, str] = {
    "webdataset": "(k) WebDataset tar shards + (g)'s collate",
    "streaming": "(l) MosaicML Streaming MDS + (g)'s collate",
    "litdata": "(m) LitData optimize/Streaming + (g)'s collate",
}

# WebDataset: shards of 1,000 images (~1 MiB here) so that 2 workers each get shards (WebDataset splits
# whole shards between workers: fewer shards than workers leaves one idle); a shard shuffle over all shards
# and a 1,000-sample buffer, as its documentation's examples use (shardshuffle=True, .shuffle(1000))
WDS_SHARD_IMAGES = 1000
WDS_SHUFFLE_BUFFER = 1000
# Streaming and LitData: their default shard/chunk size (64 MB), their default shuffles
MDS_SIZE_LIMIT = 1 << 26
LITDATA_CHUNK_BYTES = "64MB"


# --- rows: every peer hands the collate {"image": JPEG bytes, "label": int} -------------------------------


def wds_row(sample: dict[str, Any]) -> dict[str, Any]:
    """A WebDataset sample (``jpg`` bytes, ``cls`` as ASCII digits) -> the collate's row."""
    return {"image": sample["jpg"], "label": int(sample["cls"])}


def litdata_row(item: tuple[str, int]) -> dict[str, Any]:
    """LitData ``optimize`` function: one (path, label) -> a row of the JPEG's own bytes (not re-encoded)."""
    path, label = item
    with open(path, "rb") as f:
        return {"image": f.read(), "label": int(label)}


# --- writing (in a fresh process) -----------------------------------------------------------------------


def _samples(folder: str, seed: int) -> list[tuple[str, int]]:
    """The image folder's (path, label) pairs in the benchmark's shuffled order.

    Shards written in class order would give shard-local shuffles batches of one class.
    """
    import torch
    from torchvision.datasets import ImageFolder

    samples = ImageFolder(folder).samples
    order = torch.randperm(len(samples), generator=torch.Generator().manual_seed(seed)).tolist()
    return [samples[i] for i in order]


def _write(kind: str, folder: str, out: str, seed: int) -> dict[str, Any]:
    samples = _samples(folder, seed)
    shutil.rmtree(out, ignore_errors=True)  # a rerun starts clean (MDSWriter refuses a non-empty folder)
    os.makedirs(out)
    start = time.perf_counter()
    settings: dict[str, Any]
    if kind == "webdataset":
        import webdataset as wds

        pattern = os.path.join(out, "shard-%06d.tar")
        with wds.ShardWriter(pattern, maxcount=WDS_SHARD_IMAGES, verbose=0) as sink:
            for i, (path, label) in enumerate(samples):
                with open(path, "rb") as f:
                    sink.write({"__key__": f"{i:08d}", "jpg": f.read(), "cls": str(label).encode()})
        settings = {"maxcount": WDS_SHARD_IMAGES}
    elif kind == "streaming":
        from streaming import MDSWriter

        columns = {"image": "bytes", "label": "int"}
        with MDSWriter(out=out, columns=columns, size_limit=MDS_SIZE_LIMIT) as sink:
            for path, label in samples:
                with open(path, "rb") as f:
                    sink.write({"image": f.read(), "label": int(label)})
        settings = {"size_limit": MDS_SIZE_LIMIT, "compression": None}
    elif kind == "litdata":
        import litdata

        workers = min(2, os.cpu_count() or 1)
        litdata.optimize(
            fn=litdata_row,
            inputs=samples,
            output_dir=out,
            chunk_bytes=LITDATA_CHUNK_BYTES,
            num_workers=workers,
            mode="overwrite",
            start_method="spawn",  # never fork: the same rule as every loader here
            reorder_files=False,  # keep the shuffled order (it would sort inputs by file size)
            verbose=False,
        )
        settings = {"chunk_bytes": LITDATA_CHUNK_BYTES, "num_workers": workers}
    else:
        raise ValueError(f"unknown peer {kind!r}")
    seconds = time.perf_counter() - start
    return {"rows": len(samples), "seconds": seconds, "images_per_s": len(samples) / seconds, **settings}


def write_in_child(kind: str, folder: str, out: str, seed: int) -> dict[str, Any]:
    """Write ``folder`` into ``out`` in format ``kind``, in a fresh process.

    Returns its figures (rows, seconds, images/s, the writer's settings, peak RSS of that process in bytes).
    """
    from ..processes import end_with_parent

    cmd = [sys.executable, os.path.abspath(__file__), "write", kind, folder, out, str(seed)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, preexec_fn=end_with_parent())
    if proc.returncode != 0:
        raise RuntimeError(f"writing {kind} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --- reading --------------------------------------------------------------------------------------------


def build_peer(
    key: str, data: str, *, size: int, batch_size: int, workers: int, seed: int = 0
) -> tuple[Any, list[str], str]:
    """The loader of peer ``key`` over ``data`` (what :func:`write_in_child` wrote).

    Returns (loader, the paths its cold regime evicts, a note of its settings).
    """
    import torch
    from torch.utils.data import DataLoader

    from ..recipe.collate import ImageCollate

    collate = ImageCollate(size, decoder="torchvision", dtype=torch.uint8)
    workers_kw: dict[str, Any] = {"num_workers": workers}
    if workers > 0:
        workers_kw.update(multiprocessing_context="spawn", persistent_workers=True)
    if key == "webdataset":
        import webdataset as wds

        urls = sorted(os.path.join(data, n) for n in os.listdir(data) if n.endswith(".tar"))
        # batched in the workers (WebDataset's documented pattern: a loader with batch_size=None), with
        # the same collate; partial batches kept so every image counts. A plain DataLoader rather than
        # wds.WebLoader (a thin wrapper around one) so the benchmark can find the worker processes
        dataset = (
            wds.WebDataset(urls, shardshuffle=len(urls), seed=seed, empty_check=False)
            .shuffle(WDS_SHUFFLE_BUFFER)
            .map(wds_row)
            .batched(batch_size, collation_fn=collate, partial=True)
        )
        loader = DataLoader(dataset, batch_size=None, **workers_kw)
        note = f"{len(urls)} shards x {WDS_SHARD_IMAGES}, shardshuffle, shuffle({WDS_SHUFFLE_BUFFER})"
        return loader, [data], note
    if key == "streaming":
        from streaming import StreamingDataset
        from streaming.base.util import clean_stale_shared_memory

        clean_stale_shared_memory()  # a previous run killed mid-way leaves shared memory that blocks this one
        # local only: no remote, nothing downloaded; batch_size lets it partition samples per batch
        dataset = StreamingDataset(local=data, shuffle=True, shuffle_seed=seed, batch_size=batch_size)
        loader = DataLoader(dataset, batch_size=batch_size, collate_fn=collate, **workers_kw)
        return loader, [data], "MDS 64 MB shards, shuffle=True (py1e, default block)"
    if key == "litdata":
        import litdata

        dataset = litdata.StreamingDataset(input_dir=data, shuffle=True, seed=seed)
        loader = litdata.StreamingDataLoader(dataset, batch_size=batch_size, collate_fn=collate, **workers_kw)
        return loader, [data], "optimize 64MB chunks, StreamingDataset(shuffle=True), StreamingDataLoader"
    raise ValueError(f"unknown peer {key!r}")


def main(argv: list[str]) -> int:
    if len(argv) != 5 or argv[0] != "write":
        print("usage: peers.py write KIND FOLDER OUT SEED", file=sys.stderr)
        return 2
    _, kind, folder, out, seed = argv
    figures = _write(kind, folder, out, int(seed))
    try:
        import resource

        figures["peak_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    except ImportError:  # not on Windows
        figures["peak_rss"] = None
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    # run as a script: its own folder first on sys.path would let bench modules (cache, report...) shadow
    # top-level packages of the same name
    if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
        sys.path.pop(0)
    sys.exit(main(sys.argv[1:]))

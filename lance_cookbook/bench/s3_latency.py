"""Images/s of every loader reading from a real S3 server at 0, 10 and 50 ms per request.

``python -m lance_cookbook.bench.s3_latency --work-dir DIR`` writes ``--count`` distinct 32x32 JPEGs (4,000 by
default, :mod:`.synthetic`) and their Lance dataset (``data_prep.convert --shuffle 0``, 2 data files) into
``DIR`` unless they are there, writes the peers' formats (:func:`.s3_formats.prepare`), starts SeaweedFS's
S3 gateway behind Envoy (:func:`.s3_servers.s3_servers`), uploads every format to one bucket straight to the
gateway, and then reads one epoch of every loader through Envoy at each delay (``set_delay``: every request
waits that long before Envoy forwards it, concurrent requests concurrently; no restart between delays).

Every loader reads the way :mod:`.s3_formats` describes, with ``--workers`` DataLoader workers (2), batches of
64 and the benchmark's collate (``ImageCollate(32, decoder="torchvision", dtype=torch.uint8)``); the recipe
rows call ``make_loader`` with its defaults for a remote URI, whatever they are when this runs (and, where
it has ``read_ahead``, once more with ``read_ahead=0``: the ``_no_read_ahead`` rows). Each read is
a new loader with new workers and, for the formats that download into a local cache (Streaming's ``local``,
LitData's ``cache_dir``), a new empty cache folder: every read comes from the store. The recipe is also read
from the local copy of the dataset (the ``local`` column), the reference its ratios are taken against.

The clock: images/s counts from the moment every worker is ready to read (a start line in
``worker_init_fn``, :class:`StartLine`, that each worker waits at until all have arrived) to the last batch's
arrival. Worker start-up (0.5-3 s from the fork server on 2 cores, as long as a whole epoch of 4,000 small
images) is not in it; it is reported apart (``startup_s``), as is the main process's open before the loader
exists (``open_s``: a listing, a manifest, an index file). LanceDB's ``StreamingDataset`` builds its
permutation when a pass starts, in the main process: that is in its ``startup_s``.

Every read is checked: the ``(image, label)`` pairs delivered must be those of the local folder, each exactly
once (a fingerprint of each decoded image, compared as multisets); a read that misses or repeats an image is
reported (``exactly_once: false``), not timed away. Delays run in the order given; at each, the loaders run in
a rotated order; ``--repeats`` passes over all of it, and the table shows each cell's best. The load average
is recorded at the start, at each delay and at the end.

moto is not used here (:mod:`.s3_traffic` still counts requests with it): as a Python process its speed
measures moto. Method, command and results: ``docs/object_storage_traffic.md``.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import inspect
import math
import os
import shutil
import sys
import tempfile
import time
from collections import Counter
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .s3_report import emit, format_table, load_average, module_parser, record, summarize, versions

__all__ = [
    "DELAYS_MS",
    "StartLine",
    "build_parser",
    "fingerprints",
    "format_table",
    "loaders",
    "main",
    "run",
]

DELAYS_MS = (0, 10, 50)
RECIPE = ("lance_random", "lance_block")
DEFAULT_LOADERS = (
    "imagefolder",
    "lance_random",
    "lance_block",
    "webdataset",
    "streaming",
    "litdata",
    "lancedb_stream",
)


class StartLine:
    """A ``worker_init_fn`` at which every worker waits until all ``workers`` have started; then they read.

    Each worker writes ``ready-<id>`` into ``folder`` and polls until ``workers`` such files exist, then
    writes ``go-<id>`` holding the time (``time.time()``, one clock for every process of the machine) it
    left. :meth:`released` is the earliest of those: the moment reading began. Picklable (a folder and two
    numbers), so ``spawn`` and ``forkserver`` workers receive it.
    """

    def __init__(self, folder: str, workers: int, timeout_s: float = 600.0):
        self.folder, self.workers, self.timeout_s = folder, workers, timeout_s

    def _write(self, name: str, text: str) -> None:
        path = os.path.join(self.folder, name)
        with open(path + ".tmp", "w") as f:
            f.write(text)
        os.replace(path + ".tmp", path)  # never read half-written

    def __call__(self, worker_id: int) -> None:
        """Mark worker ``worker_id`` ready, wait for the others, and record when it left."""
        self._write(f"ready-{worker_id}", str(time.time()))
        deadline = time.monotonic() + self.timeout_s
        while sum(n.startswith("ready-") and not n.endswith(".tmp") for n in os.listdir(self.folder)) < (
            self.workers
        ):
            if time.monotonic() > deadline:
                break  # a worker that never came: read anyway, the figure then includes the wait
            time.sleep(0.001)
        self._write(f"go-{worker_id}", str(time.time()))

    def released(self) -> float | None:
        """The earliest time a worker left the line, ``None`` if none did."""
        times = [
            float(Path(self.folder, n).read_text())
            for n in os.listdir(self.folder)
            if n.startswith("go-") and not n.endswith(".tmp")
        ]
        return min(times) if times else None


def fingerprints(images: Any, labels: Any) -> list[tuple[int, int]]:
    """One ``(hash of the decoded pixels, label)`` per image of a batch.

    The hash is a weighted sum of the uint8 pixels with fixed random weights below 2**31 (no int64
    overflow for images up to 4 million values): two different images collide with negligible probability.
    """
    import torch

    flat = images.reshape(len(images), -1).to(torch.int64)
    weights = _weights(flat.shape[1])
    return list(zip((flat * weights).sum(1).tolist(), labels.tolist(), strict=True))


_WEIGHTS: dict[int, Any] = {}


def _weights(n: int) -> Any:
    import torch

    if n not in _WEIGHTS:
        _WEIGHTS[n] = torch.randint(1, 2**31, (n,), generator=torch.Generator().manual_seed(12345))
    return _WEIGHTS[n]


def expected_fingerprints(folder: str, ctx: Any) -> Counter:
    """The fingerprints of every image of the local ``folder`` (``DIR/<class>/<file>``), decoded as read."""
    classes = sorted(d for d in os.listdir(folder) if os.path.isdir(os.path.join(folder, d)))
    rows = [
        (os.path.join(folder, c, name), label)
        for label, c in enumerate(classes)
        for name in sorted(os.listdir(os.path.join(folder, c)))
    ]
    collate, expected = ctx.collate(), Counter()
    for start in range(0, len(rows), 256):
        batch = []
        for path, label in rows[start : start + 256]:
            with open(path, "rb") as f:
                batch.append({"image": f.read(), "label": label})
        expected.update(fingerprints(*collate(batch)))
    return expected


def loaders() -> dict[str, Any]:
    """Every loader this benchmark can time, by key: the :class:`.s3_formats.Format` that reads it.

    The recipe's rows with ``_local`` read the local copy; where ``make_loader`` has a ``read_ahead``
    parameter, the recipe's rows with ``_no_read_ahead`` pass ``read_ahead=0`` (off), the others leave it at
    its default.
    """
    from .s3_formats import FORMATS, LANCEDB_STREAM, Format
    from .s3_readers import open_lance

    table = {k: FORMATS[k] for k in ("imagefolder", *RECIPE, "webdataset", "streaming", "litdata")}
    table[LANCEDB_STREAM.key] = LANCEDB_STREAM
    for key in RECIPE:
        fmt, block = FORMATS[key], key == "lance_block"
        table[f"{key}_local"] = replace(
            fmt,
            key=f"{key}_local",
            label=fmt.label + ", from the local copy",
            open=lambda s, c, block=block: open_lance(s, c, block=block, local=True),
        )
        if has_read_ahead():
            table[f"{key}_no_read_ahead"] = Format(
                f"{key}_no_read_ahead",
                fmt.label + ", read_ahead=0",
                fmt.source,
                fmt.data_suffix,
                lambda s, c, block=block: open_lance(s, c, block=block, read_ahead=0),
                modules=fmt.modules,
            )
    return table


def has_read_ahead() -> bool:
    """Whether ``make_loader`` takes ``read_ahead`` (the recipe's read-ahead, once it exists)."""
    from ..recipe.loader import make_loader

    return "read_ahead" in inspect.signature(make_loader).parameters


def _shutdown(loader: Any) -> None:
    """End the workers a loader may keep (``make_loader``'s are persistent) before the next one starts."""
    iterator = getattr(loader, "_iterator", None)
    if iterator is not None and hasattr(iterator, "_shutdown_workers"):
        iterator._shutdown_workers()


def read_epoch(fmt: Any, store: Any, ctx: Any, expected: Counter, servers: Any = None) -> dict[str, Any]:
    """One epoch of ``fmt`` with new workers and empty caches, timed from :class:`StartLine`.

    With ``servers`` (:class:`.s3_servers.S3Servers`) the result also holds the delay in force
    (``delay_ms``) and the requests Envoy received during the read (``requests``).

    Returns images, ``exactly_once`` (the fingerprints equal ``expected``), ``missing`` and ``repeated``
    image counts, ``open_s``, ``startup_s``, ``first_batch_s`` (after the start line), ``read_s`` (to the
    last batch's arrival) and ``images_per_s`` (images / ``read_s``), and ``epoch_s`` (all of it).
    """
    work = tempfile.mkdtemp(prefix=f"{fmt.key}-", dir=ctx.work)
    line = StartLine(tempfile.mkdtemp(prefix="start-", dir=work), ctx.workers)
    run_ctx = replace(ctx, work=work, worker_init_fn=line if ctx.workers else None)
    seen: Counter = Counter()
    first = None
    before = servers.requests() if servers else None
    try:
        begin = time.time()
        with fmt.environment(store):
            loader = fmt.open(store, run_ctx)
            opened = time.time()
            end = opened
            for images, labels in loader:
                end = time.time()  # the last batch's arrival: a loader that ends its workers after it
                first = first or end  # (persistent_workers=False joins them, up to 5 s) is not charged
                seen.update(fingerprints(images, labels))
            _shutdown(loader)
            del loader  # Streaming's dataset holds shared memory until it is collected
            gc.collect()
        start = (line.released() if ctx.workers else None) or opened
    finally:
        shutil.rmtree(work, ignore_errors=True)  # the caches the read filled
    images = sum(seen.values())
    if servers:
        extra = {"delay_ms": servers.delay_ms, "requests": servers.requests() - before}
    else:
        extra = {}
    return {
        **extra,
        "images": images,
        "exactly_once": seen == expected,
        "missing": sum((expected - seen).values()),
        "repeated": sum((seen - expected).values()),
        "open_s": opened - begin,
        "startup_s": start - opened,
        "first_batch_s": (first - start) if first is not None else None,
        "read_s": end - start,
        "images_per_s": images / (end - start) if end > start else None,
        "epoch_s": end - begin,
    }


def stage(args: argparse.Namespace, work: str) -> tuple[str, str]:
    """The image folder and Lance dataset to read: ``--imagefolder``/``--lance``, else made in ``work``."""
    folder = args.imagefolder or os.path.join(work, f"img32-{args.count}")
    lance_path = args.lance or os.path.join(work, f"img32-{args.count}.lance")
    if not os.path.isdir(folder):
        from .synthetic import generate_imagefolder

        print(f"writing {args.count:,} distinct 32x32 JPEGs to {folder}", file=sys.stderr, flush=True)
        generate_imagefolder(folder, args.count, "32x32", classes=10, seed=args.seed)
    if not os.path.isdir(lance_path):
        from data_prep.convert import convert

        count = sum(len(files) for _, _, files in os.walk(folder))
        # rows in a random order (the block sampler needs mixed classes), 2 data files as in make bench
        convert(f"imagefolder:{folder}", lance_path, shuffle=args.seed, rows_per_file=math.ceil(count / 2),
                progress=False)  # fmt: skip
    return folder, lance_path


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Stage, upload and time every loader of ``args`` at every delay (see :func:`build_parser`)."""
    from .runner import folder_stats
    from .s3_formats import Context, Store, prepare, upload
    from .s3_servers import s3_servers

    table = loaders()
    keys = [k.strip() for k in args.loaders.split(",") if k.strip()]
    unknown = [k for k in keys if k not in table]
    if unknown:
        raise SystemExit(f"unknown loader(s) {', '.join(unknown)}; choose from {', '.join(table)}")
    for key in RECIPE:  # the recipe's reference from local disk, and read-ahead off where it exists
        for extra in (f"{key}_local", f"{key}_no_read_ahead"):
            if key in keys and extra in table and extra not in keys:
                keys.append(extra)
    delays = [float(x) for x in args.delays_ms.split(",")]
    work = args.work_dir or tempfile.mkdtemp(prefix="s3-latency-")
    os.makedirs(work, exist_ok=True)
    folder, lance_path = stage(args, work)
    stats = folder_stats(folder)
    sources = sorted({table[k].source for k in keys})
    local = prepare(sources, folder, lance_path, work, args.seed)
    ctx = Context(images=stats["images"], image_size=32, batch_size=args.batch_size, seed=args.seed,
                  work=work, local=local, workers=args.workers)  # fmt: skip
    expected = expected_fingerprints(folder, ctx)
    for key in keys:
        for module in table[key].modules:
            importlib.import_module(module)
    report: dict[str, Any] = {
        "config": {
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "images": stats["images"],
            "jpeg_bytes_per_image": stats["bytes"] / stats["images"],
            "image_size": 32,
            "batch_size": args.batch_size,
            "workers": args.workers,
            "seed": args.seed,
            "delays_ms": delays,
            "repeats": args.repeats,
            "cores": os.cpu_count(),
            "make_loader_read_ahead": has_read_ahead(),
            "versions": versions(),
            "load_average": {"start": load_average()},
        },
        "loaders": {k: {"label": table[k].label, "runs": {}} for k in keys},
    }
    remote = [k for k in keys if not k.endswith("_local")]
    with s3_servers("bench") as servers:
        report["config"]["servers_startup_s"] = servers.startup_s
        direct = Store(options=servers.direct_options, bucket=servers.bucket)
        for source in sources:
            upload(direct, local[source], source)
        store = Store(options=servers.storage_options, bucket=servers.bucket)
        for r in range(args.repeats):
            for key in [k for k in keys if k.endswith("_local")]:
                record(report, key, "local", read_epoch(table[key], store, ctx, expected, servers))
            for delay in delays:
                servers.set_delay(delay)
                report["config"]["load_average"][f"repeat {r}, {delay:g} ms"] = load_average()
                shift = r % max(1, len(remote))
                for key in remote[shift:] + remote[:shift]:
                    record(report, key, f"{delay:g}", read_epoch(table[key], store, ctx, expected, servers))
        servers.set_delay(0)
    report["config"]["load_average"]["end"] = load_average()
    summarize(report, RECIPE)
    return report


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m lance_cookbook.bench.s3_latency``."""
    p = module_parser(
        "s3_latency",
        "Images/s of each loader reading from SeaweedFS's S3 gateway behind Envoy, which delays every "
        "request by 0, 10 and 50 ms (a remote store's time to first byte).",
        "loaders",
        loaders(),
    )
    p.add_argument("--work-dir", help="images, Lance dataset, peers' shards and caches (default: a temp dir)")
    p.add_argument("--count", type=int, default=4000,
                   help="distinct 32x32 JPEGs to generate into the work dir (default 4,000)")  # fmt: skip
    p.add_argument("--imagefolder", help="read this image folder instead of generating one")
    p.add_argument("--lance", help="its Lance dataset (default: converted into the work dir, --shuffle SEED)")
    p.add_argument("--loaders", default=",".join(DEFAULT_LOADERS),
                   help="comma-separated keys (default: all; the recipe's rows bring their local-disk "
                   "reference and, once make_loader has read_ahead, a row with it off)")  # fmt: skip
    p.add_argument("--delays-ms", default=",".join(str(d) for d in DELAYS_MS), help="default 0,10,50")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--repeats", type=int, default=2, help="passes over every loader and delay (best kept)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write the report here")
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark on ``argv``, print its table, write ``--json``; return the exit status."""
    args = build_parser().parse_args(argv)
    report = run(args)
    return emit(format_table(report), report, args.json)


if __name__ == "__main__":
    sys.exit(main())

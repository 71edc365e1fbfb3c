"""Requests and bytes per image that each format costs when an epoch is read from object storage.

The traffic is counted at the server; a model turns it into images/s per worker at a given request latency.

``python -m lance_cookbook.bench.s3_traffic --imagefolder DIR --lance PATH`` uploads the same images in each
format (:mod:`.s3_formats`) to moto's S3 server running in this process
(:func:`lance_cookbook.object_store.local_s3`), reads one epoch of each the way its library reads remote data,
and counts every HTTP request at the server (:mod:`.s3_counter`). moto's speed says nothing about S3, so
the figures are counts; time enters only through the model (:func:`images_per_s`) and, with
``--delay-ms``, a delay added before every request, which makes the round trips a loader waits for one
after another countable (:func:`.s3_counter.serial_round_trips`). Method, command and measured tables:
``docs/object_storage_traffic.md``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import tempfile
import time
from typing import Any

from .s3_counter import Request, TrafficCounter, serial_round_trips, summarize
from .s3_report import emit, markdown_row, module_parser

__all__ = [
    "BANDWIDTH_BYTES_PER_S",
    "CPU_US_PER_IMAGE",
    "images_per_s",
    "main",
]

# One request stream from S3 moves about 85-90 MB/s: AWS, "Performance design patterns for Amazon S3"
# (https://docs.aws.amazon.com/AmazonS3/latest/userguide/optimizing-performance-design-patterns.html,
# "make one concurrent request for each 85-90 MB/s of desired network throughput")
BANDWIDTH_BYTES_PER_S = 90e6

# Workers' CPU microseconds per image, measured by the loader benchmark (docs/benchmark.md): 32 px, run 1 of
# "Results: 20,000 distinct 32x32 JPEGs", warm; photos, "Where the time goes" ((g) 865, (c) 860). Photos were
# not measured for the block sampler or the peers: they take (g)'s figure, whose decode + resize (681 us)
# every format pays alike. The folder's figure is (c), files from the page cache: a boto3 GET per image costs
# the client more than that (request signing, HTTP), which the model leaves out.
CPU_US_PER_IMAGE: dict[str, dict[str, float]] = {
    "32px": {"imagefolder": 46, "lance_random": 62, "lance_block": 46, "webdataset": 156, "streaming": 164,
             "litdata": 48},
    "photos": {"imagefolder": 860, "lance_random": 865, "lance_block": 865, "webdataset": 865,
               "streaming": 865, "litdata": 865},
}  # fmt: skip


def images_per_s(
    requests_per_image: float,
    bytes_per_image: float,
    cpu_us_per_image: float,
    latency_s: float,
    bandwidth_bytes_per_s: float = BANDWIDTH_BYTES_PER_S,
    *,
    overlapped: bool = False,
) -> float:
    """The model of images/s of one worker at a given request latency.

    Images/s of one worker that waits ``latency_s`` for each of ``requests_per_image`` round trips, receives
    ``bytes_per_image`` at ``bandwidth_bytes_per_s`` and spends ``cpu_us_per_image`` on each image: ``1 / (r *
    latency + b / bandwidth + cpu)``; with ``overlapped``, a loader whose downloads run ahead of its CPU work
    in threads or processes of their own: ``1 / max(r * latency + b / bandwidth, cpu)``.

    A model, not a measurement. ``requests_per_image`` counts requests waited for one after another: the
    requests per image for the sequential bound, the measured serial round trips per image
    (:func:`serial_round_trips`) where a loader overlaps its requests. Raises ``ValueError`` on a negative
    input or a zero time per image.
    """
    parts = (requests_per_image, bytes_per_image, cpu_us_per_image, latency_s)
    if min(parts) < 0 or bandwidth_bytes_per_s <= 0:
        raise ValueError("inputs must be >= 0 and bandwidth > 0")
    io = requests_per_image * latency_s + bytes_per_image / bandwidth_bytes_per_s
    cpu = cpu_us_per_image * 1e-6
    seconds = max(io, cpu) if overlapped else io + cpu
    if seconds == 0:
        raise ValueError("zero time per image")
    return 1.0 / seconds


def _read(fmt: Any, store: Any, ctx: Any, counter: TrafficCounter) -> tuple[int, float, int, list[Request]]:
    """One epoch of ``fmt``, counted from a fresh reset.

    Returns (images, wall seconds, requests made while opening, all requests).
    """
    counter.reset()
    start = time.perf_counter()
    with fmt.environment(store):
        batches = fmt.open(store, ctx)
        opened = len(counter.requests())
        images = sum(len(labels) for _, labels in batches)
        del batches  # Streaming's dataset holds shared memory until it is collected
    return images, time.perf_counter() - start, opened, counter.requests()


def measure(fmt: Any, store: Any, ctx: Any, counter: TrafficCounter, delay_s: float = 0.0) -> dict[str, Any]:
    """Read one epoch of ``fmt`` (a :class:`.s3_formats.Format`) and summarize its traffic.

    With ``delay_s`` read it once more with that delay added to every request and add its serial round trips
    (the epoch's, and per image: ``exposure_per_image``). Raises ``RuntimeError`` if the epoch did not deliver
    every image exactly once.
    """
    for module in fmt.modules:
        importlib.import_module(module)
    counter.delay_s = 0.0
    images, seconds, opened, requests = _read(fmt, store, ctx, counter)
    if images != ctx.images:
        raise RuntimeError(f"{fmt.key}: read {images} images, expected {ctx.images}")
    result = summarize(requests, images, fmt.is_data)
    result.update(seconds=seconds, open_requests=opened, max_in_flight=counter.max_in_flight)
    if delay_s > 0:
        counter.delay_s = delay_s
        try:
            _, delayed, _, delayed_requests = _read(fmt, store, ctx, counter)
        finally:
            counter.delay_s = 0.0
        chain = serial_round_trips(delayed_requests)
        result.update(
            seconds_delayed=delayed,
            delay_s=delay_s,
            serial_round_trips=chain,
            exposure_per_image=chain / images,
        )
    return result


def model_rates(
    result: dict[str, Any], cpu_us: float, latencies_s: list[float], bandwidth: float, downloads_ahead: bool
) -> None:
    """Add the model's images/s to ``result`` in place.

    ``seq_<ms>ms``, the sequential bound (every request of every image waited for, one after another, then the
    CPU work) and, where serial round trips were measured, ``conc_<ms>ms``, the concurrent bound (only those
    round trips waited for; overlapped with the CPU work when the format ``downloads_ahead``).
    """
    result["cpu_us_per_image"] = cpu_us
    for lat in latencies_s:
        ms = round(lat * 1000)
        result[f"seq_{ms}ms"] = images_per_s(
            result["requests_per_image"], result["bytes_per_image"], cpu_us, lat, bandwidth
        )
        if "exposure_per_image" in result:
            result[f"conc_{ms}ms"] = images_per_s(
                result["exposure_per_image"],
                result["bytes_per_image"],
                cpu_us,
                lat,
                bandwidth,
                overlapped=downloads_ahead,
            )


def format_tables(report: dict[str, Any]) -> str:
    """The report as two Markdown tables: traffic per format, then the model."""
    jpeg = report["jpeg_bytes_per_image"]
    lines = [
        f"{report['images']:,} images, {jpeg:,.0f} JPEG bytes per image; batch {report['batch_size']}, "
        "0 workers (one process reads)",
        "",
        "| format | requests/img | ranged | bytes/img | x JPEG | fixed req (open) | fixed bytes "
        "| max in flight |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for key, r in report["formats"].items():
        lines.append(
            f"| {key} | {r['requests_per_image']:.4f} | {r['data_ranged']:,} | {r['bytes_per_image']:,.0f} | "
            f"{r['bytes_per_image'] / jpeg:.2f} | {r['fixed_requests']} ({r['open_requests']}) | "
            f"{r['fixed_bytes']:,} | {r['max_in_flight']} |"
        )
    lats = [round(x * 1000) for x in report["latencies_s"]]
    head = " | ".join(f"seq {ms} ms" for ms in lats)
    exposed = any("exposure_per_image" in r for r in report["formats"].values())
    if exposed:
        head += " | serial RT/img | " + " | ".join(f"conc {ms} ms" for ms in lats)
    cols = len(lats) * (2 if exposed else 1) + (1 if exposed else 0)
    lines += [
        "",
        f"model, images/s per worker, {report['bandwidth_bytes_per_s'] / 1e6:.0f} MB/s, "
        f"CPU per image from docs/benchmark.md ({report['cpu_profile']})",
        "",
        f"| format | CPU us/img | {head} |",
        "|---|---:|" + "---:|" * cols,
    ]
    for key, r in report["formats"].items():
        cells = [f"{r[f'seq_{ms}ms']:,.0f}" for ms in lats]
        if exposed:
            cells.append(f"{r['exposure_per_image']:.4f}" if "exposure_per_image" in r else "")
            cells += [f"{r[f'conc_{ms}ms']:,.0f}" if f"conc_{ms}ms" in r else "" for ms in lats]
        lines.append(markdown_row(key, [f"{r['cpu_us_per_image']:.0f}", *cells]))
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    from .s3_formats import FORMATS

    p = module_parser(
        "s3_traffic",
        "Requests and bytes per image of each format read from a local S3 server (moto, in this process), "
        "counted at the server; and a model of images/s per worker at a request latency.",
        "formats",
        FORMATS,
    )
    p.add_argument(
        "--imagefolder", help="ImageFolder of JPEGs (DIR/<class>/<file>); required unless --from-json"
    )
    p.add_argument("--lance", help="local Lance dataset of the same images (data_prep.convert)")
    p.add_argument("--from-json", help="no reading: apply the model (its options below) to a saved report")
    p.add_argument("--formats", default=",".join(FORMATS), help="comma-separated keys (default: all)")
    p.add_argument("--image-size", type=int, default=32, help="collate output size S (default 32)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0, help="shuffle seed of every order (default 0)")
    p.add_argument("--work-dir", help="where peers' shards and download caches go (default: a temp dir)")
    p.add_argument("--delay-ms", type=float, default=0.0,
                   help="also read each format once more with this delay added to every request at the "
                   "server, and count the round trips it waited for one after another; it must exceed "
                   "the time the server takes to start a batch's requests (300 ms for moto here; "
                   "default 0: off)")  # fmt: skip
    p.add_argument("--latencies-ms", default="10,50", help="model latencies (default 10,50)")
    p.add_argument("--bandwidth-mbs", type=float, default=BANDWIDTH_BYTES_PER_S / 1e6,
                   help="model bandwidth per worker, MB/s (default 90: AWS's figure per request "
                   "stream)")  # fmt: skip
    p.add_argument("--cpu-profile", choices=sorted(CPU_US_PER_IMAGE),
                   help="which measured CPU us per image the model uses (default: 32px if --image-size <= "
                   "64, else photos)")  # fmt: skip
    p.add_argument("--json", help="write the report here")
    return p


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Upload, read and model every format of ``args`` (see :func:`build_parser`); returns the report."""
    from ..object_store import local_s3
    from .runner import folder_stats
    from .s3_formats import FORMATS, Context, Store, prepare, upload

    keys = [k.strip() for k in args.formats.split(",") if k.strip()]
    unknown = [k for k in keys if k not in FORMATS]
    if unknown:
        raise SystemExit(f"unknown format(s) {', '.join(unknown)}; choose from {', '.join(FORMATS)}")
    profile = args.cpu_profile or ("32px" if args.image_size <= 64 else "photos")
    latencies = [float(x) / 1000 for x in args.latencies_ms.split(",")]
    bandwidth = args.bandwidth_mbs * 1e6
    work = args.work_dir or tempfile.mkdtemp(prefix="s3-traffic-")
    sources = sorted({FORMATS[k].source for k in keys})
    local = prepare(sources, args.imagefolder, args.lance, work, args.seed)
    stats = folder_stats(args.imagefolder)
    total_jpeg, images = stats["bytes"], stats["images"]
    counter = TrafficCounter()
    report: dict[str, Any] = {
        "images": images,
        "jpeg_bytes_per_image": total_jpeg / images,
        "batch_size": args.batch_size,
        "image_size": args.image_size,
        "seed": args.seed,
        "workers": 0,
        "bandwidth_bytes_per_s": bandwidth,
        "latencies_s": latencies,
        "cpu_profile": profile,
        "delay_s": args.delay_ms / 1000,
        "formats": {},
    }
    with local_s3("s3-traffic", wsgi_middleware=counter.wrap) as options:
        store = Store(options=options, bucket="s3-traffic")
        for source in sources:
            upload(store, local[source], source)
        ctx = Context(images=images, image_size=args.image_size, batch_size=args.batch_size,
                      seed=args.seed, work=work, local=local)  # fmt: skip
        for key in keys:
            print(f"reading {key} ...", file=sys.stderr, flush=True)
            result = measure(FORMATS[key], store, ctx, counter, args.delay_ms / 1000)
            cpu = CPU_US_PER_IMAGE[profile][key]
            model_rates(result, cpu, latencies, bandwidth, FORMATS[key].downloads_ahead)
            result["label"] = FORMATS[key].label
            report["formats"][key] = result
    return report


def remodel(report: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """``report`` (a saved ``--json``) with the model recomputed for ``args``.

    The model is recomputed for ``args``' latencies, bandwidth and CPU profile: the counts do not depend on
    them.
    """
    from .s3_formats import FORMATS

    profile = args.cpu_profile or ("32px" if report["image_size"] <= 64 else "photos")
    latencies = [float(x) / 1000 for x in args.latencies_ms.split(",")]
    report.update(latencies_s=latencies, bandwidth_bytes_per_s=args.bandwidth_mbs * 1e6, cpu_profile=profile)
    for key, result in report["formats"].items():
        for name in [k for k in result if k.startswith(("seq_", "conc_", "exposed_"))]:
            del result[name]
        cpu = CPU_US_PER_IMAGE[profile][key]
        model_rates(result, cpu, latencies, args.bandwidth_mbs * 1e6, FORMATS[key].downloads_ahead)
    return report


def main(argv: list[str] | None = None) -> int:
    """Run the traffic benchmark (or remodel a ``--json``) on ``argv``; return the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.from_json:
        with open(args.from_json) as f:
            report = remodel(json.load(f), args)
    elif not (args.imagefolder and args.lance):
        parser.error("--imagefolder and --lance are required (or --from-json)")
    else:
        report = run(args)
    return emit(format_tables(report), report, args.json)


if __name__ == "__main__":
    sys.exit(main())

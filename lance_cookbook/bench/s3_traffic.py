"""Requests and bytes per image that each format costs when an epoch is read from object storage, counted at
the server, and a model of images/s per worker at a given request latency.

``python -m lance_cookbook.bench.s3_traffic --imagefolder DIR --lance PATH`` uploads the same images in each
format (:mod:`.s3_formats`) to moto's S3 server running in this process
(:func:`lance_cookbook.testing.local_s3`), reads one epoch of each the way its library reads remote
data, and counts at the server, through :class:`TrafficCounter` (a WSGI middleware around moto), every HTTP
request: its method, object, ``Range`` header, status and response body bytes. Only the reading is counted
(the counter is reset after the uploads). moto is a Python process: its speed says nothing about S3, so the
figures are counts; time enters only through the model (:func:`images_per_s`) and, with ``--delay-ms``, a
delay the middleware adds before every request, which makes the round trips a loader waits for one after
another countable from the server's timestamps (:func:`serial_round_trips`). The method, the command and the
measured tables are in ``docs/object_storage_traffic.md``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

__all__ = [
    "BANDWIDTH_BYTES_PER_S",
    "CPU_US_PER_IMAGE",
    "Request",
    "TrafficCounter",
    "images_per_s",
    "serial_round_trips",
    "main",
    "summarize",
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


@dataclass(frozen=True)
class Request:
    """One HTTP request as the server saw it. ``path`` is ``/bucket/key`` (``/bucket`` for a listing),
    ``range`` the ``Range`` header (``None``: the whole object), ``body_bytes`` the response body bytes
    the server sent (0 for HEAD), ``start``/``end`` ``time.perf_counter()`` seconds."""

    method: str
    path: str
    query: str
    range: str | None
    status: int
    body_bytes: int
    start: float
    end: float


class TrafficCounter:
    """A WSGI middleware that records every request its application serves (:class:`Request`).

    Use: ``counter = TrafficCounter(); local_s3(bucket, wsgi_middleware=counter.wrap)``. Thread-safe (the
    server handles each request in a thread of its own). ``delay_s`` (seconds) is slept before each request
    is handed on: a first-byte latency, paid concurrently by concurrent requests. ``max_in_flight`` is the
    largest number of requests being served at once since the last :meth:`reset`.
    """

    def __init__(self, *, delay_s: float = 0.0):
        self.delay_s = delay_s
        self._app: Callable[..., Iterable[bytes]] | None = None
        self._lock = threading.Lock()
        self._done: list[Request] = []
        self._in_flight = 0
        self.max_in_flight = 0

    def wrap(self, app: Callable[..., Iterable[bytes]]) -> TrafficCounter:
        """Serve ``app`` through this counter; returns the counter (the WSGI application to serve)."""
        self._app = app
        return self

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if self._app is None:
            raise RuntimeError("TrafficCounter.wrap(app) was not called")
        start = time.perf_counter()
        with self._lock:
            self._in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self._in_flight)
        if self.delay_s:
            time.sleep(self.delay_s)
        response: list[Any] = []  # [status, Content-Length or None]

        def counting_start_response(line: str, headers: list, exc_info: Any = None) -> Any:
            length = next((v for k, v in headers if k.lower() == "content-length"), None)
            response[:] = [int(line.split(None, 1)[0]), int(length) if length is not None else None]
            return start_response(line, headers, exc_info) if exc_info else start_response(line, headers)

        try:
            body = self._app(environ, counting_start_response)
        except BaseException:
            with self._lock:
                self._in_flight -= 1
            raise
        return self._count(environ, body, response, start)

    def _count(self, environ: dict[str, Any], body: Iterable[bytes], response: list[Any], start: float):
        sent = 0
        finished = False

        def finish() -> None:
            nonlocal finished
            if finished:
                return
            finished = True
            request = Request(
                method=environ["REQUEST_METHOD"],
                path=environ.get("PATH_INFO", ""),
                query=environ.get("QUERY_STRING", ""),
                range=environ.get("HTTP_RANGE"),
                status=response[0] if response else 0,
                body_bytes=sent,
                start=start,
                end=time.perf_counter(),
            )
            with self._lock:
                self._done.append(request)
                self._in_flight -= 1

        try:
            for chunk in body:
                sent += len(chunk)
                if response and response[1] is not None and sent >= response[1]:
                    # the last bytes: the request ends before the client can have them and send its next
                    # one (ending it after the server's own clean-up would overlap the two)
                    finish()
                yield chunk
        finally:
            close = getattr(body, "close", None)
            if close is not None:
                close()
            finish()

    def settle(self, timeout_s: float = 10.0) -> None:
        """Wait until no request is being served (the server records a request after its response has
        gone out, so a client can see a reply before it is counted). Raises ``TimeoutError``."""
        deadline = time.monotonic() + timeout_s
        while True:
            with self._lock:
                if self._in_flight == 0:
                    return
            if time.monotonic() > deadline:
                raise TimeoutError(f"requests still in flight after {timeout_s} s")
            time.sleep(0.005)

    def reset(self) -> None:
        """Forget every request served so far (after :meth:`settle`) and the in-flight high-water mark."""
        self.settle()
        with self._lock:
            self._done.clear()
            self.max_in_flight = 0

    def requests(self) -> list[Request]:
        """The requests served since the last :meth:`reset` (after :meth:`settle`), in order of completion."""
        self.settle()
        with self._lock:
            return list(self._done)


def summarize(requests: list[Request], images: int, is_data: Callable[[str], bool]) -> dict[str, Any]:
    """Per-image and fixed traffic of one epoch.

    ``is_data(path)`` says whether an object holds images (a JPEG, a Lance data file, a shard); requests
    to it are per image, every other request (listings, manifests, indexes) is fixed per epoch and
    process. Returns counts (ints), bytes (ints), per-image figures (floats) and ``by_kind``: requests and
    bytes by method, data or other object, and ranged or not.
    Raises ``ValueError`` if ``images < 1`` or a request failed (status >= 400).
    """
    if images < 1:
        raise ValueError(f"images must be >= 1, got {images}")
    failed = [r for r in requests if r.status >= 400]
    if failed:
        raise ValueError(f"{len(failed)} request(s) failed, e.g. {failed[0]}")
    data = [r for r in requests if is_data(r.path)]
    fixed = [r for r in requests if not is_data(r.path)]
    groups: dict[str, list[int]] = {}  # "GET data ranged" -> [requests, bytes]
    for r in requests:
        name = f"{r.method} {'data' if is_data(r.path) else 'other'}{' ranged' if r.range else ''}"
        group = groups.setdefault(name, [0, 0])
        group[0] += 1
        group[1] += r.body_bytes
    data_bytes = sum(r.body_bytes for r in data)
    sizes = sorted(r.body_bytes for r in data if r.method == "GET")
    return {
        "images": images,
        "requests": len(requests),
        "data_requests": len(data),
        "data_ranged": sum(1 for r in data if r.range),
        "data_bytes": data_bytes,
        "fixed_requests": len(fixed),
        "fixed_bytes": sum(r.body_bytes for r in fixed),
        "requests_per_image": len(data) / images,
        "bytes_per_image": data_bytes / images,
        # sizes of the GETs of data objects: the median and the largest, bytes
        "data_get_median_bytes": sizes[len(sizes) // 2] if sizes else 0,
        "data_get_max_bytes": sizes[-1] if sizes else 0,
        "by_kind": {k: {"requests": n, "bytes": b} for k, (n, b) in sorted(groups.items())},
    }


def images_per_s(
    requests_per_image: float,
    bytes_per_image: float,
    cpu_us_per_image: float,
    latency_s: float,
    bandwidth_bytes_per_s: float = BANDWIDTH_BYTES_PER_S,
    *,
    overlapped: bool = False,
) -> float:
    """The model: images/s of one worker that waits ``latency_s`` for each of ``requests_per_image``
    round trips, receives ``bytes_per_image`` at ``bandwidth_bytes_per_s`` and spends ``cpu_us_per_image``
    on each image: ``1 / (r * latency + b / bandwidth + cpu)``; with ``overlapped``, a loader whose
    downloads run ahead of its CPU work in threads or processes of their own: ``1 / max(r * latency + b /
    bandwidth, cpu)``.

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


def serial_round_trips(requests: list[Request]) -> int:
    """The longest chain of requests in which each one started after the previous one had ended: the
    number of round trips a client waited for one after another (requests it had in flight together count
    once). With a delay added to every request at the server (``TrafficCounter.delay_s``) concurrent
    requests overlap, and this is the loader's latency exposure, provided the delay exceeds the time the
    server takes to start all the requests a client sent together: a request started later than that
    looks like one sent after the others answered. Measured with moto: 50 ms was too short for Lance's
    ~53 concurrent reads per batch (2.2 round trips per batch), 300 ms was not (1.0;
    ``docs/object_storage_traffic.md``). O(n log n)."""
    by_start = sorted(requests, key=lambda r: r.start)
    by_end = sorted(requests, key=lambda r: r.end)
    depth: dict[int, int] = {}
    ended_before = j = 0  # the deepest chain among requests that ended before the current one started
    for r in by_start:
        while j < len(by_end) and by_end[j].end <= r.start:
            ended_before = max(ended_before, depth[id(by_end[j])])
            j += 1
        depth[id(r)] = ended_before + 1
    return max(depth.values(), default=0)


def _read(fmt: Any, store: Any, ctx: Any, counter: TrafficCounter) -> tuple[int, float, int, list[Request]]:
    """One epoch of ``fmt``: (images, wall seconds, requests made while opening, all requests), counted
    from a fresh reset."""
    counter.reset()
    start = time.perf_counter()
    with fmt.environment(store):
        batches = fmt.open(store, ctx)
        opened = len(counter.requests())
        images = sum(len(labels) for _, labels in batches)
        del batches  # Streaming's dataset holds shared memory until it is collected
    return images, time.perf_counter() - start, opened, counter.requests()


def measure(fmt: Any, store: Any, ctx: Any, counter: TrafficCounter, delay_s: float = 0.0) -> dict[str, Any]:
    """Read one epoch of ``fmt`` (a :class:`.s3_formats.Format`) and summarize its traffic; with ``delay_s``
    read it once more with that delay added to every request and add its serial round trips (the epoch's,
    and per image: ``exposure_per_image``). Raises ``RuntimeError`` if
    the epoch did not deliver every image exactly once."""
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
    """Add the model's images/s to ``result`` in place: ``seq_<ms>ms``, the sequential bound (every
    request of every image waited for, one after another, then the CPU work) and, where serial round trips
    were measured, ``conc_<ms>ms``, the concurrent bound (only those round trips waited for; overlapped
    with the CPU work when the format ``downloads_ahead``)."""
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
        lines.append(f"| {key} | {r['cpu_us_per_image']:.0f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    from .s3_formats import FORMATS

    p = argparse.ArgumentParser(
        prog="python -m lance_cookbook.bench.s3_traffic",
        description="Requests and bytes per image of each format read from a local S3 server (moto, in this "
        "process), counted at the server; and a model of images/s per worker at a request latency.",
        epilog="formats: " + "; ".join(f"{k}: {f.label}" for k, f in FORMATS.items()),
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
    from ..testing import local_s3
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
    """``report`` (a saved ``--json``) with the model recomputed for ``args``' latencies, bandwidth and CPU
    profile: the counts do not depend on them."""
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
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.from_json:
        with open(args.from_json) as f:
            report = remodel(json.load(f), args)
    elif not (args.imagefolder and args.lance):
        parser.error("--imagefolder and --lance are required (or --from-json)")
    else:
        report = run(args)
    print(format_tables(report))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())

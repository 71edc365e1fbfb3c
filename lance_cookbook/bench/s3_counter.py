"""Counting at the S3 server.

Every request a WSGI application serves (:class:`TrafficCounter`), the traffic of one epoch summarized per
image (:func:`summarize`) and the round trips a client waited for one after another
(:func:`serial_round_trips`). Used by :mod:`.s3_traffic`; method in ``docs/object_storage_traffic.md``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

__all__ = ["Request", "TrafficCounter", "serial_round_trips", "summarize"]


@dataclass(frozen=True)
class Request:
    """One HTTP request as the server saw it.

    ``path`` is ``/bucket/key`` (``/bucket`` for a listing), ``range`` the ``Range`` header (``None``: the
    whole object), ``body_bytes`` the response body bytes the server sent (0 for HEAD), ``start``/``end``
    ``time.perf_counter()`` seconds.
    """

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
        """Serve one WSGI request through the wrapped app and count it (after ``delay_s``)."""
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
        """Wait until no request is being served.

        The server records a request after its response has gone out, so a client can see a reply before it is
        counted. Raises ``TimeoutError``.
        """
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


def serial_round_trips(requests: list[Request]) -> int:
    """The longest chain of requests in which each one started after the previous one had ended.

    The number of round trips a client waited for one after another (requests it had in flight together count
    once). With a delay added to every request at the server (``TrafficCounter.delay_s``) concurrent requests
    overlap, and this is the loader's latency exposure, provided the delay exceeds the time the server takes
    to start all the requests a client sent together: a request started later than that looks like one sent
    after the others answered. Measured with moto: 50 ms was too short for Lance's ~53 concurrent reads per
    batch (2.2 round trips per batch), 300 ms was not (1.0; ``docs/object_storage_traffic.md``). O(n log n).
    """
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

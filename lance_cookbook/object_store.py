"""Object storage for Lance: the storage options it needs, and a local S3-compatible server to try them on.

Lance reads and writes ``s3://bucket/path.lance`` itself (no boto3 at run time); everything it needs is in
``storage_options``, a ``dict[str, str]`` passed to ``lance.dataset``/``write_fragments``/``commit`` and, via
``SafeLanceDataset(dataset_options={"storage_options": ...})``, to every DataLoader worker.
"""

from __future__ import annotations

import logging
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

__all__ = ["s3_storage_options", "local_s3"]


def s3_storage_options(
    endpoint: str | None = None,
    key: str | None = None,
    secret: str | None = None,
    region: str = "us-east-1",
    session_token: str | None = None,
) -> dict[str, str]:
    """Lance ``storage_options`` for Amazon S3 or an S3-compatible store (MinIO, Ceph, R2, moto ...).

    ``endpoint``: ``None`` for AWS itself, else the server's URL (``http://host:port``); a plain-HTTP endpoint
    also sets ``allow_http``. ``key``/``secret``: leave ``None`` to let Lance find credentials the usual AWS
    way (environment, profile, instance role), which is what a real cluster should do.
    """
    options = {"aws_region": region}
    if endpoint:
        options["aws_endpoint"] = endpoint
        if endpoint.startswith("http://"):
            options["allow_http"] = "true"
    if key is not None:
        options["aws_access_key_id"] = key
    if secret is not None:
        options["aws_secret_access_key"] = secret
    if session_token is not None:
        options["aws_session_token"] = session_token
    return options


# Placeholders for the local server only: moto accepts any credentials, and these exist nowhere else.
DUMMY_KEY = "cookbook-test-key"
DUMMY_SECRET = "cookbook-test-secret"


def _endpoint(server) -> str:
    host, port = server.get_host_and_port()
    return f"http://{host}:{port}"


@contextmanager
def local_s3(
    bucket: str = "lance-cookbook",
    *,
    key: str = DUMMY_KEY,
    secret: str = DUMMY_SECRET,
    region: str = "us-east-1",
    wsgi_middleware: Callable[[Any], Any] | None = None,
) -> Iterator[dict[str, str]]:
    """Run moto's S3 server on ``127.0.0.1`` (a free port) with ``bucket`` created; yield its storage options.

    For tests and notebooks: the server lives in a thread of this process and forgets everything when the
    block ends; moto accepts any ``key``/``secret``. Other processes (DataLoader workers, a
    conversion subprocess) reach it over HTTP with the yielded options. Needs the ``scale``
    extra (``moto[server]``, ``boto3``). ``wsgi_middleware``, if given, is called once with moto's WSGI
    application and must return the application to serve instead (every request, the bucket's creation
    included, then passes through it): how :mod:`lance_cookbook.bench.s3_traffic` counts requests.
    """
    import boto3
    from moto.server import ThreadedMotoServer

    access_log = logging.getLogger("werkzeug")  # one INFO line per request otherwise
    level = access_log.level
    access_log.setLevel(logging.WARNING)
    try:
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        try:
            if wsgi_middleware is not None:
                # werkzeug's server (moto keeps it in _server) looks its application up on every request
                server._server.app = wsgi_middleware(server._server.app)
            options = s3_storage_options(_endpoint(server), key, secret, region)
            boto3.client(
                "s3",
                endpoint_url=options["aws_endpoint"],
                aws_access_key_id=key,
                aws_secret_access_key=secret,
                region_name=region,
            ).create_bucket(Bucket=bucket)
            yield options
        finally:
            # moto keeps its buckets in this process's memory beyond the server: forget them
            no_proxy = urllib.request.build_opener(urllib.request.ProxyHandler({}))
            try:
                no_proxy.open(urllib.request.Request(f"{_endpoint(server)}/moto-api/reset", method="POST"))
            finally:
                server.stop()
    finally:
        access_log.setLevel(level)

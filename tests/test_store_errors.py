"""Object-store faults in words (store_errors): a refused read names the URI and the cause, never Lance's raw
XML; a silent endpoint is named within seconds, checked where Lance's requests go (through a proxy).

A moto S3 server runs as a child process on 127.0.0.1 with IAM authentication switched on, so unknown keys
and wrong secrets are refused as a real store refuses them (s3-convert-store-errors, lance#797). The proxy
tests follow t3-s3-proxy-endpoint-refused and AWSS3.jl#98.
"""

from __future__ import annotations

import http.server
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import lance
import pyarrow as pa
import pytest

from lance_cookbook import DatasetNotFound, make_loader, open_dataset
from lance_cookbook.object_store import local_s3, s3_storage_options
from lance_cookbook.recipe.store_errors import endpoint_proxy, silent_endpoint_reason, store_error_reason

BUCKET = "store-faults"


def needs_moto():
    """boto3, or skip: the moto server and its client are in the scale extra."""
    pytest.importorskip("moto", reason="needs the scale extra: pip install -e '.[scale]'")
    return pytest.importorskip("boto3", reason="needs the scale extra: pip install -e '.[scale]'")


@pytest.fixture(scope="module")
def s3():
    """``(base options, key, secret)`` for a moto server that checks every request's signature."""
    boto3 = needs_moto()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    moto = os.path.join(os.path.dirname(sys.executable), "moto_server")
    server = subprocess.Popen([moto, "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        for _ in range(150):
            try:
                socket.create_connection(("127.0.0.1", port), 1).close()
                break
            except OSError:
                time.sleep(0.2)
        endpoint = f"http://127.0.0.1:{port}"
        setup = dict(endpoint_url=endpoint, aws_access_key_id="setup", aws_secret_access_key="setup",
                     region_name="us-east-1")  # fmt: skip
        boto3.client("s3", **setup).create_bucket(Bucket=BUCKET)
        iam = boto3.client("iam", **setup)
        iam.create_user(UserName="reader")
        policy = {
            "Version": "2012-10-17",
            "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}],
        }
        iam.put_user_policy(UserName="reader", PolicyName="s3", PolicyDocument=json.dumps(policy))
        key = iam.create_access_key(UserName="reader")["AccessKey"]
        no_proxy = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        no_proxy.open(
            urllib.request.Request(
                f"{endpoint}/moto-api/reset-auth",
                data=b"0",
                method="POST",
                headers={"Content-Type": "text/plain"},
            )
        )
        base = {"aws_region": "us-east-1", "aws_endpoint": endpoint, "allow_http": "true"}
        good = {
            **base,
            "aws_access_key_id": key["AccessKeyId"],
            "aws_secret_access_key": key["SecretAccessKey"],
        }
        lance.write_dataset(pa.table({"id": [1, 2, 3]}), f"s3://{BUCKET}/ok.lance", storage_options=good)
        yield good
    finally:
        server.kill()
        server.wait()


FAULTS = {  # name: (uri, change to the good options, what the message must say)
    "no bucket": ("s3://no-such-bucket-here/x.lance", {}, "bucket 'no-such-bucket-here' does not exist"),
    "unknown key": (f"s3://{BUCKET}/ok.lance", {"aws_access_key_id": "AKIAUNKNOWN0"}, "access key id"),
    "wrong secret": (f"s3://{BUCKET}/ok.lance", {"aws_secret_access_key": "wrong"}, "secret access key"),
    "s3a scheme": (f"s3a://{BUCKET}/ok.lance", {}, "s3a:// URIs .*use s3://"),
    "http without allow_http": (f"s3://{BUCKET}/ok.lance", {"allow_http": None}, "allow_http=true"),
}


@pytest.mark.slow
@pytest.mark.parametrize("fault", FAULTS)
def test_a_refused_read_names_uri_and_cause(s3, fault):
    uri, change, cause = FAULTS[fault]
    options = {k: v for k, v in {**s3, **change}.items() if v is not None}
    for open_it in (open_dataset, make_loader):
        with pytest.raises(DatasetNotFound) as info:
            open_it(uri, storage_options=options)
        message = str(info.value)
        assert message.startswith(f"cannot open Lance dataset at {uri!r}: ")
        assert re.search(cause, message), message
        assert "<Error>" not in message and "builder error" not in message and "\n" not in message


@pytest.mark.slow
def test_the_good_options_read(s3):
    assert len(open_dataset(f"s3://{BUCKET}/ok.lance", storage_options=s3)) == 3


def test_an_endpoint_that_does_not_answer_is_named():
    error = OSError(
        "LanceError(IO): Generic S3 error: Error performing list request: Error performing GET "
        "http://127.0.0.1:9/b?list-type=2 in 493ms, after 3 retries - HTTP error: error sending request"
    )
    assert store_error_reason("s3://b/x.lance", error) == (
        "cannot reach http://127.0.0.1:9 (is the endpoint right and the server up?)"
    )
    assert store_error_reason("data/x.lance", ValueError("Dataset at path x.lance was not found")) is None


@pytest.fixture()
def hung_endpoint():
    """A local socket that accepts connections and never replies: a hung server."""
    import threading

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    accepted: list[socket.socket] = []

    def accept() -> None:
        while True:
            try:
                accepted.append(server.accept()[0])
            except OSError:  # closed at the end of the test
                return

    threading.Thread(target=accept, daemon=True).start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}"
    server.close()
    for conn in accepted:
        conn.close()


def test_a_hung_endpoint_is_one_line_within_the_timeout_not_minutes(hung_endpoint, monkeypatch):
    # Lance alone retried this for minutes (400 s and counting with its defaults; docs/scale.md)
    from data_prep.check import ConversionError
    from data_prep.write import dataset_exists
    from lance_cookbook.recipe import store_errors

    monkeypatch.setattr(store_errors, "ENDPOINT_REPLY_TIMEOUT_S", 1.0)
    options = s3_storage_options(hung_endpoint, "key", "secret")
    start = time.perf_counter()
    with pytest.raises(DatasetNotFound) as raised:
        open_dataset("s3://bucket/x.lance", storage_options=options)
    assert time.perf_counter() - start < 10
    message = str(raised.value)
    assert message == (
        f"cannot open Lance dataset at 's3://bucket/x.lance': {hung_endpoint} sent no reply to an HTTP "
        "request within 1 s (is the server hung?)"
    )
    with pytest.raises(ConversionError, match=rf"^cannot open s3://bucket/y.lance: {hung_endpoint} sent no"):
        dataset_exists("s3://bucket/y.lance", options)


@pytest.mark.slow
def test_an_answering_or_refusing_endpoint_is_left_to_lance():
    needs_moto()
    with socket.socket() as s:  # bound, never listening: the connection is refused at once
        s.bind(("127.0.0.1", 0))
        refused = f"http://127.0.0.1:{s.getsockname()[1]}"
    assert silent_endpoint_reason({"aws_endpoint": refused}) is None  # Lance names it: "cannot reach ..."
    assert silent_endpoint_reason({}) is None and silent_endpoint_reason(None) is None  # AWS itself
    with local_s3() as options:  # a server that answers (an S3 error status is an answer)
        assert silent_endpoint_reason(options) is None


PROXY_VARIABLES = [
    f"{name}_{suffix}" for name in ("http", "https", "all", "no") for suffix in ("proxy", "PROXY")
]


@pytest.fixture(autouse=True)
def no_proxy_environment(monkeypatch):
    for name in PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def silent_endpoint():
    """``http://127.0.0.1:PORT`` that accepts connections and never answers: a firewall dropping the direct
    path looks like this to a client."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    yield f"http://127.0.0.1:{server.getsockname()[1]}"
    server.close()


@pytest.fixture
def proxy():
    """An HTTP proxy that answers every request itself (403, as S3 answers an unsigned HEAD) and keeps the
    request lines it got."""
    seen: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_HEAD(self):
            seen.append(f"{self.command} {self.path}")
            self.send_response(403)
            self.send_header("Content-Length", "0")
            self.end_headers()

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", seen
    server.shutdown()
    server.server_close()


def test_the_check_goes_through_proxy_url(silent_endpoint, proxy):
    url, seen = proxy
    options = {"aws_endpoint": silent_endpoint, "proxy_url": url}
    start = time.perf_counter()
    assert silent_endpoint_reason(options, timeout_s=5) is None
    assert time.perf_counter() - start < 4  # answered by the proxy, not timed out on the direct path
    assert seen == [f"HEAD {silent_endpoint}"]


def test_the_check_goes_through_the_environments_proxy(silent_endpoint, proxy, monkeypatch):
    url, seen = proxy
    monkeypatch.setenv("HTTP_PROXY", url)
    assert silent_endpoint_reason({"aws_endpoint": silent_endpoint}, timeout_s=5) is None
    assert seen == [f"HEAD {silent_endpoint}"]


def test_without_a_proxy_a_silent_endpoint_is_still_named(silent_endpoint, proxy):
    url, seen = proxy
    reason = silent_endpoint_reason({"aws_endpoint": silent_endpoint}, timeout_s=0.5)
    assert reason == f"{silent_endpoint} sent no reply to an HTTP request within 0.5 s (is the server hung?)"
    assert seen == []


def test_a_silent_proxy_is_named_without_its_credentials(silent_endpoint):
    with socket.socket() as hung:
        hung.bind(("127.0.0.1", 0))
        hung.listen(4)
        port = hung.getsockname()[1]
        options = {
            "aws_endpoint": "http://store.example:9000",
            "proxy_url": f"http://user:secret@127.0.0.1:{port}",
        }
        reason = silent_endpoint_reason(options, timeout_s=0.5)
    assert reason == (
        "http://store.example:9000 sent no reply to an HTTP request through the proxy "
        f"http://127.0.0.1:{port} within 0.5 s (is the server hung?)"
    )


@pytest.mark.parametrize(
    "options, environment, expected",
    [
        ({}, {}, None),
        ({"proxy_url": "http://p:3128"}, {}, "http://p:3128"),
        ({"proxy_url": "http://p:3128", "proxy_excludes": "store.local"}, {}, None),
        ({"proxy_url": "http://p:3128", "proxy_excludes": ".local"}, {}, None),  # a domain suffix
        ({"proxy_url": "http://p:3128"}, {"NO_PROXY": "store.local"}, "http://p:3128"),  # options win
        ({}, {"HTTP_PROXY": "http://e:8080"}, "http://e:8080"),
        ({}, {"HTTPS_PROXY": "http://e:8443"}, None),  # for https:// endpoints only
        ({}, {"ALL_PROXY": "http://a:1080"}, "http://a:1080"),
        ({}, {"http_proxy": "http://e:8080", "no_proxy": "*"}, None),
        ({}, {"HTTP_PROXY": "http://e:8080", "NO_PROXY": "other.host,store.local"}, None),
    ],
)
def test_endpoint_proxy_follows_lances_rules(monkeypatch, options, environment, expected):
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    assert endpoint_proxy("http://store.local:9000", options) == expected


@pytest.mark.parametrize(
    "proxy_options",
    [
        {"proxy_url": "https://p:3128"},
        {"proxy_url": "socks5://p:1080"},
        {"proxy_url": "http://p:3128", "proxy_ca_certificate": "-----BEGIN CERTIFICATE-----"},
    ],
)
def test_a_proxy_the_check_cannot_speak_skips_it(silent_endpoint, proxy_options):
    start = time.perf_counter()
    assert silent_endpoint_reason({"aws_endpoint": silent_endpoint, **proxy_options}, timeout_s=5) is None
    assert time.perf_counter() - start < 1  # nothing sent: left to Lance

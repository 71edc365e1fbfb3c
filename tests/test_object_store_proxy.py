"""The hung-endpoint check goes where Lance's requests go: through the proxy the storage options or the
environment name (t3-s3-proxy-endpoint-refused, AWSS3.jl#98)."""

from __future__ import annotations

import http.server
import socket
import threading
import time

import pytest

from lance_cookbook.recipe.store_errors import endpoint_proxy, silent_endpoint_reason

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

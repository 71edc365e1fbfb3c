"""Object-store faults in words: a refused read names the URI and the cause, never Lance's raw XML.

A moto S3 server runs as a child process on 127.0.0.1 with IAM authentication switched on, so unknown keys
and wrong secrets are refused as a real store refuses them (s3-convert-store-errors, lance#797).
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request

import lance
import pyarrow as pa
import pytest

from lance_cookbook import DatasetNotFound, make_loader, open_dataset
from lance_cookbook.object_store import s3_storage_options
from lance_cookbook.recipe.store_errors import silent_endpoint_reason, store_error_reason
from lance_cookbook.testing import local_s3

boto3 = pytest.importorskip("boto3", reason="needs the scale extra: pip install -e '.[scale]'")
pytest.importorskip("moto", reason="needs the scale extra: pip install -e '.[scale]'")

BUCKET = "store-faults"


@pytest.fixture(scope="module")
def s3():
    """``(base options, key, secret)`` for a moto server that checks every request's signature."""
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


def test_an_answering_or_refusing_endpoint_is_left_to_lance():
    with socket.socket() as s:  # bound, never listening: the connection is refused at once
        s.bind(("127.0.0.1", 0))
        refused = f"http://127.0.0.1:{s.getsockname()[1]}"
    assert silent_endpoint_reason({"aws_endpoint": refused}) is None  # Lance names it: "cannot reach ..."
    assert silent_endpoint_reason({}) is None and silent_endpoint_reason(None) is None  # AWS itself
    with local_s3() as options:  # a server that answers (an S3 error status is an answer)
        assert silent_endpoint_reason(options) is None

"""Requests and bytes counted at the S3 server (lance_cookbook.bench.s3_traffic): exact on known cases.

moto runs in this process (``local_s3``, with the counting middleware); nothing is downloaded. The image
folder and Lance run in the core environment; the peers' test needs the ``bench`` extra and is skipped
without it.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

pytest.importorskip("boto3", reason="needs the scale extra: pip install -e '.[scale]'")
pytest.importorskip("moto", reason="needs the scale extra: pip install -e '.[scale]'")

from lance_cookbook.bench.runner import folder_stats  # noqa: E402
from lance_cookbook.bench.s3_counter import Request, TrafficCounter, serial_round_trips, summarize  # noqa: E402
from lance_cookbook.bench.s3_formats import FORMATS, Context, Store, upload  # noqa: E402
from lance_cookbook.bench.s3_traffic import build_parser, images_per_s, main, measure  # noqa: E402
from lance_cookbook.object_store import local_s3  # noqa: E402

BUCKET = "traffic-test"
IMAGES = 1280  # 20 batches of 64


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> tuple[str, str]:
    """(image folder, Lance dataset in a shuffled row order) of ``IMAGES`` distinct 32x32 JPEGs."""
    from data_prep.convert import convert
    from lance_cookbook.bench.synthetic import generate_imagefolder

    root = tmp_path_factory.mktemp("traffic")
    folder = root / "img32"
    generate_imagefolder(folder, IMAGES, "32x32", classes=10, seed=0, workers=1)
    convert(f"imagefolder:{folder}", root / "shuffled.lance", shuffle=0, progress=False)
    return str(folder), str(root / "shuffled.lance")


@pytest.fixture
def served():
    """(counter, store) of a fresh moto server whose every request passes through the counter."""
    counter = TrafficCounter()
    with local_s3(BUCKET, wsgi_middleware=counter.wrap) as options:
        yield counter, Store(options=options, bucket=BUCKET)


def _context(tmp_path: Path, n: int, local: dict[str, str] | None = None) -> Context:
    return Context(images=n, image_size=32, batch_size=64, seed=0, work=str(tmp_path), local=local or {})


@pytest.mark.slow  # a moto server
def test_counter_sees_method_range_status_and_body_bytes(served):
    counter, store = served
    client = store.client()
    client.put_object(Bucket=BUCKET, Key="a/blob", Body=bytes(range(256)) * 40)  # 10,240 bytes
    counter.reset()
    assert client.get_object(Bucket=BUCKET, Key="a/blob")["Body"].read() == bytes(range(256)) * 40
    assert len(client.get_object(Bucket=BUCKET, Key="a/blob", Range="bytes=100-199")["Body"].read()) == 100
    client.head_object(Bucket=BUCKET, Key="a/blob")
    with pytest.raises(client.exceptions.NoSuchKey):
        client.get_object(Bucket=BUCKET, Key="a/missing")
    got = [(r.method, r.path, r.range, r.status, r.body_bytes) for r in counter.requests()]
    assert got[:3] == [
        ("GET", f"/{BUCKET}/a/blob", None, 200, 10240),
        ("GET", f"/{BUCKET}/a/blob", "bytes=100-199", 206, 100),
        ("HEAD", f"/{BUCKET}/a/blob", None, 200, 0),
    ]
    assert got[3][0] == "GET" and got[3][3] == 404 and len(got) == 4
    with pytest.raises(ValueError, match="failed"):  # a failed request is never silently counted
        summarize(counter.requests(), 1, lambda p: True)
    counter.reset()
    assert counter.requests() == [] and counter.max_in_flight == 0


@pytest.mark.slow  # a moto server
def test_delay_is_paid_per_request(served):
    counter, store = served
    client = store.client()
    client.put_object(Bucket=BUCKET, Key="x", Body=b"x")
    counter.delay_s = 0.3
    start = time.perf_counter()
    client.get_object(Bucket=BUCKET, Key="x")["Body"].read()
    assert time.perf_counter() - start >= 0.3


@pytest.mark.slow  # a moto server
def test_imagefolder_is_one_get_per_image_plus_the_listing(served, images, tmp_path):
    counter, store = served
    folder, _ = images
    stats = folder_stats(folder)
    total, n = stats["bytes"], stats["images"]
    assert n == IMAGES
    upload(store, folder, "imagefolder")
    result = measure(FORMATS["imagefolder"], store, _context(tmp_path, n), counter)
    assert result["data_requests"] == n  # exactly one GET per image, none ranged
    assert result["by_kind"]["GET data"] == {"requests": n, "bytes": total}  # every byte of every file
    assert result["data_ranged"] == 0
    assert result["fixed_requests"] == result["open_requests"] == 2  # 1,000 keys per listing page
    assert result["requests_per_image"] == 1.0 and result["bytes_per_image"] == total / n


@pytest.mark.slow  # a moto server
def test_lance_block_order_needs_fewer_requests_and_bytes_than_random(served, images, tmp_path):
    counter, store = served
    folder, lance_path = images
    upload(store, lance_path, "lance")
    ctx = _context(tmp_path, IMAGES)
    random = measure(FORMATS["lance_random"], store, ctx, counter)
    block = measure(FORMATS["lance_block"], store, ctx, counter)
    for r in (random, block):  # every image read, all through ranged GETs of data files
        assert r["images"] == IMAGES and r["data_ranged"] == r["data_requests"] > 0
    assert block["data_requests"] < random["data_requests"]
    assert block["data_bytes"] < random["data_bytes"]
    jpeg = folder_stats(folder)["bytes"]
    assert block["data_bytes"] >= jpeg  # the images themselves, at least
    # opening (listing versions, the manifest) is the same for both orders
    assert block["fixed_requests"] == random["fixed_requests"] > 0


def test_model_follows_its_formula():
    # 1 request of 10 ms + 90,000 bytes at 90 MB/s (1 ms) + 100 us = 11.1 ms per image
    assert images_per_s(1, 90_000, 100, 0.010, 90e6) == pytest.approx(1 / 0.0111)
    assert images_per_s(0, 0, 50, 0.050) == pytest.approx(20_000)
    with pytest.raises(ValueError):
        images_per_s(-1, 0, 0, 0.01)
    # downloads ahead of the CPU work: the slower of the two, not their sum
    assert images_per_s(0.5, 0, 100, 0.001, overlapped=True) == pytest.approx(2000)
    assert images_per_s(0.01, 0, 100, 0.001, overlapped=True) == pytest.approx(10_000)


def _spans(*spans: tuple[float, float]) -> list[Request]:
    return [Request("GET", "/b/k", "", None, 200, 0, a, b) for a, b in spans]


def test_serial_round_trips_counts_overlapping_requests_once():
    assert serial_round_trips([]) == 0
    assert serial_round_trips(_spans((0, 1), (1, 2), (2, 3))) == 3  # one after another
    assert serial_round_trips(_spans((0, 1), (0.1, 1.1), (0.2, 1.2))) == 1  # all in flight together
    # a take: 3 concurrent reads, then 2 that needed their answers, then the next take's single read
    take = _spans((0, 1), (0, 1.2), (0.1, 0.9), (1.3, 2), (1.3, 2.5), (3, 4))
    assert serial_round_trips(take) == 3
    assert serial_round_trips(list(reversed(take))) == 3  # the order of the log does not matter


@pytest.mark.slow  # a moto server
def test_cli_end_to_end_on_folder_and_lance(images, tmp_path, capsys):
    folder, lance_path = images
    assert "--delay-ms" in build_parser().format_help()
    out = tmp_path / "report.json"
    args = ["--imagefolder", folder, "--lance", lance_path, "--formats", "imagefolder,lance_block",
            "--work-dir", str(tmp_path), "--json", str(out)]  # fmt: skip
    assert main(args) == 0
    report = json.loads(out.read_text())
    assert report["images"] == IMAGES and set(report["formats"]) == {"imagefolder", "lance_block"}
    folder_row = report["formats"]["imagefolder"]
    # the model at 10 ms with one GET per image is below 100 images/s, whatever the CPU figure
    assert folder_row["seq_10ms"] < 100 and folder_row["seq_50ms"] < 20
    assert "| imagefolder | 1.0000 |" in capsys.readouterr().out
    # the model again at another latency, from the saved counts, without a server
    again = tmp_path / "again.json"
    assert main(["--from-json", str(out), "--latencies-ms", "20", "--json", str(again)]) == 0
    remodelled = json.loads(again.read_text())["formats"]["imagefolder"]
    assert remodelled["requests_per_image"] == 1.0 and "seq_10ms" not in remodelled
    assert remodelled["seq_20ms"] == pytest.approx(1 / (0.020 + folder_row["bytes_per_image"] / 90e6 + 46e-6))
    with pytest.raises(SystemExit):
        main(["--formats", "imagefolder"])  # neither the data nor a saved report


@pytest.mark.slow  # a moto server
def test_peers_fetch_each_shard_once(images, tmp_path):
    for module in ("webdataset", "streaming", "litdata"):
        pytest.importorskip(module, reason="needs the bench extra (.venv-bench)")
    folder, lance_path = images
    out = tmp_path / "peers.json"
    args = ["--imagefolder", folder, "--lance", lance_path, "--formats", "webdataset,streaming,litdata",
            "--work-dir", str(tmp_path), "--json", str(out)]  # fmt: skip
    assert main(args) == 0
    report = json.loads(out.read_text())
    suffix = {"webdataset": ".tar", "streaming": ".mds", "litdata": ".bin"}
    for key, row in report["formats"].items():
        shards = [n for _, _, names in os.walk(tmp_path / key) for n in names if n.endswith(suffix[key])]
        assert row["images"] == IMAGES
        # whole objects: one GET per shard or chunk, no ranges, at least the JPEG bytes
        assert row["by_kind"]["GET data"]["requests"] == len(shards) > 0
        assert row["data_ranged"] == 0
        assert row["bytes_per_image"] >= report["jpeg_bytes_per_image"]

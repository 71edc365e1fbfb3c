"""Loader (n) of the benchmark: Lance's own iterable ``LanceDataset`` with its fragment sampler and (g)'s
collate (``lance_cookbook/bench/iterable.py``)."""

from __future__ import annotations

import json
from collections import Counter

import lance
import pyarrow as pa
import pytest
import torch
from conftest import encode, photo
from lance.sampler import ShardedFragmentSampler
from lance.torch.data import LanceDataset
from test_bench import _quick_args
from torch.utils.data import DataLoader

from lance_cookbook import ImageCollate, bench
from lance_cookbook.bench.candidates import build_candidate
from lance_cookbook.bench.iterable import RecordBatchCollate
from lance_cookbook.recipe.start_method import LOADER_PRELOAD, lance_safe_context

ROWS = 150


@pytest.fixture(scope="module")
def blobs() -> list[bytes]:
    return [encode(photo(i, (12 + i % 5, 10)), "JPEG", quality=80) for i in range(ROWS)]


def _dataset(tmp_path, blobs: list[bytes], rows_per_file: int) -> str:
    """``ROWS`` rows whose label is the row's number, in fragments of ``rows_per_file`` rows."""
    uri = str(tmp_path / f"ids-{rows_per_file}.lance")
    table = pa.table({"image": pa.array(blobs, pa.binary()), "label": pa.array(range(ROWS), pa.int64())})
    lance.write_dataset(table, uri, max_rows_per_file=rows_per_file)
    return uri


@pytest.mark.slow  # a benchmark run
def test_bench_quick_iterable_beside_g(tmp_path, capsys):
    args = _quick_args(tmp_path, 2, "--loaders", "lance_tv_uint8,lance_iterable", "--cache", "both")
    assert bench.main(args) == 0
    out = capsys.readouterr().out
    report = json.loads((tmp_path / "bench.json").read_text())
    assert set(report["loaders"]) == {"lance_tv_uint8", "lance_iterable"}
    for key, res in report["loaders"].items():
        assert res["images_per_s"] > 0 and res["cold_images_per_s"] > 0, key
        assert len(res["worker_peak_rss_mib"]) == 2, key  # both workers found and measured
    res = report["loaders"]["lance_iterable"]
    assert res["worker_cpu_us"] > 0  # the workers decoded
    assert res["batch_label_entropy_vs_random"] is not None  # the labels reached the benchmark
    assert "1 fragment(s), 2 worker(s)" in res["note"]  # the conversion writes one fragment here
    assert "(n) Lance iterable LanceDataset" in out
    # shuffle quality: the iterable reads the same batches every epoch, (g) new ones (EpochPermutations)
    assert res["repeated_batches"] == 1.0
    assert report["loaders"]["lance_tv_uint8"]["repeated_batches"] == 0.0
    assert "same: fraction of an epoch's batches" in out


@pytest.mark.parametrize("rows_per_file", [ROWS, 50])  # 1 fragment (one worker idle), 3 (split 2 + 1)
def test_every_row_once_per_epoch_with_two_workers(tmp_path, blobs, rows_per_file):
    uri = _dataset(tmp_path, blobs, rows_per_file)
    fragments = -(-ROWS // rows_per_file)
    cand = build_candidate(
        "lance_iterable",
        folder=str(tmp_path),
        uri=uri,
        hf=None,
        size=8,
        batch_size=16,
        workers=2,
        order=[],
        blobs=[],
        bound_seconds=0.0,
    )
    try:
        assert cand.paths == [uri] and f"{fragments} fragment(s)" in cand.result.note
        for _ in range(2):  # the persistent workers start a second epoch afresh
            labels: list[int] = []
            for images, batch_labels in cand.loader:
                assert images.shape[1:] == (3, 8, 8) and images.dtype == torch.uint8
                assert 0 < len(batch_labels) <= 16
                labels += batch_labels.tolist()
            assert Counter(labels) == Counter(range(ROWS))
        assert len(cand.worker_pids()) == 2
    finally:
        cand.close()


def test_an_explicit_sampler_reads_every_row_once_per_worker(tmp_path, blobs):
    # why loader (n) passes no sampler: one given to LanceDataset is used as is in every worker, so the
    # documentation's ShardedFragmentSampler(rank, world_size) delivers each row once per worker (lance#2713)
    uri = _dataset(tmp_path, blobs, 50)
    collate = ImageCollate(8, decoder="torchvision", dtype=torch.uint8)
    dataset = LanceDataset(
        uri,
        16,
        columns=["image", "label"],
        sampler=ShardedFragmentSampler(rank=0, world_size=1),
        to_tensor_fn=RecordBatchCollate(collate),
    )
    loader = DataLoader(
        dataset, batch_size=None, num_workers=2, multiprocessing_context=lance_safe_context(LOADER_PRELOAD)
    )
    labels = [label for _, batch_labels in loader for label in batch_labels.tolist()]
    assert Counter(labels) == Counter({i: 2 for i in range(ROWS)})

"""Loaders (o)-(r) of the benchmark: LanceDB's StreamingDataset and Permutation with (g)'s collate
(``lance_cookbook/bench/lancedb_loaders.py``)."""

from __future__ import annotations

import json
from collections import Counter

import lance
import pyarrow as pa
import pytest
import torch
from conftest import encode, photo
from test_bench import _quick_args

from lance_cookbook import bench
from lance_cookbook.bench.candidates import build_candidate
from lance_cookbook.bench.lancedb_loaders import LANCEDB_LOADERS, open_table

pytest.importorskip("lancedb")

ROWS = 130  # even (StreamingDataset's 2 splits drop n % 2 rows), not a multiple of the batch


@pytest.fixture(scope="module")
def uri(tmp_path_factory) -> str:
    """``ROWS`` JPEGs whose label is the row's number, two fragments."""
    blobs = [encode(photo(i, (12 + i % 5, 10)), "JPEG", quality=80) for i in range(ROWS)]
    path = str(tmp_path_factory.mktemp("lancedb") / "ids.lance")
    table = pa.table({"image": pa.array(blobs, pa.binary()), "label": pa.array(range(ROWS), pa.int64())})
    lance.write_dataset(table, path, max_rows_per_file=100)
    return path


# StreamingDataLoader starts its workers again every epoch (each imports lancedb): seconds per pass
STARTS_WORKERS_EVERY_EPOCH = {"lancedb_stream_clump", "lancedb_stream_rows"}


@pytest.mark.parametrize(
    "key",
    [
        pytest.param(key, marks=pytest.mark.slow) if key in STARTS_WORKERS_EVERY_EPOCH else key
        for key in LANCEDB_LOADERS
    ],
)
def test_every_row_once_per_epoch_as_the_recipe_shapes_it(uri, key):
    cand = build_candidate(
        key,
        folder="",
        uri=uri,
        hf=None,
        size=8,
        batch_size=16,
        workers=2,
        order=list(range(ROWS)),
        blobs=[],
        bound_seconds=0.0,
    )
    try:
        assert cand.paths == [uri]
        epochs = []
        for _ in range(2):  # a second pass: a new StreamingDataset (epoch 1), or the persistent workers again
            labels: list[int] = []
            for images, batch_labels in cand.loader:
                # what (g)'s collate gives the recipe: uint8 [B, 3, S, S], int64 labels
                assert images.shape[1:] == (3, 8, 8) and images.dtype == torch.uint8
                assert batch_labels.dtype == torch.int64 and 0 < len(batch_labels) <= 16
                labels += batch_labels.tolist()
            assert Counter(labels) == Counter(range(ROWS)), key
            epochs.append(labels)
        assert epochs[0] != epochs[1], key  # a new order every epoch
    finally:
        cand.close()


def test_open_table_needs_a_lance_folder(tmp_path):
    with pytest.raises(ValueError, match=r"\.lance"):
        open_table(str(tmp_path / "images"))


@pytest.mark.slow  # a benchmark run: five loaders, three of them starting workers every epoch
def test_bench_quick_lancedb_beside_the_recipe(tmp_path, capsys):
    args = _quick_args(tmp_path, 2, "--loaders", "lance_tv_uint8_block,lancedb", "--cache", "both")
    assert bench.main(args) == 0
    out = capsys.readouterr().out
    report = json.loads((tmp_path / "bench.json").read_text())
    assert set(report["loaders"]) == {"lance_tv_uint8_block", *LANCEDB_LOADERS}
    for key, res in report["loaders"].items():
        assert res["images_per_s"] > 0 and res["cold_images_per_s"] > 0, key
        assert res["batch_label_entropy_vs_random"] is not None, key  # the labels reached the benchmark
        assert res["repeated_batches"] is not None, key
        assert res["main_cpu_us"] is not None, key
        if key != "lancedb_stream_threads":  # workers started every epoch are found and measured too
            assert len(res["worker_peak_rss_mib"]) == 2 and res["worker_cpu_us"] > 0, key
    for label in LANCEDB_LOADERS.values():
        assert label in out
    assert "lance_tv_uint8_block/lancedb_stream_clump" in report["ratios"]
    assert "cold lance_tv_uint8_block/lancedb_permutation" in report["ratios"]

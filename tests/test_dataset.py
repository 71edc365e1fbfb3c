"""open_dataset and LanceImageDataset: batched reads in order, list-like indices, pinned versions."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import default_collate

from lance_cookbook import DatasetNotFound, make_loader, open_dataset


def row_ids(rows: list[dict]) -> list[int]:
    """A collate that keeps only the ``id`` column: module level, so spawn workers can unpickle it."""
    return [r["id"] for r in rows]


@pytest.fixture
def twelve_rows(tmp_path):
    """12 rows (``id`` 0-11) in 3 fragments of at most 5, as in the ddp-index-bounds report."""
    import lance
    import pyarrow as pa

    uri = str(tmp_path / "twelve.lance")
    lance.write_dataset(pa.table({"id": list(range(12))}), uri, max_rows_per_file=5)
    return uri


def test_rows_come_back_in_the_order_asked_with_duplicates(id_dataset):
    ds = open_dataset(id_dataset, columns=["id"])
    rows = ds.__getitems__([7, 2, 7, 0])
    assert [row["id"] for row in rows] == [7, 2, 7, 0]
    assert rows.indices == [7, 2, 7, 0] and all(set(row) == {"id"} for row in rows)
    assert rows.describe(1).startswith("row 2 (source=") and rows.describe(1).endswith(".png')")
    assert rows == [{"id": 7}, {"id": 2}, {"id": 7}, {"id": 0}] and default_collate(rows)["id"].tolist() == [
        7,
        2,
        7,
        0,
    ]


def test_version_pins_rows(tmp_path):
    from data_prep.convert import convert

    uri = tmp_path / "v.lance"
    convert("digits", uri, max_rows=10, progress=False)
    convert("digits", uri, max_rows=4, overwrite=True, progress=False)
    assert len(open_dataset(uri)) == 4
    assert len(open_dataset(uri, version=1)) == 10
    with pytest.raises(DatasetNotFound, match="version 9"):
        open_dataset(uri, version=9)


def test_rows_pickle_as_a_plain_list(id_dataset):
    import pickle

    rows = open_dataset(id_dataset, columns=["id"]).__getitems__([3, 1])
    clone = pickle.loads(pickle.dumps(rows))
    assert type(clone) is list and clone == [{"id": 3}, {"id": 1}]


def test_indices_behave_like_a_list(twelve_rows):
    ds = open_dataset(twelve_rows, columns=["id"])
    assert len(ds) == 12
    assert ds[-1] == {"id": 11} and ds[-12] == {"id": 0}
    assert [r["id"] for r in list(ds)] == list(range(12))  # iteration stops at IndexError
    for bad in (12, -13, 10**6):
        with pytest.raises(IndexError, match=rf"index {bad} is out of range for 12 rows of .*twelve.lance"):
            ds[bad]
    assert ds[torch.tensor(3)] == {"id": 3}
    with pytest.raises(TypeError, match="integers, not float"):
        ds[1.0]


def test_a_sampler_index_past_the_end_names_index_and_length(twelve_rows):
    loader = make_loader(twelve_rows, batch_size=2, num_workers=0, sampler=[0, 989], collate_fn=row_ids)
    with pytest.raises(IndexError, match="index 989 is out of range for 12 rows"):
        list(loader)
    negative = make_loader(twelve_rows, batch_size=2, num_workers=0, sampler=[-1, 0], collate_fn=row_ids)
    assert list(negative) == [[11, 0]]


@pytest.mark.parametrize("change", ["delete", "overwrite"])
def test_workers_read_the_version_open_dataset_opened(tmp_path, change):
    import lance
    import pyarrow as pa

    uri = str(tmp_path / "d.lance")
    lance.write_dataset(pa.table({"id": list(range(40))}), uri, max_rows_per_file=16)
    ds = open_dataset(uri, columns=["id"])
    assert ds.version == 1
    if change == "delete":  # another writer commits after the training code opened the data
        lance.dataset(uri).delete("id < 10")
    else:
        lance.write_dataset(pa.table({"id": list(range(100, 130))}), uri, mode="overwrite")
    loader = make_loader(ds, batch_size=4, num_workers=1, collate_fn=row_ids, shuffle=True)
    assert sorted(i for batch in loader for i in batch) == list(range(40))
    by_uri = make_loader(uri, batch_size=8, num_workers=0, collate_fn=row_ids, columns=["id"])
    assert by_uri.dataset.version == 2 and len(by_uri.dataset) == 30

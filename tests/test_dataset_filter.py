"""open_dataset(uri, filter=..., version=...): the matching rows of one pinned version, by number or tag."""

from __future__ import annotations

import os
import pickle
from datetime import timedelta

import lance
import numpy as np
import pyarrow as pa
import pytest
from torch.utils.data import DistributedSampler

from lance_cookbook import (
    BlockShuffleSampler,
    ResumableDistributedSampler,
    ShardSampler,
    make_loader,
    open_dataset,
)
from lance_cookbook.recipe.dataset import DatasetNotFound, EmptyDataset, InvalidFilter, resolve_version

PREDICATES = [
    "label = 3",
    "label < 5 AND id > 400",
    "tier = 'gold'",
    "tier IS NULL",
    "id IN (1, 2, 500, 999)",
]


def ids(rows: list[dict]) -> list[int]:
    """A collate keeping only ``id``: module level, so forkserver workers can unpickle it."""
    return [r["id"] for r in rows]


def write_table(
    uri: str, n: int, *, fragment_rows: int = 100, image_bytes: int = 64, start: int = 0, mode="create"
):
    """``n`` rows: distinct random ``image`` bytes, ``label`` 0-9, ``id`` from ``start``, ``tier``.

    ``tier`` is NULL on every 7th id, else "gold" or "bronze"."""
    rng = np.random.default_rng(start)
    row_ids = np.arange(start, start + n)
    table = pa.table(
        {
            "image": [rng.bytes(image_bytes) for _ in range(n)],
            "label": pa.array(rng.integers(0, 10, n), pa.int64()),
            "id": pa.array(row_ids, pa.int64()),
            "tier": [None if i % 7 == 0 else ("gold" if i % 3 == 0 else "bronze") for i in row_ids],
        }
    )
    return lance.write_dataset(table, uri, mode=mode, max_rows_per_file=fragment_rows)


@pytest.fixture
def holey(tmp_path) -> str:
    """1,000 rows in 10 fragments, then the 91 rows with ``id % 11 = 0`` deleted: positions are not ids."""
    uri = str(tmp_path / "holey.lance")
    write_table(uri, 1000)
    lance.dataset(uri).delete("id % 11 = 0")
    return uri


@pytest.mark.parametrize("predicate", PREDICATES)
def test_filtered_rows_equal_lances_own_filter(holey, predicate):
    ds = open_dataset(holey, filter=predicate, columns=["id", "label", "tier"])
    expected = lance.dataset(holey).to_table(columns=["id", "label", "tier"], filter=predicate).to_pylist()
    assert len(ds) == len(expected) > 0 and (ds.filter, ds.version, ds.tag) == (predicate, 2, None)
    assert ds.__getitems__(list(range(len(ds)))) == expected
    assert ds[0] == expected[0] and ds[-1] == expected[-1]
    with pytest.raises(IndexError, match=rf"index {len(ds)} is out of range for {len(ds)} rows of .*holey"):
        ds[len(ds)]
    # Rows.indices are positions in the version, so describe() names the right row
    rows = ds.__getitems__([0])
    assert rows.describe(0) == f"row {ds.rows[0]} (id={expected[0]['id']})"


def test_no_filter_is_every_row(holey):
    ds = open_dataset(holey, columns=["id"])
    assert len(ds) == 909 and ds.rows is None and ds.filter is None and ds.version == 2
    assert [r["id"] for r in ds.__getitems__([0, 10, 11])] == [1, 12, 13]


def test_a_tagged_snapshot_keeps_its_rows_after_appends(tmp_path):
    uri = str(tmp_path / "t.lance")
    write_table(uri, 500)
    lance.dataset(uri).tags.create("trained-on", 1)
    before = open_dataset(uri, version="trained-on", filter="label < 5", columns=["id"])
    write_table(uri, 300, start=500, mode="append")
    lance.dataset(uri).delete("id < 50")
    again = open_dataset(uri, version="trained-on", filter="label < 5", columns=["id"])
    latest = open_dataset(uri, filter="label < 5", columns=["id"])
    assert (again.version, again.tag, before.version) == (1, "trained-on", 1)
    assert len(again) == len(before) == lance.dataset(uri, version=1).count_rows(filter="label < 5") == 248
    assert len(open_dataset(uri, version="trained-on")) == 500 and len(open_dataset(uri)) == 750
    assert latest.version == 3 and len(latest) == 382
    assert resolve_version(uri, "trained-on") == 1 and resolve_version(uri) == 3
    # a dataset opened by tag reads by number: moving the tag changes nothing for it
    lance.dataset(uri).tags.update("trained-on", 3)
    assert again.__getitems__(range(len(again))) == before.__getitems__(range(len(before)))


def test_two_forkserver_workers_read_exactly_the_matching_rows(holey):
    predicate = "label IN (2, 7) OR tier = 'gold'"
    ds = open_dataset(holey, filter=predicate, columns=["id"])
    expected = lance.dataset(holey).to_table(columns=["id"], filter=predicate)["id"].to_pylist()
    lance.dataset(holey).delete("id < 500")  # a writer commits before the workers start: they still read v2
    loader = make_loader(ds, batch_size=32, num_workers=2, shuffle=True, collate_fn=ids)
    assert loader.multiprocessing_context.get_start_method() == "forkserver"
    seen = [i for batch in loader for i in batch]
    assert sorted(seen) == expected and len(seen) == len(ds)
    assert len(pickle.dumps(ds)) < 2000 + 8 * len(ds)  # the positions travel with the dataset


def test_make_loader_passes_the_filter_and_a_tag(holey):
    lance.dataset(holey).tags.create("snap", 1)
    loader = make_loader(
        holey, filter="label = 3", version="snap", columns=["id"], num_workers=0, collate_fn=ids
    )
    expected = lance.dataset(holey, version=1).to_table(columns=["id"], filter="label = 3")["id"].to_pylist()
    assert loader.dataset.version == 1 and loader.dataset.tag == "snap"
    assert [i for batch in loader for i in batch] == expected
    with pytest.raises(ValueError, match="filter"):
        make_loader(loader.dataset, filter="label = 3")


def test_samplers_over_a_filtered_dataset_cover_exactly_the_matches(holey):
    ds = open_dataset(holey, filter="label < 4 AND tier IS NOT NULL", columns=["id"])
    n, expected = (
        len(ds),
        lance.dataset(holey).to_table(columns=["id"], filter="label < 4 AND tier IS NOT NULL"),
    )
    expected = expected["id"].to_pylist()
    shards = [list(ShardSampler(ds, 3, r)) for r in range(3)]
    assert sorted(sum(shards, [])) == list(range(n))
    for cls in (DistributedSampler, ResumableDistributedSampler):
        ranks = [list(cls(ds, num_replicas=2, rank=r, seed=1)) for r in range(2)]
        assert set(ranks[0]) | set(ranks[1]) == set(range(n)) and len(ranks[0]) == len(ranks[1]) == -(-n // 2)
    blocks = [BlockShuffleSampler(ds, 2, r, block_size=8) for r in range(2)]
    order = blocks[0].global_order()
    assert sorted(set(order)) == list(range(n))
    # consecutive matches in a block are increasing positions in the table
    assert all(ds.rows[a] < ds.rows[b] for a, b in zip(order[:7], order[1:8], strict=True) if b == a + 1)
    read = [make_loader(ds, batch_size=16, num_workers=0, sampler=s, collate_fn=ids) for s in blocks]
    assert sorted(set(i for loader in read for batch in loader for i in batch)) == sorted(expected)


def test_a_filtered_epoch_resumes_exactly_mid_epoch_on_another_world_size(holey):
    ds = open_dataset(holey, filter="tier = 'bronze'", columns=["id"])
    whole = ResumableDistributedSampler(ds, num_replicas=1, rank=0, seed=3)
    whole.set_epoch(2)
    uninterrupted = [
        i for b in make_loader(ds, batch_size=10, num_workers=0, sampler=whole, collate_fn=ids) for i in b
    ]
    first = [ResumableDistributedSampler(ds, num_replicas=2, rank=r, seed=3) for r in range(2)]
    for s in first:
        s.set_epoch(2)
    steps, batch = 4, 10
    done = [
        [
            i
            for b, _ in zip(
                make_loader(ds, batch_size=batch, num_workers=0, sampler=s, collate_fn=ids),
                range(steps),
                strict=False,
            )
            for i in b
        ]
        for s in first
    ]
    state = first[0].state_dict(first[0].consumed(steps, batch))
    rest = []
    for r in range(3):  # resumed on 3 ranks
        s = ResumableDistributedSampler(ds, num_replicas=3, rank=r, seed=3)
        s.load_state_dict(state)
        s.set_epoch(2)
        rest.append(
            [
                i
                for b in make_loader(ds, batch_size=batch, num_workers=0, sampler=s, collate_fn=ids)
                for i in b
            ]
        )
    # every match once, plus the padding to a multiple of 2 ranks that the epoch began with
    read = sum(done, []) + sum(rest, [])
    assert sorted(set(read)) == sorted(uninterrupted) and len(read) == first[0].total_size == len(ds) + 1
    assert len(uninterrupted) == len(ds) == lance.dataset(holey).count_rows(filter="tier = 'bronze'")
    with pytest.raises(ValueError, match="dataset_size"):  # another filter, another dataset: refused
        ResumableDistributedSampler(
            open_dataset(holey, filter="tier = 'gold'"), 1, 0, seed=3
        ).load_state_dict(state)


def test_the_filter_reads_no_image_bytes(tmp_path):
    """5,000 rows of 2,000 distinct random bytes (10 MB): finding the matches reads kilobytes."""
    uri = str(tmp_path / "big.lance")
    write_table(uri, 5000, fragment_rows=5000, image_bytes=2000)
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(uri) for f in fs)

    def rchar() -> int:
        with open("/proc/self/io") as f:
            return int(next(line for line in f if line.startswith("rchar")).split()[1])

    before = rchar()
    ds = open_dataset(uri, filter="label = 3")
    assert rchar() - before < size / 100 and len(ds) == lance.dataset(uri).count_rows(filter="label = 3")


@pytest.mark.parametrize(
    ("predicate", "reason"),
    [
        ("label ===", "Error parsing statement: SELECT 1 FROM t WHERE label === (sql parser error: "
         "Expected: an expression, found: =)"),
        ("nosuch = 1", "Schema error: No field named nosuch"),
        ("label = 'three'", "Error resolving filter expression label = 'three': Received literal "
         "Utf8(\"three\") and could not convert to literal of type 'Int64'"),
    ],
)  # fmt: skip
def test_an_invalid_predicate_is_one_line_naming_the_uri_and_the_columns(holey, predicate, reason):
    with pytest.raises(InvalidFilter) as e:
        open_dataset(holey, filter=predicate)
    assert str(e.value) == (
        f"filter {predicate!r} is not a valid Lance SQL predicate for {holey!r}: {reason} (its columns: "
        "image, label, id, tier; quote strings with '...')"
    )


def test_a_filter_matching_nothing(holey):
    lance.dataset(holey).tags.create("snap", 2)
    with pytest.raises(EmptyDataset) as e:
        open_dataset(holey, filter="label > 100", version="snap")
    assert str(e.value) == (
        f"filter 'label > 100' matches none of the 909 rows of version 2 (tag 'snap') of {holey!r}: check "
        "the predicate's values, or the version"
    )


def test_an_unknown_tag_lists_the_tags_and_an_unknown_version_lists_the_versions(holey):
    with pytest.raises(DatasetNotFound) as e:
        open_dataset(holey, version="nope")
    assert str(e.value) == (
        f"Lance dataset at {holey!r} has no tag 'nope' (its tags: none): pass one of them or a version number"
    )
    lance.dataset(holey).tags.create("good", 1)
    lance.dataset(holey).tags.create("best", 2)
    with pytest.raises(DatasetNotFound, match=r"\(its tags: best \(version 2\), good \(version 1\)\): pass"):
        open_dataset(holey, version="nope")
    write_table(holey, 10, start=2000, mode="append")
    write_table(holey, 10, start=3000, mode="append")
    lance.dataset(holey).cleanup_old_versions(older_than=timedelta(0), error_if_tagged_old_versions=False)
    lance.dataset(holey).tags.delete("good")
    lance.dataset(holey).cleanup_old_versions(older_than=timedelta(0), error_if_tagged_old_versions=False)
    with pytest.raises(DatasetNotFound) as e:
        open_dataset(holey, version=1)
    assert str(e.value) == (
        f"Lance dataset at {holey!r} has no version 1 (versions that exist: 2, 4; cleanup_old_versions "
        "removes untagged ones): pass one of them"
    )
    with pytest.raises(DatasetNotFound, match=r"^cannot open Lance dataset at '/no/such\.lance': "):
        open_dataset("/no/such.lance", filter="label = 1")


def test_a_version_removed_while_a_run_reads_it(tmp_path):
    uri = str(tmp_path / "d.lance")
    write_table(uri, 200, fragment_rows=50)
    lance.dataset(uri).tags.create("run1", 1)
    ds = open_dataset(uri, version="run1", filter="label < 5", columns=["id"])
    not_started = pickle.loads(pickle.dumps(ds))  # as a worker that has not read yet
    write_table(uri, 100, start=1000, mode="overwrite")  # version 2 shares no file with version 1
    lance.dataset(uri).tags.delete("run1")
    assert len(ds.__getitems__([0, 1])) == 2  # deleting the tag alone changes nothing: reads are by number
    assert lance.dataset(uri).cleanup_old_versions(older_than=timedelta(0)).old_versions == 1
    message = (
        f"version 1 (tag 'run1') of Lance dataset at {uri!r} is gone (cleanup_old_versions removed it, or "
        "its files, while this run read it): keep a tag on every version a run reads, and delete the tag "
        "only after the run"
    )
    for reader in (ds, not_started):
        with pytest.raises(DatasetNotFound) as e:
            reader.__getitems__([2, 3])
        assert str(e.value) == message


def test_rows_need_a_pinned_version_number(holey):
    from lance_cookbook import LanceImageDataset

    with pytest.raises(ValueError, match=r"rows are positions in one version: pin it"):
        LanceImageDataset(holey, rows=[1, 2], dataset_options={})
    ds = LanceImageDataset(holey, columns=["id"], rows=[5, 0], dataset_options={"version": 2})
    assert len(ds) == 2 and ds[0] == {"id": 6} and ds[1] == {"id": 1}

"""Datasets written by ``data_prep.convert`` open in LanceDB's own loaders (issue 24).

LanceDB 0.40.0's permutation builder, which a shuffled ``Permutation`` and ``StreamingDataset`` use, panics
on a table whose Arrow schema has schema-level metadata (docs/lance_loaders.md): the conversion now keeps its
metadata on fields, ``lance_cookbook.label_names`` still reads the old layout, ``data_prep.migrate`` moves it.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap

import lance
import pytest
import torch
from torch.utils.data import DataLoader

from data_prep.convert import convert
from data_prep.migrate import main as migrate_main
from data_prep.migrate import migrate
from data_prep.write import LABEL_NAMES_KEY, METADATA_KEY, RECORD_FIELD, conversion_record
from lance_cookbook import ImageCollate, label_names, open_dataset
from lance_cookbook.recipe.start_method import LOADER_PRELOAD, lance_safe_context
from lance_cookbook.training.setup import checked_label_names

lancedb = pytest.importorskip("lancedb")
from lancedb.permutation import Permutation, permutation_builder  # noqa: E402
from lancedb.streaming import StreamingDataLoader, StreamingDataset  # noqa: E402

COLUMNS = ["image", "label", "id"]
NAMES = [str(d) for d in range(10)]


class IdImageCollate:
    """``ImageCollate`` plus the rows' ids, so a test sees which rows a loader decoded (module level: the
    loaders' forkserver workers unpickle it)."""

    def __init__(self):
        self.decode = ImageCollate(8, decoder="torchvision", dtype=torch.uint8)

    def __call__(self, rows):
        images, labels = self.decode(rows)
        return images, labels, torch.tensor([r["id"] for r in rows])


def decoded(loader) -> dict[int, int]:
    """Every (id, label) a loader yields, refusing a row seen twice."""
    seen: dict[int, int] = {}
    for images, labels, ids in loader:
        assert images.shape[1:] == (3, 8, 8) and images.dtype == torch.uint8
        for i, label in zip(ids.tolist(), labels.tolist(), strict=True):
            assert i not in seen, f"row {i} read twice"
            seen[i] = label
    return seen


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """101 digits (odd: StreamingDataset's 2 splits drop one) converted as the cookbook does; (dir, name)."""
    root = tmp_path_factory.mktemp("interop")
    convert("digits", root / "d.lance", split="train", max_rows=101, progress=False)
    return root, "d"


@pytest.fixture(scope="module")
def labels_by_id(converted) -> dict[int, int]:
    root, name = converted
    table = lance.dataset(str(root / f"{name}.lance")).to_table(columns=["id", "label"]).to_pylist()
    return {r["id"]: r["label"] for r in table}


def old_layout(converted, tmp_path) -> str:
    """A copy of the converted dataset with its metadata where conversions before 2026-12 wrote it: on the
    schema, none on the fields."""
    root, name = converted
    uri = str(tmp_path / "old.lance")
    shutil.copytree(root / f"{name}.lance", uri)
    ds = lance.dataset(uri)
    op = lance.LanceOperation
    field_of = {"label": LABEL_NAMES_KEY, RECORD_FIELD: METADATA_KEY}
    stored = {key.decode(): ds.schema.field(f).metadata[key].decode() for f, key in field_of.items()}
    lance.LanceDataset.commit(
        uri,
        op.UpdateConfig(
            schema_metadata_updates=op.UpdateMap(stored, replace=True),
            field_metadata_updates={
                ds.lance_schema.field(f).id(): op.UpdateMap({key.decode(): None}, replace=False)
                for f, key in field_of.items()
            },
        ),
        read_version=ds.version,
    )
    assert lance.dataset(uri).schema.field("label").metadata is None
    return uri


def test_converted_metadata_lives_on_fields_that_lancedb_reads(converted):
    root, name = converted
    ds = lance.dataset(str(root / f"{name}.lance"))
    assert ds.schema.metadata is None  # LanceDB's permutation builder panics on any schema-level key
    assert label_names(ds.uri) == NAMES
    assert conversion_record(ds)["skipped"] == [] and "digits" in conversion_record(ds)["source"]
    table = lancedb.connect(str(root)).open_table(name)
    assert json.loads(table.schema.field("label").metadata[b"label_names"]) == NAMES


@pytest.mark.slow  # two forkserver workers with torch preloaded
def test_streaming_dataset_and_loader_read_every_row_once_but_the_surplus(converted, labels_by_id):
    root, name = converted
    table = lancedb.connect(str(root)).open_table(name)
    n, splits = table.count_rows(), 2
    stream = StreamingDataset(table, num_splits=splits, shuffle_seed=0, epoch=0, columns=COLUMNS)
    loader = StreamingDataLoader(
        stream,
        batch_size=16,
        num_workers=2,
        collate_fn=IdImageCollate(),
        multiprocessing_context=lance_safe_context(LOADER_PRELOAD),  # never fork: Lance is not fork-safe
    )
    seen = decoded(loader)
    # StreamingDataset gives every split the same count and drops the n % num_splits rows left over
    assert len(seen) == n - n % splits == 100
    assert all(labels_by_id[i] == label for i, label in seen.items())


@pytest.mark.slow  # two forkserver workers with torch preloaded
def test_shuffled_permutation_with_a_dataloader_reads_every_row_once(converted, labels_by_id):
    root, name = converted
    table = lancedb.connect(str(root)).open_table(name)
    order = permutation_builder(table).shuffle(seed=0).execute()
    perm = Permutation.from_tables(table, order).select_columns(COLUMNS)
    loader = DataLoader(
        perm,
        batch_size=16,
        num_workers=2,
        collate_fn=IdImageCollate(),
        multiprocessing_context=lance_safe_context(LOADER_PRELOAD),
    )
    seen = decoded(loader)
    assert seen == labels_by_id  # all 101 rows, each once, with its own label
    assert list(seen) != sorted(seen)  # and shuffled


def test_the_old_layout_still_reads(converted, tmp_path):
    uri = old_layout(converted, tmp_path)
    ds = lance.dataset(uri)
    assert set(ds.schema.metadata) == {LABEL_NAMES_KEY, METADATA_KEY}
    assert label_names(uri) == NAMES
    assert conversion_record(ds)["skipped"] == []
    assert checked_label_names(open_dataset(uri)) == NAMES  # what lance_cookbook.train sizes its model with


def test_lancedb_still_panics_on_schema_metadata(tmp_path):
    """The smallest reproduction quoted in docs/lance_loaders.md, in a child process (a Rust panic may abort
    it). When this fails, LanceDB fixed its bug: say so in the docs."""
    code = textwrap.dedent(
        """
        import sys, pyarrow as pa, lance, lancedb
        from lancedb.permutation import permutation_builder
        t = pa.table({"x": range(100)}).replace_schema_metadata({"k": "v"})
        lance.write_dataset(t, sys.argv[1] + "/t.lance")
        permutation_builder(lancedb.connect(sys.argv[1]).open_table("t")).execute()
        """
    )
    run = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=120
    )
    assert run.returncode != 0
    assert "target schema is not superset of current schema" in run.stderr


def test_migrate_moves_the_old_layout_in_one_metadata_commit(converted, tmp_path, capsys):
    uri = old_layout(converted, tmp_path)
    before = lance.dataset(uri)
    version = migrate(uri)
    after = lance.dataset(uri)
    assert version == after.version == before.version + 1
    assert after.schema.metadata is None
    assert label_names(uri) == NAMES and conversion_record(after) == conversion_record(before)
    assert after.to_table().equals(before.to_table())  # same rows, same positions
    assert {f.path for fr in after.get_fragments() for f in fr.data_files()} == {
        f.path for fr in before.get_fragments() for f in fr.data_files()
    }  # no data file rewritten
    assert label_names(uri, version=before.version) == NAMES  # a run pinned to the old version still reads
    # and LanceDB's shuffled Permutation opens it now
    table = lancedb.connect(str(tmp_path)).open_table("old")
    perm = Permutation.from_tables(table, permutation_builder(table).shuffle(seed=1).execute())
    assert sorted(r["id"] for r in perm.select_columns(["id"]).__getitems__(list(range(101)))) == list(
        range(101)
    )
    assert migrate(uri) is None and lance.dataset(uri).version == after.version  # again: nothing to do
    assert migrate_main([uri]) == 0 and "nothing to move" in capsys.readouterr().out


def test_migrate_names_a_missing_dataset_in_one_line(tmp_path, capsys):
    assert migrate_main([str(tmp_path / "nowhere.lance")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: cannot open Lance dataset at") and "\n" not in err


# --- the capabilities docs/lance_loaders.md lists for LanceDB's loaders, on the same 101 rows ---------------


def streamed_ids(table, **kw) -> list[int]:
    """The ids one pass of a ``StreamingDataset`` yields, read in this process (no workers)."""
    return [row["id"] for row in StreamingDataset(table, shuffle_seed=0, columns=["id", "label"], **kw)]


def test_streaming_dataset_new_order_per_epoch_sharding_and_filter(converted, labels_by_id):
    root, name = converted
    table = lancedb.connect(str(root)).open_table(name)
    first, again, second = (streamed_ids(table, num_splits=2, epoch=e) for e in (0, 0, 1))
    assert first == again and sorted(first) != first  # seeded: the same (seed, epoch), the same order
    assert first != second  # a new order needs a new object with epoch=E
    ranks = [streamed_ids(table, num_splits=4, epoch=0, rank=r, world_size=2) for r in (0, 1)]
    assert not set(ranks[0]) & set(ranks[1]) and len(ranks[0]) == len(ranks[1]) == 50  # 101 % 4 dropped
    threes = streamed_ids(table, num_splits=1, filter="label = 3")
    assert sorted(threes) == sorted(i for i, label in labels_by_id.items() if label == 3)


def test_streaming_dataloader_refuses_persistent_workers(converted):
    root, name = converted
    stream = StreamingDataset(lancedb.connect(str(root)).open_table(name), num_splits=2, columns=COLUMNS)
    with pytest.raises(ValueError, match="persistent_workers"):
        StreamingDataLoader(stream, batch_size=16, num_workers=2, persistent_workers=True)


def test_shuffled_permutation_is_pinned_and_identity_is_not(converted, tmp_path):
    root, name = converted
    shutil.copytree(root / f"{name}.lance", tmp_path / "w.lance")
    table = lancedb.connect(str(tmp_path)).open_table("w")
    shuffled = Permutation.from_tables(table, permutation_builder(table).shuffle(seed=0).execute())
    identity = Permutation.identity(table)
    lance.dataset(str(tmp_path / "w.lance")).delete("id < 10")  # a writer commits after both were built

    def ids(perm):
        return sorted(r["id"] for r in perm.select_columns(["id"]).__getitems__(list(range(len(perm)))))

    assert ids(shuffled) == list(range(101))  # reads the version it was built on
    assert ids(identity) == list(range(10, 101))  # reads the latest

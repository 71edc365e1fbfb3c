"""make_loader + ImageCollate over Lance: spawn workers, every row exactly once, clear errors."""

from __future__ import annotations

import multiprocessing
import time

import pytest
import torch
from conftest import encode, photo
from PIL import Image
from torch.utils.data import default_collate

from lance_cookbook import (
    DatasetNotFound,
    ImageCollate,
    ShardSampler,
    label_names,
    make_loader,
    open_dataset,
    to_device,
)


def decoded_ids(images: torch.Tensor) -> list[int]:
    """Recover the row number each ``id_image`` encodes from a uint8 batch."""
    return (images[:, 0, 0, 0].long() + 256 * images[:, 1, 0, 0].long()).tolist()


@pytest.mark.parametrize("context", [None, "spawn"])
def test_two_workers_yield_every_row_once_per_epoch(id_dataset, context):
    loader = make_loader(
        id_dataset,
        batch_size=8,
        num_workers=2,
        shuffle=True,
        collate_fn=ImageCollate(size=8, decoder="torchvision", dtype=torch.uint8),
        multiprocessing_context=context,
    )
    default = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
    assert loader.multiprocessing_context.get_start_method() == (context or default)
    assert loader.persistent_workers
    orders = []
    for _ in range(2):
        seen = [i for images, _labels in loader for i in decoded_ids(images)]
        assert sorted(seen) == list(range(53))
        orders.append(seen)
    assert orders[0] != orders[1]  # shuffled anew each epoch


def test_pil_recipe_and_labels_match_dataset(id_dataset):
    loader = make_loader(id_dataset, batch_size=16, num_workers=0, collate_fn=ImageCollate(size=8))
    labels = torch.cat([labels for _images, labels in loader]).tolist()
    assert labels == [int(open_dataset(id_dataset)[i]["label"]) for i in range(53)]
    assert label_names(id_dataset) == ["c0", "c1", "c2"]


def test_default_collate_is_the_fast_uint8_path(id_dataset):
    images, labels = next(iter(make_loader(id_dataset, batch_size=4, num_workers=0)))
    assert images.dtype == torch.uint8 and images.shape == (4, 3, 224, 224)
    x, y = to_device((images, labels), "cpu", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    assert x.dtype == torch.float32 and -1.0 <= x.min() and x.max() <= 1.0


def test_workers_hand_over_the_same_channels_last_batches(id_dataset):
    """Through 2 spawn workers (small batches by value, the 4.8 MB one through shared memory) the batches
    equal the in-process ones, strides included."""
    for size in (8, 160):
        collate = ImageCollate(size=size, decoder="torchvision", dtype=torch.uint8)
        batches = [
            list(make_loader(id_dataset, batch_size=32, num_workers=w, collate_fn=collate)) for w in (0, 2)
        ]
        for (a, y), (b, z) in zip(*batches, strict=True):
            assert a.is_contiguous(memory_format=torch.channels_last) and a.stride() == b.stride()
            assert torch.equal(a, b) and torch.equal(y, z)


def test_loader_reads_only_what_the_collate_needs(id_dataset):
    assert make_loader(id_dataset, num_workers=0).dataset.columns == ["image", "label"]
    everything = make_loader(id_dataset, num_workers=0, collate_fn=list).dataset  # not an ImageCollate
    assert everything.columns is None and {"source", "id"} <= set(everything[0])
    assert make_loader(id_dataset, num_workers=0, columns=["label"]).dataset[3]["label"] == 0
    with pytest.raises(KeyError, match="ids.lance.*no column 'pixels'"):
        make_loader(id_dataset, columns=["pixels"])


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


def test_to_device_does_not_modify_float_input():
    images = torch.full((1, 3, 2, 2), 0.5)
    out, _ = to_device((images, torch.zeros(1, dtype=torch.int64)), "cpu", (0.5,) * 3, (0.25,) * 3)
    assert torch.equal(images, torch.full((1, 3, 2, 2), 0.5)) and out.abs().max() == 0


def test_shard_sampler_partitions_for_any_world_size():
    for n in (0, 1, 7, 53, 100):
        for world in (1, 2, 3, 4, 8):
            shards = [list(ShardSampler(n, num_replicas=world, rank=r)) for r in range(world)]
            assert sorted(i for s in shards for i in s) == list(range(n))
            assert max(map(len, shards)) - min(map(len, shards)) <= 1


def test_version_pins_rows(tmp_path):
    from data_prep.convert import convert

    uri = tmp_path / "v.lance"
    convert("digits", uri, max_rows=10, progress=False)
    convert("digits", uri, max_rows=4, overwrite=True, progress=False)
    assert len(open_dataset(uri)) == 4
    assert len(open_dataset(uri, version=1)) == 10
    with pytest.raises(DatasetNotFound, match="version 9"):
        open_dataset(uri, version=9)


@pytest.mark.parametrize("bad", ["missing.lance", "not-a-dataset", "a-file.txt"])
def test_bad_uri_fails_in_main_process_naming_it(tmp_path, bad):
    (tmp_path / "not-a-dataset").mkdir()
    (tmp_path / "a-file.txt").write_text("hello")
    uri = str(tmp_path / bad)
    with pytest.raises(DatasetNotFound, match=bad):
        make_loader(uri, num_workers=2)
    assert not multiprocessing.active_children()  # raised before any worker started


def test_fork_is_refused_with_the_reason(id_dataset):
    for ctx in ("fork", multiprocessing.get_context("fork")):
        with pytest.raises(ValueError, match="fork.*not safe with Lance.*spawn"):
            make_loader(id_dataset, num_workers=1, multiprocessing_context=ctx)
    forkserver = make_loader(id_dataset, num_workers=1, multiprocessing_context="forkserver")
    assert forkserver.multiprocessing_context.get_start_method() == "forkserver"


def test_worker_failure_reaches_main_with_original_traceback(tmp_path):
    import lance
    import pyarrow as pa

    uri = tmp_path / "bad.lance"
    good = encode(photo(0), "JPEG")
    table = pa.table(
        {"image": [good, b"garbage", good], "label": [0, 1, 2], "source": ["a.jpg", "broken.jpg", "c.jpg"]}
    )
    lance.write_dataset(table, str(uri))
    loader = make_loader(uri, batch_size=3, num_workers=1, collate_fn=ImageCollate(size=8))
    match = r"(?s)DataLoader worker process 0.*Original Traceback.*row 1 \(source='broken.jpg'\)"
    with pytest.raises(Exception, match=match):  # only image and label are read; the name is looked up
        next(iter(loader))


def test_timeout_bounds_a_stuck_read(id_dataset):
    loader = make_loader(id_dataset, batch_size=4, num_workers=1, collate_fn=SlowCollate(), timeout=1)
    with pytest.raises(RuntimeError, match="timed out after 1 seconds"):
        next(iter(loader))


class SlowCollate:
    """A collate that hangs (stands in for a stuck object-store read)."""

    def __call__(self, rows):
        time.sleep(30)


def test_rows_pickle_as_a_plain_list(id_dataset):
    import pickle

    rows = open_dataset(id_dataset, columns=["id"]).__getitems__([3, 1])
    clone = pickle.loads(pickle.dumps(rows))
    assert type(clone) is list and clone == [{"id": 3}, {"id": 1}]


def test_columns_follow_the_collate_and_a_string_is_refused(id_dataset):
    class ReadsSource(ImageCollate):
        columns = ("image", "label", "source")

    assert make_loader(id_dataset, num_workers=0, collate_fn=ReadsSource(8)).dataset.columns == [
        "image",
        "label",
        "source",
    ]
    with pytest.raises(TypeError, match="a list of column names, not 'image'"):
        make_loader(id_dataset, num_workers=0, columns="image")


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


def test_a_second_pass_while_one_runs_sees_every_row(id_dataset):
    loader = make_loader(id_dataset, batch_size=8, num_workers=1, collate_fn=row_ids, columns=["id"])
    assert loader.persistent_workers
    outer, inner = [], []
    for step, batch in enumerate(loader):
        outer += batch
        if step == 1:  # e.g. measuring accuracy over the same loader mid-epoch
            inner = [i for b in loader for i in b]
    assert sorted(outer) == sorted(inner) == list(range(53))
    pairs = list(zip(loader, loader, strict=True))
    assert sorted(i for a, _ in pairs for i in a) == sorted(i for _, b in pairs for i in b) == list(range(53))
    for step, _ in enumerate(loader):  # a pass left early frees the persistent workers for the next
        if step == 0:
            break
    assert sorted(i for b in loader for i in b) == list(range(53))


def test_batch_size_none_gives_one_decoded_row_per_item(id_dataset):
    loader = make_loader(
        id_dataset, batch_size=None, num_workers=0, collate_fn=ImageCollate(8, dtype=torch.uint8)
    )
    items = list(loader)
    assert len(items) == 53
    image, label = items[7]
    assert image.shape == (3, 8, 8) and image.dtype == torch.uint8
    assert label.shape == () and label.dtype == torch.int64
    assert (
        decoded_ids(image[None]) == [21] and int(label) == 0
    )  # rows follow class folders: c0 holds 0, 3, 6 ...


def test_evaluation_keeps_proportions_with_both_decoders():
    """train=False: shorter side resized, centre crop (torchvision's reference recipe), so a wide photo's
    middle fills the output instead of the whole photo being squashed."""
    wide = Image.new("RGB", (64, 16), (255, 0, 0))
    wide.paste((0, 0, 255), (24, 0, 40, 16))  # a blue band in the middle third of a red photo
    blob = encode(wide, "PNG")
    for decoder in ("pil", "torchvision"):
        collate = ImageCollate(14, decoder=decoder, dtype=torch.uint8, crop_fraction=0.875)
        assert collate.resize_size == 16
        image = collate([{"image": blob, "label": 0}]).image[0]
        # the 14 px crop of a 64x16 photo resized to 64x16 is columns 25-38: all blue
        assert image.shape == (3, 14, 14) and (image[2] > 200).all() and (image[0] < 55).all(), decoder


def test_the_fork_server_preloads_torch_and_never_lance():
    """Workers fork from a server that imported torch once (fast start); Lance must be imported only after
    the fork (lance#3727), and a script's __main__ may import it, so neither is preloaded."""
    import multiprocessing.forkserver

    from lance_cookbook.recipe.start_method import lance_safe_context

    if "forkserver" not in multiprocessing.get_all_start_methods():
        pytest.skip("this platform has no forkserver: spawn is used")
    multiprocessing.set_forkserver_preload(["__main__", "lance", "json"])
    lance_safe_context(["torch", "numpy"])
    preload = multiprocessing.forkserver._forkserver._preload_modules
    assert preload == ["json", "torch", "numpy"]

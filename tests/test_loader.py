"""make_loader + ImageCollate over Lance: spawn workers, every row exactly once, clear errors."""

from __future__ import annotations

import multiprocessing
import time

import pytest
import torch
from conftest import encode, photo

from lance_cookbook import DatasetNotFound, ImageCollate, label_names, make_loader, open_dataset, to_device


def decoded_ids(images: torch.Tensor) -> list[int]:
    """Recover the row number each ``id_image`` encodes from a uint8 batch."""
    return (images[:, 0, 0, 0].long() + 256 * images[:, 1, 0, 0].long()).tolist()


@pytest.mark.slow  # spawn workers, > 5 s
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


@pytest.mark.slow  # spawn workers, > 5 s
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


@pytest.mark.parametrize("bad", ["missing.lance", "not-a-dataset", "a-file.txt"])
def test_bad_uri_fails_in_main_process_naming_it(tmp_path, bad):
    (tmp_path / "not-a-dataset").mkdir()
    (tmp_path / "a-file.txt").write_text("hello")
    uri = str(tmp_path / bad)
    with pytest.raises(DatasetNotFound, match=bad):
        make_loader(uri, num_workers=2)
    assert not multiprocessing.active_children()  # raised before any worker started


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


@pytest.mark.slow  # spawn workers, > 5 s
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

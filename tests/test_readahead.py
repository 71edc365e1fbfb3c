"""Read-ahead (lance_cookbook/recipe/readahead.py): the same batches in the same order, every row once,
at most ``depth`` batches held per worker, errors on their own batch, threads only in the workers."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import psutil
import pytest
import torch
from torch.utils.data import BatchSampler, DistributedSampler, SequentialSampler

from lance_cookbook import (
    BlockShuffleSampler,
    ImageCollate,
    ResumableDistributedSampler,
    ShardSampler,
    make_loader,
    open_dataset,
)
from lance_cookbook.recipe.loader import _read_ahead, is_remote
from lance_cookbook.recipe.readahead import REMOTE_READ_AHEAD, HintedBatch, ReadAhead, ReadAheadBatchSampler


def decoded_ids(images: torch.Tensor) -> list[int]:
    """Recover the row number each ``id_image`` encodes from a uint8 batch."""
    return (images[:, 0, 0, 0].long() + 256 * images[:, 1, 0, 0].long()).tolist()


class ThreadNamesCollate:
    """``ImageCollate`` plus the names of the threads alive in the process that collates (a worker)."""

    columns = ("image", "label")

    def __init__(self):
        self.decode = ImageCollate(size=8, decoder="torchvision", dtype=torch.uint8)

    def __call__(self, rows):
        images, _ = self.decode(rows)
        return images, sorted(t.name for t in threading.enumerate())


def batches(loader) -> list[list[int]]:
    return [decoded_ids(images) for images, _ in loader]


def loader_over(uri: str, sampler, read_ahead: int, batch_size: int = 4):
    collate = ImageCollate(size=8, decoder="torchvision", dtype=torch.uint8)
    kwargs = dict(batch_size=batch_size, num_workers=2, collate_fn=collate, read_ahead=read_ahead)
    return make_loader(uri, sampler=sampler, **kwargs)


def test_each_batch_announces_its_workers_next_batches():
    sampler = ReadAheadBatchSampler(BatchSampler(SequentialSampler(range(20)), 2, False), 3, 2)
    hinted = list(sampler)
    assert len(sampler) == 10 and [list(b) for b in hinted] == [[2 * k, 2 * k + 1] for k in range(10)]
    token = hinted[0].key[0]
    assert [b.key for b in hinted] == [(token, k) for k in range(10)]
    # batch k goes to worker k % 2: it announces k + 2, k + 4, k + 6 (fewer at the end)
    assert [key[1] for key, _ in hinted[0].ahead] == [2, 4, 6]
    assert [indices for _, indices in hinted[0].ahead] == [[4, 5], [8, 9], [12, 13]]
    assert [key[1] for key, _ in hinted[7].ahead] == [9]
    assert list(sampler)[0].key[0] != token  # every pass is a new one
    assert HintedBatch([1], ("t", 0), [], 3).__reduce__()[1] == ([1], ("t", 0), [], 3)


class CountingRead:
    """A ``read`` for ``ReadAhead``: each batch's result is its indices; fails on ``bad``; counts batches."""

    def __init__(self, bad: int | None = None, pause_s: float = 0.0):
        self.bad, self.pause_s, self.lock = bad, pause_s, threading.Lock()
        self.batches_read = 0

    def __call__(self, batches):
        time.sleep(self.pause_s)
        with self.lock:
            self.batches_read += len(batches)
        for b in batches:
            if self.bad in b:
                raise IndexError(f"index {self.bad} is out of range")
        return [("rows", list(b)) for b in batches]


@pytest.mark.parametrize("depth", [1, 2, 4, 8])
def test_at_most_depth_batches_are_held_and_every_batch_is_served_as_read(depth):
    read = CountingRead(pause_s=0.002)
    ahead = ReadAhead(read)
    sampler = ReadAheadBatchSampler(BatchSampler(SequentialSampler(range(200)), 4, False), depth, 2)
    mine = [b for b in sampler if b.key[1] % 2 == 0]  # worker 0's batches
    for batch in mine:
        assert ahead(batch) == ("rows", list(batch))
        assert ahead.in_flight() <= depth
    assert read.batches_read == len(mine)  # read once each: ahead, never again
    assert 0 < ahead._pool._max_workers <= depth


def test_batches_of_an_abandoned_pass_are_dropped():
    ahead = ReadAhead(CountingRead())
    sampler = ReadAheadBatchSampler(BatchSampler(SequentialSampler(range(64)), 4, False), 4, 1)
    first = iter(sampler)
    ahead(next(first)), ahead(next(first))
    assert ahead.in_flight() > 0
    for batch in sampler:  # a new pass: the old pass's batches are not served, and not kept
        assert ahead(batch) == ("rows", list(batch))
        assert all(key[0] == batch.key[0] for key in ahead._held)


def test_an_error_in_a_batch_read_ahead_surfaces_on_that_batch_only():
    read = CountingRead(bad=21)
    ahead = ReadAhead(read)
    served, errors = [], []
    for batch in ReadAheadBatchSampler(BatchSampler(SequentialSampler(range(40)), 4, False), 4, 1):
        try:
            served.append(ahead(batch))
        except IndexError as e:
            errors.append((list(batch), str(e)))
    assert errors == [([20, 21, 22, 23], "index 21 is out of range")]
    assert [rows for _, rows in served] == [[4 * k + j for j in range(4)] for k in range(10) if k != 5]


def test_remote_data_reads_ahead_by_default_and_local_data_does_not(tmp_path):
    assert is_remote("s3://bucket/x.lance") and is_remote("gs://b/x") and is_remote("az://c/x")
    assert not is_remote(str(tmp_path / "x.lance")) and not is_remote("file:///x") and not is_remote("C:\\x")
    remote = SimpleNamespace(reads_ahead=True, uri="s3://bucket/x.lance")
    assert _read_ahead(None, remote, num_workers=2) == REMOTE_READ_AHEAD
    assert _read_ahead(None, remote, num_workers=0) == 0  # the workers read ahead
    assert _read_ahead(None, SimpleNamespace(reads_ahead=True, uri=str(tmp_path)), 2) == 0
    assert _read_ahead(None, SimpleNamespace(uri="s3://b/x.lance"), 2) == 0  # a dataset that cannot
    assert _read_ahead(3, SimpleNamespace(), 2) == 3
    with pytest.raises(ValueError, match="num_workers > 0"):
        _read_ahead(2, remote, num_workers=0)
    with pytest.raises(ValueError, match=">= 0"):
        _read_ahead(-1, remote, num_workers=2)


def test_make_loader_on_a_local_path_does_not_read_ahead_unless_asked(id_dataset):
    assert make_loader(id_dataset, num_workers=2).read_ahead == 0
    loader = make_loader(id_dataset, batch_size=4, num_workers=2, read_ahead=4)
    assert loader.read_ahead == 4 and len(loader) == 14
    assert isinstance(loader._index_sampler, ReadAheadBatchSampler)
    with pytest.raises(ValueError, match="num_workers > 0"):
        make_loader(id_dataset, num_workers=0, read_ahead=4)


@pytest.mark.slow  # 2 loaders of 2 workers
def test_every_row_once_with_a_shard_sampler_and_threads_only_in_the_workers(id_dataset):
    dataset = open_dataset(id_dataset, columns=("image", "label"))
    shards = [ShardSampler(dataset, num_replicas=2, rank=r) for r in range(2)]
    seen = []
    for shard in shards:
        loader = make_loader(
            dataset, batch_size=4, num_workers=2, sampler=shard, collate_fn=ThreadNamesCollate(), read_ahead=3
        )
        names = []
        for images, threads in loader:
            seen += decoded_ids(images)
            names += threads
        workers = [w.pid for w in loader._iterator._workers]
        assert any(n.startswith("lance-read-ahead") for n in names)  # a worker read ahead
        del loader
        assert (
            psutil.wait_procs([psutil.Process(p) for p in workers if psutil.pid_exists(p)], timeout=10)[1]
            == []
        )
    assert sorted(seen) == list(range(53))  # every row exactly once: evaluation counts stay exact
    assert not [t.name for t in threading.enumerate() if t.name.startswith("lance-read-ahead")]


@pytest.mark.slow  # 6 loaders of 2 workers
def test_the_same_batches_in_the_same_order_as_without_read_ahead(id_dataset):
    dataset = open_dataset(id_dataset, columns=("image", "label"))

    def samplers():
        yield DistributedSampler(dataset, num_replicas=2, rank=1, shuffle=True, seed=3)  # padded: 27 of 53
        yield BlockShuffleSampler(dataset, num_replicas=2, rank=0, seed=3, block_size=4)
        resumed = ResumableDistributedSampler(dataset, num_replicas=2, rank=1, seed=3)
        resumed.set_epoch(1)
        resumed.load_state_dict(resumed.state_dict(consumed=2 * 2 * 4))  # two steps of 2 ranks x 4 done
        resumed.set_epoch(1)
        yield resumed

    for plain, ahead in zip(samplers(), samplers(), strict=True):
        expected = batches(loader_over(id_dataset, plain, read_ahead=0))
        assert batches(loader_over(id_dataset, ahead, read_ahead=3)) == expected
        assert sum(map(len, expected)) == len(plain)


@pytest.mark.slow  # 1 loader of 2 workers
def test_an_index_out_of_range_fails_its_own_batch_with_the_usual_message(id_dataset):
    order = list(range(53))
    order[22] = 53  # batch 5 (rows 20-23) of batch size 4, read ahead by worker 1
    loader = loader_over(id_dataset, order, read_ahead=4)
    got = []
    with pytest.raises(IndexError, match=r"index 53 is out of range for 53 rows of '.*ids.lance'"):
        for images, _ in loader:
            got.append(decoded_ids(images))
    assert got == batches(loader_over(id_dataset, order[:20], read_ahead=0))  # each batch before it, in order


class IdCollate:
    """The rows' ``id`` column as a tensor (module level: the loader's workers unpickle it)."""

    columns = ("image", "id")

    def __call__(self, rows):
        return torch.tensor([r["id"] for r in rows])


@pytest.mark.slow  # two servers, 3 loaders of 2 workers, 50 ms a request
def test_every_row_once_from_a_real_s3_server_at_50_ms(tmp_path):
    pytest.importorskip("boto3", reason="needs the scale extra: pip install -e '.[scale]'")
    from data_prep.convert import convert
    from lance_cookbook.bench import s3_servers as servers_module
    from lance_cookbook.bench.s3_formats import Store, upload
    from lance_cookbook.bench.synthetic import generate_imagefolder

    try:
        servers_module.weed_path(), servers_module.envoy_path()
    except FileNotFoundError as e:
        pytest.skip(f"needs the scale extra's servers: {e}")
    generate_imagefolder(tmp_path / "img", 256, "32x32", classes=4, seed=0, workers=1)
    convert(f"imagefolder:{tmp_path / 'img'}", tmp_path / "img.lance", progress=False)
    with servers_module.s3_servers("cookbook") as servers:
        upload(Store(servers.direct_options, servers.bucket), str(tmp_path / "img.lance"), "img.lance")
        servers.set_delay(50)
        uri, options = f"s3://{servers.bucket}/img.lance", servers.storage_options
        kwargs = dict(batch_size=16, num_workers=2, collate_fn=IdCollate())
        loader = make_loader(uri, storage_options=options, shuffle=True, **kwargs)
        assert loader.read_ahead == REMOTE_READ_AHEAD  # the default for s3://
        for _ in range(2):
            assert sorted(i for ids in loader for i in ids.tolist()) == list(range(256))
        del loader
        evaluated = []
        for rank in range(2):  # exactly-once evaluation: each rank's unpadded shard
            dataset = open_dataset(uri, storage_options=options, columns=["image", "id"])
            shard = make_loader(dataset, sampler=ShardSampler(dataset, num_replicas=2, rank=rank), **kwargs)
            evaluated += [i for ids in shard for i in ids.tolist()]
            del shard
        assert sorted(evaluated) == list(range(256))

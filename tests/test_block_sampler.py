"""BlockShuffleSampler: DistributedSampler's guarantees (coverage, equal counts, epochs, determinism) with
reads in runs of consecutive rows, and through make_loader."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch
from torch.utils.data import DistributedSampler

from lance_cookbook import BlockShuffleSampler, ImageCollate, make_loader
from lance_cookbook.bench.shuffle_quality import mean_batch_entropy

COMBOS = [
    (n, world, block, window, drop_last)
    for n in (0, 1, 5, 63, 64, 65, 100, 257, 1000)
    for world in (1, 2, 3, 8)
    for block, window in ((1, 1), (7, 2), (64, 4), (300, 1))
    for drop_last in (False, True)
]


def runs(rows: list[int]) -> int:
    """Maximal runs of consecutive rows in ``rows`` once sorted (1 for one contiguous range)."""
    rows = sorted(rows)
    return sum(1 for i, r in enumerate(rows) if i == 0 or r != rows[i - 1] + 1)


def ranges(rows: list[int], gap: int) -> int:
    """Clusters of ``rows`` once sorted, where neighbours less than ``gap`` apart share a cluster: the
    short ranges of rows a ``take`` of ``rows`` reads."""
    rows = sorted(rows)
    return sum(1 for i, r in enumerate(rows) if i == 0 or r - rows[i - 1] >= gap)


def shards(n: int, world: int, **kw) -> list[list[int]]:
    return [list(BlockShuffleSampler(range(n), world, r, **kw)) for r in range(world)]


@pytest.mark.parametrize(("n", "world", "block", "window", "drop_last"), COMBOS)
def test_every_row_once_across_ranks_and_equal_counts(n, world, block, window, drop_last):
    parts = shards(n, world, block_size=block, window=window, drop_last=drop_last, seed=3)
    reference = len(DistributedSampler(range(n), world, 0, drop_last=drop_last)) if n else 0
    assert [len(p) for p in parts] == [reference] * world  # DistributedSampler's count, on every rank
    assert all(len(p) == len(BlockShuffleSampler(range(n), world, 0, drop_last=drop_last)) for p in parts)
    counts = Counter(i for p in parts for i in p)
    assert set(counts) <= set(range(n))
    if drop_last:
        assert max(counts.values(), default=1) == 1  # nothing twice
        assert len(counts) == n - n % world  # only the tail that no world size divides is dropped
    else:
        assert set(counts) == set(range(n))  # every row
        padding = world * reference - n
        assert sum(counts.values()) - n == padding  # and only the padding twice (or more if n < world)


def test_padding_repeats_the_first_rows_of_the_block_order():
    sampler = BlockShuffleSampler(range(10), num_replicas=4, rank=3, block_size=3)
    order = sampler.block_order()
    assert order.dtype == torch.int64 and order.shape == (12,)
    assert sorted(order[:10].tolist()) == list(range(10))


def test_every_rank_computes_the_same_order_and_takes_its_slice():
    samplers = [BlockShuffleSampler(range(1000), 3, r, seed=7, block_size=16) for r in range(3)]
    orders = [s.block_order() for s in samplers]
    assert all(torch.equal(orders[0], o) for o in orders)
    assert [i for s in samplers for i in s] == orders[0].tolist()
    # the global order interleaves the chunks: rank r takes positions r, r + 3, ... as in DistributedSampler
    interleaved = samplers[0].global_order()
    assert all(list(s) == interleaved[s.rank :: 3] for s in samplers)


# --- resuming mid-epoch (the state ResumableDistributedSampler has, from the same code) ------------------


def block(n: int, world: int, rank: int, **kw) -> BlockShuffleSampler:
    return BlockShuffleSampler(range(n), world, rank, **{"seed": 3, "block_size": 8, "window": 2, **kw})


@pytest.mark.parametrize("drop_last", [False, True])
def test_resumed_with_the_same_world_continues_the_same_batches(drop_last):
    n, world, batch, epoch = 203, 2, 16, 1
    full = [block(n, world, r, drop_last=drop_last) for r in range(world)]
    for s in full:
        s.set_epoch(epoch)
    state = full[0].state_dict(full[0].consumed(3, batch))  # after 3 steps of 16 samples per rank
    assert (state["epoch"], state["consumed"]) == (epoch, 96)
    for rank in range(world):
        resumed = block(n, world, rank, drop_last=drop_last)
        resumed.load_state_dict(state)
        resumed.set_epoch(epoch)  # keeps the loaded place
        assert list(resumed) == list(full[rank])[3 * batch :]
        assert resumed.indices().tolist() == list(resumed)
        resumed.set_epoch(epoch + 1)  # the next epoch starts from its beginning
        fresh = block(n, world, rank, drop_last=drop_last)
        fresh.set_epoch(epoch + 1)
        assert resumed.start == 0 and list(resumed) == list(fresh)


@pytest.mark.parametrize(("old_world", "new_world"), [(2, 1), (2, 3), (3, 2), (4, 3), (1, 4)])
def test_elastic_resume_neither_repeats_nor_skips(old_world, new_world):
    n, batch, epoch = 203, 8, 2
    old = [block(n, old_world, r) for r in range(old_world)]
    for s in old:
        s.set_epoch(epoch)
    steps = 5
    before = [i for s in old for i in list(s)[: steps * batch]]  # what the interrupted run trained on
    state = old[0].state_dict(old[0].consumed(steps, batch))
    after = []
    for rank in range(new_world):
        s = block(n, new_world, rank)
        s.load_state_dict(state)
        s.set_epoch(epoch)
        assert s.total_size == old[0].total_size and s.order_replicas == old_world  # the epoch's layout
        after += list(s)
    # together: exactly the epoch of the interrupted run, every index as often as it had it
    assert Counter(before + after) == Counter(i for s in old for i in s)
    assert len(before) + len(after) == old[0].total_size
    nxt = block(n, new_world, 0)
    nxt.load_state_dict(state)
    nxt.set_epoch(epoch + 1)  # the next epoch is laid out for the new world size
    fresh = block(n, new_world, 0)
    fresh.set_epoch(epoch + 1)
    assert nxt.order_replicas == new_world and list(nxt) == list(fresh)


def test_a_checkpoint_of_another_sampler_or_other_blocks_is_refused():
    from lance_cookbook.recipe.sampler import ResumableDistributedSampler

    state = block(100, 1, 0).state_dict(16)
    with pytest.raises(ValueError, match="block_size"):
        block(100, 1, 0, block_size=16).load_state_dict(state)
    with pytest.raises(ValueError, match="BlockShuffleSampler"):
        ResumableDistributedSampler(range(100), 1, 0, seed=3).load_state_dict(state)


def test_set_epoch_changes_the_order_and_the_order_is_deterministic():
    a = BlockShuffleSampler(range(1000), 2, 1, seed=5)
    b = BlockShuffleSampler(range(1000), 2, 1, seed=5)
    first = list(a)
    assert first == list(a) == list(b)  # same seed and epoch: same order, every time
    a.set_epoch(1)
    assert list(a) != first
    b.set_epoch(1)
    assert list(a) == list(b)
    assert list(BlockShuffleSampler(range(1000), 2, 1, seed=6)) != first


def test_blocks_move_across_epochs():
    """Not only the order inside a rank's chunk changes: which blocks a rank gets changes too."""
    epochs = []
    for epoch in range(3):
        s = BlockShuffleSampler(range(1024), 2, 0, block_size=64)
        s.set_epoch(epoch)
        epochs.append({i // 64 for i in s})
    assert epochs[0] != epochs[1] != epochs[2]


@pytest.mark.parametrize(("block", "window"), [(16, 1), (16, 4), (64, 4), (10, 3)])
def test_each_window_of_a_rank_reads_few_runs_of_consecutive_rows(block, window):
    n, world = 2000, 2
    span = block * window
    for rank_rows in shards(n, world, block_size=block, window=window, seed=1):
        full_windows = [rank_rows[i : i + span] for i in range(0, len(rank_rows) - span + 1, span)]
        assert full_windows
        # a window covers `window` blocks' worth of positions: at most window + 1 blocks when the rank's
        # chunk starts mid-block, + 1 for the short last block of the dataset
        assert max(runs(w) for w in full_windows) <= window + 2
        assert any(w != sorted(w) for w in full_windows)  # and rows are shuffled inside the window


def test_batches_touch_far_fewer_ranges_than_a_random_permutation():
    def mean_ranges(rows: list[int]) -> float:
        batches = [rows[i : i + 64] for i in range(0, len(rows), 64)]
        return sum(ranges(b, 64) for b in batches) / len(batches)

    perm = torch.randperm(10_000, generator=torch.Generator().manual_seed(0)).tolist()
    assert mean_ranges(perm) > 30  # a random batch of 64 touches ~40 separate places
    assert mean_ranges(list(BlockShuffleSampler(range(10_000), 1, 0, block_size=64, window=4))) <= 5
    # window=1: a batch is one block (two where the chunk starts mid-block), read in one run
    one = list(BlockShuffleSampler(range(10_000), 1, 0, block_size=64, window=1))
    assert sum(runs(one[i : i + 64]) for i in range(0, 9984, 64)) / 156 <= 2


def test_no_shuffle_gives_each_rank_one_contiguous_chunk():
    parts = shards(10, 3, shuffle=False, block_size=4)
    assert parts == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 0, 1]]


@pytest.mark.parametrize(
    "kw",
    [dict(num_replicas=2, rank=2), dict(num_replicas=0, rank=0), dict(block_size=0), dict(window=0)],
)
def test_bad_arguments_are_refused(kw):
    with pytest.raises(ValueError):
        BlockShuffleSampler(range(10), **{"num_replicas": 1, "rank": 0, **kw})


def test_defaults_to_a_single_process_without_torch_distributed():
    s = BlockShuffleSampler(range(10))
    assert (s.num_replicas, s.rank, s.block_size, len(s)) == (1, 0, 64, 10)


def test_mean_batch_entropy_tells_sorted_batches_from_mixed_ones():
    labels = [i // 100 for i in range(1000)]  # sorted by class, as an ImageFolder conversion writes rows
    assert mean_batch_entropy(labels, range(1000), 50) == 0.0
    interleaved = [j * 100 + i for i in range(100) for j in range(10)]  # every 10 rows hold all 10 classes
    assert mean_batch_entropy(labels, interleaved, 10) == pytest.approx(math.log2(10))
    assert mean_batch_entropy(labels, interleaved, 20) == pytest.approx(math.log2(10))
    with pytest.raises(ValueError):
        mean_batch_entropy(labels, range(10), 0)


def test_through_make_loader_every_row_once_in_the_sampler_order(id_dataset):
    collate = ImageCollate(size=8, decoder="torchvision", dtype=torch.uint8)

    def ids(loader) -> list[int]:
        images = torch.cat([images for images, _labels in loader])
        return (images[:, 0, 0, 0].long() + 256 * images[:, 1, 0, 0].long()).tolist()

    # row r of the dataset holds image id row_id[r] (the conversion writes rows by class folder)
    row_id = ids(make_loader(id_dataset, batch_size=16, num_workers=0, collate_fn=collate))
    seen = []
    for rank in range(2):
        sampler = BlockShuffleSampler(range(53), num_replicas=2, rank=rank, block_size=8, window=2, seed=4)
        sampler.set_epoch(3)
        loader = make_loader(id_dataset, batch_size=8, num_workers=0, sampler=sampler, collate_fn=collate)
        got = ids(loader)
        assert got == [row_id[r] for r in sampler]
        seen += got
    assert sorted(set(seen)) == list(range(53)) and len(seen) == 54  # one padded row

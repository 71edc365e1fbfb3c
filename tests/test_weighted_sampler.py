"""WeightedResumableSampler (pytorch#77154): class frequencies within a derived tolerance, each draw on one
rank, set_epoch, exact mid-epoch resume on any world size, refusals, and through make_loader."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import lance_cookbook as lc
from lance_cookbook import ImageCollate, WeightedResumableSampler, make_loader

# an imbalanced label list: class c has COUNTS[c] rows, 5,000 down to 5 (the rarest is 0.05 % of the rows)
COUNTS = [5000, 2000, 1000, 500, 200, 100, 50, 20, 10, 5]
LABELS = np.repeat(np.arange(10), COUNTS)
np.random.default_rng(0).shuffle(LABELS)


def four_sigma(p: float, n: int) -> float:
    # a class's share of n independent draws of probability p is Binomial(n, p) / n, of standard deviation
    # sqrt(p (1 - p) / n); at 4 sigma a correct sampler fails about 6e-5 of the time per class (normal
    # approximation), ~6e-4 for 10 classes. p = 0.1, n = 20,000: +-0.0085 around 0.1
    return 4 * math.sqrt(p * (1 - p) / n)


def shares(indices, labels, num_classes: int) -> np.ndarray:
    counts = np.bincount(np.asarray(labels)[np.asarray(indices, dtype=np.int64)], minlength=num_classes)
    return counts / counts.sum()


def ranks(world: int, epoch: int = 0, **kwargs) -> list[WeightedResumableSampler]:
    samplers = [WeightedResumableSampler(**kwargs, num_replicas=world, rank=r) for r in range(world)]
    for s in samplers:
        s.set_epoch(epoch)
    return samplers


def test_exported():
    assert lc.WeightedResumableSampler is WeightedResumableSampler
    assert "WeightedResumableSampler" in lc.__all__


@pytest.mark.parametrize("world", [1, 2, 3])
def test_class_balanced_frequencies_within_four_sigma(world):
    args = dict(num_samples=20_000, seed=7, num_replicas=world)
    samplers = [WeightedResumableSampler.from_labels(LABELS, **args, rank=r) for r in range(world)]
    draws = [i for s in samplers for i in s]
    assert len(draws) == -(-20_000 // world) * world
    freq = shares(draws, LABELS, 10)
    tol = four_sigma(0.1, len(draws))
    print(f"\nworld {world}: shares {np.round(freq, 4).tolist()}, tolerance +-{tol:.4f}")
    assert np.all(np.abs(freq - 0.1) <= tol), freq


def test_custom_class_shares():
    target = np.array([1] * 5 + [3] * 5) / 20
    s = WeightedResumableSampler.from_labels(LABELS, class_weights=target * 20, num_samples=20_000, seed=2)
    freq = shares(list(s), LABELS, 10)
    assert np.all(np.abs(freq - target) <= [four_sigma(p, 20_000) for p in target]), freq


def test_weight_column_frequencies_and_weight_zero_rows_never_drawn():
    rng = np.random.default_rng(1)
    weights, labels = rng.uniform(0, 3, 1000), rng.integers(0, 4, 1000)
    weights[::10] = 0.0
    for replacement, n in [(True, 40_000), (False, 900)]:  # 900 = every row of positive weight
        s = WeightedResumableSampler(weights, num_samples=n, replacement=replacement, seed=3)
        draws = np.array(list(s))
        assert len(draws) == n and not np.isin(draws, np.arange(0, 1000, 10)).any()
    expected = np.bincount(labels, weights=weights, minlength=4) / weights.sum()
    freq = shares(list(WeightedResumableSampler(weights, num_samples=40_000, seed=3)), labels, 4)
    assert all(abs(f - p) <= four_sigma(p, 40_000) for f, p in zip(freq, expected, strict=True)), freq


@pytest.mark.parametrize("replacement", [True, False])
@pytest.mark.parametrize("world,num_samples", [(2, 1000), (3, 1000), (4, 7)])
def test_each_draw_goes_to_exactly_one_rank(world, num_samples, replacement):
    weights = np.linspace(0, 1, len(LABELS))
    samplers = ranks(world, weights=weights, num_samples=num_samples, replacement=replacement)
    order = samplers[0].global_order()
    assert all(s.global_order() == order for s in samplers)  # every rank computes the same draws
    assert len(order) == -(-num_samples // world) * world  # rounded up with further draws
    shards = [list(s) for s in samplers]
    assert [shard == order[r::world] for r, shard in enumerate(shards)] == [True] * world
    assert len({len(shard) for shard in shards}) == 1 and sum(map(len, shards)) == len(order)
    if not replacement:
        assert len(set(order)) == len(order)  # distinct rows, also across ranks


def test_without_replacement_refuses_more_than_the_rows_of_positive_weight():
    weights = [1.0] * 10 + [0.0] * 5
    assert sorted(WeightedResumableSampler(weights, num_samples=10, replacement=False)) == list(range(10))
    with pytest.raises(ValueError, match="at most the 10 rows of positive weight"):
        WeightedResumableSampler(weights, num_samples=11, replacement=False)


def test_set_epoch_changes_the_draws_deterministically():
    args = dict(weights=np.ones(len(LABELS)), num_samples=500, seed=11)
    a, b = WeightedResumableSampler(**args), WeightedResumableSampler(**args)
    a.set_epoch(3)
    b.set_epoch(3)
    assert list(a) == list(b)
    b.set_epoch(4)
    assert list(a) != list(b)
    b.set_epoch(3)
    assert list(a) == list(b)
    assert list(WeightedResumableSampler(**{**args, "seed": 12})) != list(WeightedResumableSampler(**args))


@pytest.mark.parametrize("replacement", [True, False])
@pytest.mark.parametrize("new_world", [2, 3, 1])
def test_exact_resume_mid_epoch_on_any_world_size(new_world, replacement):
    args = dict(weights=np.linspace(0.5, 2, len(LABELS)), num_samples=1000, seed=5, replacement=replacement)
    world, batch, steps = 2, 16, 9
    old = ranks(world, epoch=2, **args)
    full = old[0].global_order()
    consumed = old[0].consumed(steps, batch)
    state = old[0].state_dict(consumed)
    assert (state["epoch"], state["consumed"]) == (2, steps * world * batch)

    new = [WeightedResumableSampler(**args, num_replicas=new_world, rank=r) for r in range(new_world)]
    for s in new:
        s.load_state_dict(state)
        s.set_epoch(2)  # the training loop's call keeps the loaded place
    rest = [list(s) for s in new]
    if new_world == world:  # what the uninterrupted run would have given each rank
        assert rest == [list(s)[steps * batch :] for s in old]
    interleaved = [None] * (len(full) - consumed)
    for r, shard in enumerate(rest):
        interleaved[r::new_world] = shard
    assert interleaved == full[consumed:]  # nothing repeated, nothing skipped
    for s in new:
        s.set_epoch(3)
    assert [len(s) for s in new] == [-(-1000 // new_world)] * new_world


def test_resume_refuses_other_weights_sample_count_or_replacement():
    weights = WeightedResumableSampler.from_labels(LABELS).weights
    state = WeightedResumableSampler(weights, num_samples=1000).state_dict(64)
    other = WeightedResumableSampler.from_labels(LABELS, class_weights=[2] + [1] * 9, num_samples=1000)
    with pytest.raises(ValueError, match="has weights_sha256=.* resume with the dataset version"):
        other.load_state_dict(state)
    with pytest.raises(ValueError, match="has num_samples=1000 but this one has 999"):
        WeightedResumableSampler(weights, num_samples=999).load_state_dict(state)
    with pytest.raises(ValueError, match="has replacement=True but this one has False"):
        WeightedResumableSampler(weights, num_samples=1000, replacement=False).load_state_dict(state)
    same = WeightedResumableSampler(weights.clone(), num_samples=1000)
    same.load_state_dict(state)  # the same weights: resumes
    assert same.start == 64


def test_bad_arguments():
    for bad in [[], [1, -1], [1, float("nan")], [[1, 2]]]:
        with pytest.raises(ValueError, match="weights must be 1-D, non-empty, finite and >= 0"):
            WeightedResumableSampler(bad)
    with pytest.raises(ValueError, match="all 0"):
        WeightedResumableSampler([0, 0])
    with pytest.raises(ValueError, match="num_samples=0 must be >= 1"):
        WeightedResumableSampler([1, 2], num_samples=0)
    with pytest.raises(ValueError, match="labels go up to 9"):
        WeightedResumableSampler.from_labels(LABELS, class_weights=[1, 1])
    with pytest.raises(ValueError, match="class indices >= 0"):
        WeightedResumableSampler.from_labels([0, -1])


def test_more_than_2_24_rows():
    s = WeightedResumableSampler(torch.ones(2**24 + 10, dtype=torch.float64), num_samples=100)
    assert len(list(s)) == 100
    with pytest.raises(RuntimeError, match="2\\^24"):  # what torch.multinomial (WeightedRandomSampler) does
        torch.multinomial(torch.ones(2**24 + 10), 10, replacement=True)


def test_through_make_loader(id_dataset):
    collate = ImageCollate(size=8, decoder="torchvision", dtype=torch.uint8)

    def ids_and_labels(loader) -> tuple[list[int], list[int]]:
        images, labels = (torch.cat(parts) for parts in zip(*loader, strict=True))
        ids = images[:, 0, 0, 0].long() + 256 * images[:, 1, 0, 0].long()
        return ids.tolist(), labels.tolist()

    # row r of the dataset holds image id row_id[r], of class row_label[r] (ids i of folder c{i % 3})
    in_order = make_loader(id_dataset, batch_size=16, num_workers=0, collate_fn=collate)
    row_id, row_label = ids_and_labels(in_order)
    assert [i % 3 for i in row_id] == row_label
    weights = [0.0 if label == 0 else 1.0 for label in row_label]  # class 0 never drawn
    seen = []
    for rank in range(2):
        sampler = WeightedResumableSampler(weights, num_samples=60, num_replicas=2, rank=rank, seed=1)
        sampler.set_epoch(1)
        loader = make_loader(id_dataset, batch_size=8, num_workers=0, sampler=sampler, collate_fn=collate)
        got, labels = ids_and_labels(loader)
        assert got == [row_id[r] for r in sampler] and len(got) == 30
        assert 0 not in labels
        seen += got
    assert len(seen) == 60 and {i % 3 for i in seen} == {1, 2}

"""DataWaitMeter: waits and steps add up, an empty loader reports zero; the CLI parses KEY=VALUE."""

from __future__ import annotations

import argparse

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from lance_cookbook.cli import add_storage_option_argument
from lance_cookbook.recipe.meters import DataWaitMeter


class Ticks:
    """A fake clock: each call returns the next scripted time, so no assertion depends on real timing."""

    def __init__(self, times: list[float]):
        self.times = iter(times)

    def __call__(self) -> float:
        return next(self.times)


def test_wait_and_step_sums_follow_the_clock(monkeypatch):
    # start 0; batch 1 ready at 2, body ends at 3; batch 2 ready at 7, body ends at 8; then exhausted
    monkeypatch.setattr("lance_cookbook.recipe.meters.time.perf_counter", Ticks([0.0, 2.0, 3.0, 7.0, 8.0]))
    meter = DataWaitMeter()
    assert list(meter.wrap(["a", "b"])) == ["a", "b"]
    assert meter.steps == 2
    assert meter.wait_s == pytest.approx(2.0 + 4.0)
    assert meter.step_s == pytest.approx(3.0 + 5.0)
    assert meter.wait_fraction == pytest.approx(6.0 / 8.0)
    assert (meter.last_wait_s, meter.last_step_s) == (pytest.approx(4.0), pytest.approx(5.0))


def test_empty_loader_reports_zero_steps_and_zero_fraction():
    meter = DataWaitMeter()
    empty = DataLoader(TensorDataset(torch.zeros(0, 3)), batch_size=4)
    assert list(meter.wrap(empty)) == []
    assert (meter.steps, meter.wait_s, meter.step_s, meter.wait_fraction) == (0, 0.0, 0.0, 0.0)


def test_a_real_loader_is_passed_through_and_the_fraction_is_a_share():
    meter = DataWaitMeter()
    loader = DataLoader(TensorDataset(torch.arange(10)), batch_size=4)
    batches = [b[0].tolist() for b in meter.wrap(loader)]
    assert batches == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert meter.steps == 3 and 0.0 <= meter.wait_fraction <= 1.0 and meter.wait_s <= meter.step_s


def test_break_keeps_completed_steps_and_reset_clears():
    meter = DataWaitMeter()
    for i, _ in enumerate(meter.wrap(range(10))):
        if i == 2:
            break
    assert meter.steps == 2  # the step that broke out never finished
    meter.reset()
    assert (meter.steps, meter.wait_s, meter.step_s) == (0, 0.0, 0.0)


def test_storage_option_argument_repeats_and_rejects_a_missing_equals(capsys):
    p = argparse.ArgumentParser()
    add_storage_option_argument(p, "object-store option")
    args = p.parse_args(["--storage-option", "aws_region=us-east-1", "--storage-option", "token=a=b"])
    assert dict(args.storage_option) == {"aws_region": "us-east-1", "token": "a=b"}
    assert p.parse_args([]).storage_option == []
    with pytest.raises(SystemExit):
        p.parse_args(["--storage-option", "novalue"])
    assert "expected KEY=VALUE, got 'novalue'" in capsys.readouterr().err

"""Several processes preparing the same dataset at once (t3-nb-parallel-first-run, pytorch/tutorials#3065):
``ensure_digits`` waits for the one converting, and a conversion that loses the race to create its output
says so in one line and leaves nothing behind."""

from __future__ import annotations

import fcntl
import shutil
import threading
from pathlib import Path

import lance
import pytest

from data_prep import digits as digits_module
from data_prep.check import ConversionError
from data_prep.convert import convert
from data_prep.sources import Record, Source


def fake_convert(calls: list[str]):
    """A stand-in for ``convert``: makes a dataset folder with a version (what ``_complete`` looks for)."""

    def run(source, output, **kw):
        calls.append(Path(output).name)
        (Path(output) / "_versions").mkdir(parents=True)

    return run


def test_ensure_digits_waits_for_the_process_converting_and_uses_its_datasets(tmp_path, monkeypatch):
    calls: list[str] = []
    monkeypatch.setattr(digits_module, "convert", fake_convert(calls))
    data = tmp_path / "data"
    data.mkdir()
    result: list = []
    with open(data / digits_module.LOCK_NAME, "a") as held:  # another process, converting
        fcntl.flock(held, fcntl.LOCK_EX)
        waiter = threading.Thread(target=lambda: result.append(digits_module.ensure_digits(data)))
        waiter.start()
        waiter.join(0.5)
        assert waiter.is_alive() and not result  # waits on the lock, converts nothing yet
        for split in ("train", "test"):  # the other process finishes both datasets
            (data / f"digits-{split}.lance" / "_versions").mkdir(parents=True)
        fcntl.flock(held, fcntl.LOCK_UN)
    waiter.join(10)
    assert result == [(str(data / "digits-train.lance"), str(data / "digits-test.lance"))]
    assert calls == []  # it used the other process's datasets


def test_ensure_digits_converts_only_what_is_missing_and_needs_no_lock_when_complete(tmp_path, monkeypatch):
    calls: list[str] = []
    monkeypatch.setattr(digits_module, "convert", fake_convert(calls))
    (tmp_path / "digits-train.lance" / "_versions").mkdir(parents=True)
    assert digits_module.ensure_digits(tmp_path)[1] == str(tmp_path / "digits-test.lance")
    assert calls == ["digits-test.lance"]
    (tmp_path / digits_module.LOCK_NAME).unlink()
    digits_module.ensure_digits(tmp_path)  # both there: no lock file is made
    assert calls == ["digits-test.lance"] and not (tmp_path / digits_module.LOCK_NAME).exists()


def test_ensure_digits_accepts_a_dataset_an_unlocked_process_finished_first(tmp_path, monkeypatch):
    """Where the lock does not hold (no flock on the file system), the loser's conversion fails once the
    winner's dataset is in place: the digits are the same, so the winner's copy is used."""

    def lose(source, output, **kw):
        (Path(output) / "_versions").mkdir(parents=True)  # the winner, meanwhile
        raise ConversionError(f"output {output} was created by another process while this conversion ran")

    monkeypatch.setattr(digits_module, "convert", lose)
    assert digits_module.ensure_digits(tmp_path)[0] == str(tmp_path / "digits-train.lance")


def test_ensure_digits_still_raises_a_failure_that_left_no_dataset(tmp_path, monkeypatch):
    def fail(source, output, **kw):
        raise ConversionError("digits: something else went wrong")

    monkeypatch.setattr(digits_module, "convert", fail)
    with pytest.raises(ConversionError, match="something else"):
        digits_module.ensure_digits(tmp_path)


def test_conversion_that_loses_the_race_for_a_new_output_keeps_the_winners_dataset(tmp_path, digits):
    """Another process renames its dataset into the output while this conversion writes: one line naming the
    output, the other dataset untouched, no staging folder left."""
    out = tmp_path / "out.lance"
    rows = lance.dataset(digits[1]).count_rows()

    def records():
        shutil.copytree(digits[1], out)  # the other process commits first
        yield from digits_source_records()

    src = Source(records(), ["0", "1"], "racing source", total=3)
    with pytest.raises(ConversionError, match="out.lance was created by another process"):
        convert(src, out, progress=False)
    assert lance.dataset(str(out)).count_rows() == rows
    assert [p.name for p in tmp_path.iterdir()] == ["out.lance"]


def digits_source_records():
    from data_prep.sources import digits_source

    src = digits_source("test")
    for _, record in zip(range(3), src.records, strict=False):
        yield Record(record.source, record.label % 2, data=record.data)

"""The training script on a slice or a tagged snapshot: --filter, --val-filter, a --version tag."""

from __future__ import annotations

import json
import subprocess
from datetime import timedelta

import lance
import pytest
from conftest import child_env, torchrun

from lance_cookbook.train import cli
from lance_cookbook.train import main as train_main
from lance_cookbook.training.arguments import version_or_tag
from lance_cookbook.training.checkpoint import list_checkpoints, load_checkpoint

LOW, HIGH = "label < 5", "label >= 5"


@pytest.fixture
def data(small, tmp_path) -> tuple[str, str]:
    """Copies of the small digits (101 training rows at version 1, 51 held-out), so a test may change them."""
    train, val = (str(tmp_path / name) for name in ("train.lance", "val.lance"))
    lance.write_dataset(lance.dataset(small[0]).to_table(), train)
    lance.write_dataset(lance.dataset(small[1]).to_table(), val)
    return train, val


def matching(uri: str, predicate: str | None = None, version: int | None = None) -> int:
    """Lance's own count of the rows matching ``predicate`` in ``version`` (default: the latest)."""
    return lance.dataset(uri, version=version).to_table(columns=["label"], filter=predicate).num_rows


def args(train: str, val: str, *extra: str, epochs: int = 1) -> list[str]:
    return [
        "--train", train, "--val", val, "--epochs", str(epochs), "--batch-size", "16", "--workers", "0",
        "--image-size", "16", "--print-freq", "0", *extra,
    ]  # fmt: skip


def test_a_version_is_a_number_when_all_digits_else_a_tag():
    assert [version_or_tag(t) for t in ("3", "007", "v3", "3a", "best")] == [3, 7, "v3", "3a", "best"]


def test_a_filtered_run_trains_and_evaluates_on_exactly_the_matching_rows(data, tmp_path):
    train, val = data
    out = tmp_path / "metrics.json"
    metrics = train_main(
        args(train, val, "--filter", LOW, "--val-filter", HIGH, "--metrics-out", str(out), epochs=2)
    )
    n_train, n_val = matching(train, LOW), matching(val, HIGH)
    assert (n_train, n_val) == (51, 25)  # held: a real slice of 101 and 51 rows
    for epoch in metrics["epochs"]:  # one process: no padding, every matching row once per epoch
        assert (epoch["train_samples_seen"], epoch["val_samples_seen"]) == (n_train, n_val)
    assert metrics["filters"] == {"train": LOW, "val": HIGH}
    assert metrics["versions"] == {"train": 1, "val": 1} and metrics["tags"] == {"train": None, "val": None}
    assert json.loads(out.read_text()) == metrics


def test_a_tag_reads_its_snapshot_after_the_table_moved_on_and_is_recorded(data, tmp_path):
    train, val = data
    lance.dataset(train).tags.create("reviewed", 1)
    rows = lance.dataset(train).to_table()
    lance.write_dataset(rows.slice(0, 40), train, mode="append")  # version 2: 141 rows
    lance.write_dataset(rows.slice(40, 30), train, mode="append")  # version 3: 171 rows
    lance.dataset(val).tags.create("held-out", 1)
    ckpt = tmp_path / "ckpt"
    metrics = train_main(
        args(train, val, "--version", "reviewed", "--val-version", "held-out", "--filter", LOW)
        + ["--checkpoint-dir", str(ckpt)]
    )
    assert matching(train, LOW) != matching(train, LOW, version=1) == 51
    assert metrics["epochs"][0]["train_samples_seen"] == 51
    record = {
        "versions": {"train": 1, "val": 1},
        "filters": {"train": LOW, "val": None},
        "tags": {"train": "reviewed", "val": "held-out"},
    }
    assert {k: metrics[k] for k in record} == record
    (path,) = list_checkpoints(ckpt)
    assert {k: load_checkpoint(path)["metrics"][k] for k in record} == record


@pytest.fixture
def resumable(data, tmp_path):
    """A run of one epoch on ``--filter LOW`` at tag "v1" (version 1), checkpointed; then the table moved on
    and the tag "v2" names version 2."""
    train, val = data
    lance.dataset(train).tags.create("v1", 1)
    ckpt = tmp_path / "ckpt"
    common = args(train, val, "--filter", LOW, "--checkpoint-dir", str(ckpt))
    train_main([*common, "--version", "v1"])
    lance.write_dataset(lance.dataset(train).to_table().slice(0, 40), train, mode="append")
    lance.dataset(train).tags.create("v2", 2)
    (path,) = list_checkpoints(ckpt)
    return train, val, ckpt, path


@pytest.mark.parametrize(
    ("change", "refusal"),
    [
        (
            ["--filter", HIGH, "--version", "v1"],
            'the rows of --train matching --filter "label < 5", not the rows of --train matching --filter '
            '"label >= 5": pass --filter "label < 5" to resume',
        ),
        (
            ["--version", "v1"],
            'the rows of --train matching --filter "label < 5", not every row of --train (no --filter): pass '
            '--filter "label < 5" to resume',
        ),
        (
            ["--filter", LOW, "--val-filter", HIGH],
            'every row of --val (no --val-filter), not the rows of --val matching --val-filter "label >= 5": '
            "drop --val-filter to resume",
        ),
        (
            ["--filter", LOW, "--version", "v2"],
            "version 1 (tag 'v1') of --train, not version 2 (--version v2): drop --version (or pass "
            "--version 1) to resume",
        ),
        (
            ["--filter", LOW, "--version", "2"],
            "version 1 (tag 'v1') of --train, not version 2 (--version 2): drop --version (or pass "
            "--version 1) to resume",
        ),
    ],
)
def test_a_resume_on_other_rows_is_refused_in_one_line(resumable, capsys, change, refusal):
    train, val, ckpt, path = resumable
    capsys.readouterr()
    assert cli([*args(train, val, "--checkpoint-dir", str(ckpt), epochs=2), *change]) == 2
    err = capsys.readouterr().err
    assert err == f"error: cannot resume from {path}: it read {refusal}, or start a new --checkpoint-dir\n"
    assert list_checkpoints(ckpt) == [path]  # nothing trained


def test_a_resume_reads_the_checkpoints_version_after_the_tag_moved(resumable):
    train, val, ckpt, path = resumable
    lance.dataset(train).tags.update("v1", 2)  # the tag moved on: the checkpoint's number stands
    common = [*args(train, val, "--filter", LOW, "--checkpoint-dir", str(ckpt), epochs=2)]
    for again in ([], ["--version", "1"]):
        resumed = train_main([*common, *again])
        assert resumed["versions"] == {"train": 1, "val": 1} and resumed["tags"]["train"] == "v1"
        assert [e["train_samples_seen"] for e in resumed["epochs"]] == [51, 51]  # not version 2's 71


@pytest.mark.parametrize(
    ("option", "line"),
    [
        (
            ["--filter", "label ==="],
            "filter 'label ===' is not a valid Lance SQL predicate for {train!r}: Error parsing statement: "
            "SELECT 1 FROM t WHERE label === (sql parser error: Expected: an expression, found: =) (its "
            "columns: image, label, id, source, width, height; quote strings with '...')",
        ),
        (
            ["--val-filter", "label > 100"],
            "filter 'label > 100' matches none of the 51 rows of version 1 of {val!r}: check the predicate's "
            "values, or the version",
        ),
        (
            ["--version", "nope"],
            "Lance dataset at {train!r} has no tag 'nope' (its tags: none): pass one of them or a version "
            "number",
        ),
        (
            ["--val-version", "9"],
            "Lance dataset at {val!r} has no version 9 (versions that exist: 1; cleanup_old_versions removes "
            "untagged ones): pass one of them",
        ),
    ],
)
def test_a_bad_filter_tag_or_version_is_one_line(data, capsys, option, line):
    train, val = data
    assert cli([*args(train, val), *option]) == 2
    assert capsys.readouterr().err == f"error: {line.format(train=train, val=val)}\n"


@pytest.mark.parametrize("workers", [0, 1])
def test_a_tagged_version_removed_mid_run_is_one_line(data, capsys, workers):
    """The tag deleted and its version cleaned up while the run reads it: the recipe's DatasetNotFound, on one
    line also when a loader's worker raises it (torch re-raises it with the worker's traceback)."""
    train, val = data
    lance.dataset(train).tags.create("run1", 1)
    rows = lance.dataset(train).to_table()

    def remove_version_1(run, sampler, done):
        if done == 1 and sampler.epoch == 0:
            lance.write_dataset(rows.slice(0, 20), train, mode="overwrite")  # version 2 shares no file
            lance.dataset(train).tags.delete("run1")
            lance.dataset(train).cleanup_old_versions(older_than=timedelta(0))

    common = args(train, val, "--version", "run1")
    common[common.index("--workers") + 1] = str(workers)
    assert cli(common, after_step=remove_version_1) == 2
    assert capsys.readouterr().err == (
        f"error: version 1 (tag 'run1') of Lance dataset at {train!r} is gone (cleanup_old_versions removed "
        "it, or its files, while this run read it): keep a tag on every version a run reads, and delete the "
        "tag only after the run\n"
    )


@pytest.mark.slow
def test_two_ranks_train_on_one_filtered_tagged_snapshot(data, tmp_path):
    """Rank 0 resolves the tag and broadcasts the number; every rank filters that version."""
    train, val = data
    lance.dataset(train).tags.create("snap", 1)
    lance.write_dataset(lance.dataset(train).to_table().slice(0, 40), train, mode="append")
    out = tmp_path / "metrics.json"
    cmd = torchrun(2, *args(train, val, "--version", "snap", "--filter", LOW, "--metrics-out", str(out)))
    subprocess.run(cmd, check=True, env=child_env(), timeout=300)
    metrics = json.loads(out.read_text())
    n = matching(train, LOW, version=1)
    assert metrics["versions"]["train"] == 1 and metrics["tags"]["train"] == "snap"
    assert metrics["epochs"][0]["train_samples_seen"] == n + n % 2  # padded to 2 equal shards
    assert metrics["epochs"][0]["val_samples_seen"] == 51

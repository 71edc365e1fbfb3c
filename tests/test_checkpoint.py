"""Checkpoints and exact resume: the sampler's order, cut-off files, finished runs, a SIGKILLed rank
under torchrun's restart, and an elastic 2 -> 1 process resume."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import child_env, torchrun
from torch.utils.data.distributed import DistributedSampler

from lance_cookbook.recipe.sampler import ResumableDistributedSampler
from lance_cookbook.testing import kill_rank_when_paused, pause_env
from lance_cookbook.train import main as train_main
from lance_cookbook.training.checkpoint import list_checkpoints
from lance_cookbook.training.schedule import OneCycleSchedule


def common(small, ckpt: Path, metrics: Path, epochs: int = 2) -> list[str]:
    train, val = small
    return [
        "--train", train, "--val", val, "--epochs", str(epochs), "--batch-size", "16", "--workers", "0",
        "--image-size", "16", "--checkpoint-dir", str(ckpt), "--checkpoint-every", "2",
        "--metrics-out", str(metrics), "--print-freq", "0",
    ]  # fmt: skip


def same_results(a: dict, b: dict) -> None:
    keys = ("epoch", "val_accuracy", "val_samples_seen", "train_samples_seen", "order_digest", "train_loss")
    assert [{k: e[k] for k in keys} for e in a["epochs"]] == [{k: e[k] for k in keys} for e in b["epochs"]]
    assert a["final_state_sha256"] == b["final_state_sha256"]


# --- the sampler -------------------------------------------------------------------------------------


@pytest.mark.parametrize("n,world", [(101, 1), (101, 2), (101, 3), (7, 4), (3, 5)])
def test_sampler_gives_distributed_samplers_order(n, world):
    for epoch in (0, 1):
        for rank in range(world):
            ours = ResumableDistributedSampler(range(n), num_replicas=world, rank=rank, seed=3)
            theirs = DistributedSampler(range(n), num_replicas=world, rank=rank, seed=3)
            ours.set_epoch(epoch)
            theirs.set_epoch(epoch)
            assert list(ours) == list(theirs) and len(ours) == len(theirs)


def test_sampler_resumed_with_the_same_world_continues_the_same_batches():
    world, batch = 2, 16
    full = [ResumableDistributedSampler(range(101), num_replicas=world, rank=r, seed=0) for r in range(world)]
    for s in full:
        s.set_epoch(1)
    state = full[0].state_dict(full[0].consumed(2, batch))
    assert state["consumed"] == 64
    for rank in range(world):
        resumed = ResumableDistributedSampler(range(101), num_replicas=world, rank=rank, seed=0)
        resumed.load_state_dict(state)
        resumed.set_epoch(1)  # keeps the loaded place
        assert list(resumed) == list(full[rank])[2 * batch :]
        resumed.set_epoch(2)  # the next epoch starts from its beginning
        assert resumed.start == 0


@pytest.mark.parametrize("new_world", [1, 3, 4])
def test_sampler_elastic_resume_neither_repeats_nor_skips(new_world):
    old = ResumableDistributedSampler(range(101), num_replicas=2, rank=0, seed=0)
    old.set_epoch(1)
    state = old.state_dict(64)
    taken = []
    for rank in range(new_world):
        s = ResumableDistributedSampler(range(101), num_replicas=new_world, rank=rank, seed=0)
        s.load_state_dict(state)
        s.set_epoch(1)
        taken += list(s.positions())
        assert s.total_size == 102  # the epoch keeps the padding it began with
    assert sorted(taken) == list(range(64, 102))
    counts = old.batches_per_rank(16)
    assert counts == [4, 4]


def test_sampler_refuses_another_seed_or_dataset():
    state = ResumableDistributedSampler(range(10), seed=0).state_dict(4)
    with pytest.raises(ValueError, match="seed"):
        ResumableDistributedSampler(range(10), seed=1).load_state_dict(state)
    with pytest.raises(ValueError, match="dataset_size"):
        ResumableDistributedSampler(range(11), seed=0).load_state_dict(state)


def test_schedule_is_a_function_of_progress():
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    schedule = OneCycleSchedule(opt, max_lr=1.0)
    assert opt.param_groups[0]["lr"] == pytest.approx(1 / 25)
    assert schedule.set_progress(0.3) == pytest.approx(1.0)
    assert schedule.lr_at(1.0) == pytest.approx(1 / 25 / 1e4)
    lrs = [schedule.lr_at(p / 100) for p in range(101)]
    assert lrs.index(max(lrs)) == 30
    again = OneCycleSchedule(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0), max_lr=0.5)
    schedule.set_progress(0.55)
    again.load_state_dict(schedule.state_dict())
    assert again.optimizer.param_groups[0]["lr"] == opt.param_groups[0]["lr"]


# --- single-process runs -----------------------------------------------------------------------------


BLOCK = ["--sampler", "block", "--block-size", "8"]


@pytest.mark.parametrize("sampler", [[], BLOCK], ids=["default", "block"])
def test_a_checkpoint_cut_off_mid_write_is_ignored(small, tmp_path, sampler):
    whole = train_main([*common(small, tmp_path / "a", tmp_path / "a.json", epochs=1), *sampler])
    ckpt = tmp_path / "b"
    train_main([*common(small, ckpt, tmp_path / "b.json", epochs=1), *sampler])
    newest, older = list_checkpoints(ckpt)  # the newest and one older are kept
    assert newest.name == "checkpoint-e00001-s000000000000.pt"  # the epoch's end
    assert older.name == "checkpoint-e00000-s000000000096.pt"  # after step 6 of 7
    data = newest.read_bytes()
    newest.write_bytes(data[: len(data) // 2])
    with pytest.warns(UserWarning, match="skipping unreadable checkpoint"):
        resumed = train_main([*common(small, ckpt, tmp_path / "b.json", epochs=1), *sampler])
    assert resumed["resumes"] == [{"epoch": 0, "step": 6, "samples_consumed": 96, "world_size": 1}]
    same_results(whole, resumed)


def test_resuming_a_finished_run_is_a_no_op_that_says_so(small, tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    first = train_main(common(small, ckpt, tmp_path / "m.json", epochs=1))
    before = {p.name: p.stat().st_mtime_ns for p in list_checkpoints(ckpt)}
    capsys.readouterr()
    again = train_main(common(small, ckpt, tmp_path / "m.json", epochs=1))
    assert "nothing to resume" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in list_checkpoints(ckpt)} == before
    assert again["epochs"] == first["epochs"] and again["resumes"] == []
    assert again["final_state_sha256"] == first["final_state_sha256"]


# --- real 2-process gloo runs --------------------------------------------------------------------------


@pytest.mark.slow
def test_elastic_resume_from_two_processes_to_one_neither_repeats_nor_skips(small, tmp_path):
    log = tmp_path / "samples"
    proc = subprocess.Popen(
        torchrun(2, *common(small, tmp_path / "c", tmp_path / "c.json")),
        env=child_env(**pause_env(1, 2), LANCE_COOKBOOK_SAMPLE_LOG=str(log)),
    )
    try:
        kill_rank_when_paused(proc, tmp_path / "c" / "checkpoint-e00001-s000000000064.pt", rank=1)
        assert proc.wait(timeout=300) != 0  # no restarts allowed: the job fails
    finally:
        proc.kill()
    one = [sys.executable, "-m", "lance_cookbook.train", *common(small, tmp_path / "c", tmp_path / "c.json")]
    subprocess.run(one, check=True, env=child_env(LANCE_COOKBOOK_SAMPLE_LOG=str(log)), timeout=300)
    metrics = json.loads((tmp_path / "c.json").read_text())
    assert metrics["resumes"] == [{"epoch": 1, "step": 2, "samples_consumed": 64, "world_size": 1}]
    assert [e["train_samples_seen"] for e in metrics["epochs"]] == [102, 102]
    records = [
        json.loads(line)
        for f in sorted(tmp_path.glob("samples.rank*"))
        for line in f.read_text().splitlines()
    ]
    # what the killed run trained after its last checkpoint was lost with it and trained again
    kept = [r for r in records if r["world"] == 1 or r["epoch"] == 0 or r["position"] < 64]
    for epoch in (0, 1):
        order = ResumableDistributedSampler(range(101), num_replicas=2, seed=0)
        order.set_epoch(epoch)
        expected = order.global_order()
        mine = sorted((r["position"], r["index"]) for r in kept if r["epoch"] == epoch)
        assert mine == list(enumerate(expected))  # every position once, with the index of the 2-rank order

"""Faults of training runs from the bug reports t3-ckpt-*, t3-train-*: unreadable checkpoints, hyperparameters
given on resume, object-store destinations, non-finite losses, label_names that do not fit, augmentation on
resume, and a stop requested by SIGTERM."""

from __future__ import annotations

import json
import math
import signal
from pathlib import Path

import lance
import numpy as np
import pyarrow as pa
import pytest
import torch
from test_checkpoint import common, same_results

from lance_cookbook import open_dataset
from lance_cookbook.recipe.collate import AUGMENT_SEED, ImageCollate, augment_seed
from lance_cookbook.recipe.sampler import ResumableDistributedSampler
from lance_cookbook.train import PREEMPTED_EXIT_CODE, build_parser, cli, train_one_epoch
from lance_cookbook.train import main as train_main
from lance_cookbook.training.checkpoint import (
    CheckpointError,
    checkpoint_name,
    list_checkpoints,
    load_checkpoint,
    load_latest,
    remote_filesystem,
    save_checkpoint,
)
from lance_cookbook.training.distributed import StopRequest
from lance_cookbook.training.models import build_model
from lance_cookbook.training.reporting import write_json
from lance_cookbook.training.run_state import Preempted, Run, TrainingDiverged, rng_state, set_rng_state
from lance_cookbook.training.schedule import OneCycleSchedule
from lance_cookbook.training.setup import MAX_CLASSES, EpochPositions, LabelError, count_classes

# --- unreadable checkpoints (t3-ckpt-unreadable-restart) ------------------------------------------------


def _state(marker: float = 1.0) -> dict:
    return {"model": {"w": torch.full((2,), marker)}, "rng": rng_state()}


def test_checkpoints_that_all_fail_to_load_are_an_error_naming_each(tmp_path):
    for epoch in (1, 2):
        path = save_checkpoint(_state(), tmp_path, checkpoint_name(epoch, 0), keep=5)
        path.write_bytes(path.read_bytes()[:100])
    with pytest.warns(UserWarning), pytest.raises(CheckpointError) as info:
        load_latest(tmp_path)
    message = str(info.value)
    assert "checkpoint-e00002-s000000000000.pt" in message and "checkpoint-e00001-s000000000000.pt" in message
    assert "cannot resume" in message and "\n" not in message
    assert load_latest(tmp_path / "empty") == (None, None)  # no checkpoint at all: a fresh start


def test_the_older_format_with_a_numpy_rng_array_loads_and_restores(tmp_path):
    np.random.seed(7)
    state = _state()
    kind, keys, position, has_gauss, gauss = state["rng"]["numpy"]
    state["rng"]["numpy"] = (
        kind,
        keys.numpy().astype(np.uint32),
        position,
        has_gauss,
        gauss,
    )  # before f32d649
    torch.save(state, tmp_path / checkpoint_name(1, 0))
    expected = np.random.random(3)
    np.random.seed(0)
    path, loaded = load_latest(tmp_path)
    set_rng_state(loaded["rng"])
    assert path.name == checkpoint_name(1, 0) and np.array_equal(np.random.random(3), expected)


def test_pruning_keeps_new_checkpoints_when_unreadable_ones_sort_later(tmp_path):
    later = tmp_path / checkpoint_name(2, 0)
    later.write_bytes(b"cut short")
    for consumed in (16, 32, 48):
        save_checkpoint(_state(), tmp_path, checkpoint_name(0, consumed), keep=2)
    names = [p.name for p in list_checkpoints(tmp_path)]
    assert names == [later.name, checkpoint_name(0, 48), checkpoint_name(0, 32)]


def test_a_run_over_unloadable_checkpoints_stops_before_training(small, tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    train_main(common(small, ckpt, tmp_path / "m.json", epochs=1))
    before = {p.name: p.read_bytes()[:50] for p in list_checkpoints(ckpt)}
    for p in list_checkpoints(ckpt):
        p.write_bytes(p.read_bytes()[:50])
    capsys.readouterr()
    with pytest.warns(UserWarning):
        assert cli(common(small, ckpt, tmp_path / "m.json", epochs=2)) == 2
    out, err = capsys.readouterr()
    assert err.startswith("error: no checkpoint in ") and "epoch 0 [" not in out
    assert {p.name: p.read_bytes() for p in list_checkpoints(ckpt)} == before  # nothing replaced or pruned


# --- hyperparameters given on resume (t3-ckpt-resume-ignores-lr) ------------------------------------------


def test_lr_and_weight_decay_given_on_resume_replace_the_checkpoints(capsys):
    saved_opt = torch.optim.AdamW([torch.zeros(1, requires_grad=True)], lr=3e-3, weight_decay=1e-4)
    saved = OneCycleSchedule(saved_opt, max_lr=3e-3)
    saved.set_progress(0.5)
    opt = torch.optim.AdamW([torch.zeros(1, requires_grad=True)], lr=0.3, weight_decay=0.05)
    schedule = OneCycleSchedule(opt, max_lr=0.3)
    opt.load_state_dict(saved_opt.state_dict())
    schedule.load_state_dict(saved.state_dict())
    args = build_parser().parse_args(["--train", "t", "--val", "v", "--lr", "0.3", "--weight-decay", "0.05"])
    run = Run(args, 0, 1, {}, [])
    assert run.apply_command_line(opt, schedule) == [
        "--lr 0.3 (was 0.003)",
        "--weight-decay 0.05 (was 0.0001)",
    ]
    assert opt.param_groups[0]["lr"] == pytest.approx(OneCycleSchedule.lr_at(schedule, 0.5))
    assert opt.param_groups[0]["lr"] == pytest.approx(0.2435, rel=1e-3)  # the new peak at the saved progress
    assert opt.param_groups[0]["weight_decay"] == 0.05
    assert "instead of the checkpoint's" in capsys.readouterr().out
    assert run.apply_command_line(opt, schedule) == []  # the same values: nothing to say


# --- object-store destinations (t3-ckpt-s3-dir-written-locally) -------------------------------------------


def test_unsupported_or_mangled_uris_are_refused():
    with pytest.raises(CheckpointError, match="gs://"):
        remote_filesystem("gs://bucket/ckpt")
    with pytest.raises(CheckpointError, match="lost a slash"):
        remote_filesystem(Path("s3://bucket/ckpt"))  # pathlib makes it 's3:/bucket/ckpt'
    assert remote_filesystem("relative/dir") is None


def test_checkpoints_and_metrics_go_to_the_bucket_and_resume_from_it(small, tmp_path, monkeypatch):
    pytest.importorskip("moto")
    boto3 = pytest.importorskip("boto3")
    from lance_cookbook.object_store import local_s3

    monkeypatch.chdir(tmp_path)
    with local_s3("bkt") as opts:
        so = [x for k, v in opts.items() for x in ("--storage-option", f"{k}={v}")]
        args = [*common(small, "s3://bkt/run/ckpt", "s3://bkt/run/m.json", epochs=1), *so]
        first = train_main(args)
        s3 = boto3.client(
            "s3",
            endpoint_url=opts["aws_endpoint"],
            aws_access_key_id=opts["aws_access_key_id"],
            aws_secret_access_key=opts["aws_secret_access_key"],
            region_name=opts["aws_region"],
        )
        listed = s3.list_objects_v2(Bucket="bkt")["Contents"]
        keys = sorted(o["Key"] for o in listed if not o["Key"].endswith("/"))  # pyarrow marks folders
        assert keys == [
            "run/ckpt/checkpoint-e00000-s000000000096.pt",
            "run/ckpt/checkpoint-e00001-s000000000000.pt",
            "run/m.json",
        ]
        metrics = json.loads(s3.get_object(Bucket="bkt", Key="run/m.json")["Body"].read())
        assert metrics["final_state_sha256"] == first["final_state_sha256"]
        path, state = load_latest("s3://bkt/run/ckpt", storage_options=opts)
        assert path == "s3://bkt/run/ckpt/checkpoint-e00001-s000000000000.pt" and "model" in state
        again = train_main(args)  # finds the bucket's checkpoint: nothing left to train
        assert again["final_state_sha256"] == first["final_state_sha256"] and again["resumes"] == []
        with pytest.raises(CheckpointError, match="bucket 'nope' does not exist"):
            train_main([*common(small, "s3://nope/ckpt", tmp_path / "m.json", epochs=1), *so])
    assert not (tmp_path / "s3:").exists()


# --- non-finite losses (t3-train-nan-loss-unnoticed) ------------------------------------------------------


def _batches(n: int) -> list:
    g = torch.Generator().manual_seed(0)
    return [
        (torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8, generator=g), torch.tensor([0, 1, 2, 0]))
        for _ in range(n)
    ]


def _one_pass(
    batches: list, criterion, after_step, *, epoch: int = 0, first_step: int = 0, stop=None
) -> None:
    """``train_one_epoch`` over ``batches`` (one a step, in order), one process, no checkpoints; the run's
    ``after_step`` hook gets the steps done."""
    torch.manual_seed(0)
    model = build_model("cnn", 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    args = build_parser().parse_args(["--train", "t", "--val", "v", "--batch-size", "1", "--print-freq", "0"])
    run = Run(args, 0, 1, {}, [], stop, after_step=lambda run, sampler, done: after_step(model, done))
    run.epoch, run.step = epoch, first_step
    sampler = ResumableDistributedSampler(batches, num_replicas=1, rank=0, shuffle=False)
    loader = torch.utils.data.DataLoader(batches, batch_size=None, sampler=sampler)
    schedule = OneCycleSchedule(optimizer, max_lr=1e-3)
    train_one_epoch(model, criterion, optimizer, schedule, loader, torch.device("cpu"), epoch, run)


class _NanAt:
    """Cross-entropy that returns NaN at call ``bad`` (1-based)."""

    def __init__(self, bad: int):
        self.bad, self.calls = bad, 0

    def __call__(self, logits, labels):
        self.calls += 1
        loss = torch.nn.functional.cross_entropy(logits, labels)
        return loss * float("nan") if self.calls == self.bad else loss


def test_a_non_finite_loss_stops_before_its_update_naming_epoch_and_step():
    seen, weights, models = [], {}, []

    def after_step(model, done: int) -> None:
        seen.append(done)
        weights.update({k: v.detach().clone() for k, v in model.named_parameters()})
        models[:] = [model]

    with pytest.raises(TrainingDiverged, match="at epoch 4, step 13: the loss is not finite"):
        _one_pass(_batches(5), _NanAt(3), after_step, epoch=4, first_step=10)
    assert seen == [1, 2]  # step 3 was not applied: the weights are those after step 2
    assert all(torch.equal(v, dict(models[0].named_parameters())[k]) for k, v in weights.items())


def test_metrics_are_strict_json(tmp_path):
    with pytest.raises(ValueError):
        write_json(tmp_path / "m.json", {"train_loss": math.nan})
    assert not (tmp_path / "m.json").exists()


def test_a_diverging_run_exits_1_without_nan_checkpoints_or_json(small, tmp_path, capsys):
    ckpt, metrics = tmp_path / "ckpt", tmp_path / "m.json"
    assert cli([*common(small, ckpt, metrics, epochs=2), "--lr", "1e30"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: training diverged at epoch 0, step ") and err.count("\n") == 1
    for path in list_checkpoints(ckpt):
        state = load_checkpoint(path)
        assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    if metrics.exists():
        json.loads(metrics.read_text(), parse_constant=lambda c: pytest.fail(f"{c} in the metrics"))


# --- label_names that do not fit the labels (t3-train-label-names-mismatch) ------------------------------


def _labelled(tmp_path: Path, labels: list[int], names) -> object:
    uri = str(tmp_path / f"labels-{len(list(tmp_path.iterdir()))}.lance")
    table = pa.table({"image": pa.array([b""] * len(labels)), "label": pa.array(labels, pa.int64())})
    if names is not None:
        table = table.replace_schema_metadata({"label_names": json.dumps(names)})
    lance.write_dataset(table, uri)
    return open_dataset(uri)


@pytest.mark.parametrize(
    "names,match",
    [
        (["a", "b", "c", "d", "e"], r"go up to 9 but its label_names names 5 classes"),
        ("cat,dog,eel", r"not a JSON list of class names: \"cat,dog,eel\""),
        ([1, 2, 3], "not a JSON list of class names"),
        ([str(i) for i in range(MAX_CLASSES + 1)], "names 100,001 classes"),
    ],
    ids=["stale", "string", "numbers", "huge"],
)
def test_label_names_that_do_not_fit_are_refused_naming_the_dataset(tmp_path, names, match):
    ds = _labelled(tmp_path, list(range(10)), names)
    with pytest.raises(LabelError, match=match) as info:
        count_classes(ds)
    assert repr(ds.uri) in str(info.value)


def test_class_count_from_names_or_labels(tmp_path):
    assert count_classes(_labelled(tmp_path, [0, 2, 1], [f"c{i}" for i in range(5)])) == 5  # unused names
    assert count_classes(_labelled(tmp_path, [0, 9, 3], None)) == 10
    with pytest.raises(LabelError, match="holds -1"):
        count_classes(_labelled(tmp_path, [0, -1], None))


# --- augmentation on resume (t3-ckpt-augment-resume-differs) ----------------------------------------------


def test_augmentation_follows_the_rows_seed_not_the_process_generator(id_dataset):
    rows = open_dataset(id_dataset).__getitems__([0, 1, 2])
    collate = ImageCollate(8, train=True, decoder="torchvision", dtype=torch.uint8)
    for row, position in zip(rows, (5, 6, 7), strict=True):
        row[AUGMENT_SEED] = augment_seed(0, 1, position)
    torch.manual_seed(1)
    first = collate(rows).image
    torch.manual_seed(2)
    assert torch.equal(collate(rows).image, first)
    pil = ImageCollate(8, train=True, decoder="pil", dtype=torch.uint8)
    torch.manual_seed(3)
    assert torch.equal(pil(rows).image, pil(rows).image)
    assert augment_seed(0, 1, 5) != augment_seed(0, 2, 5) != augment_seed(1, 1, 5)


def test_training_keys_carry_each_samples_epoch_and_position():
    sampler = ResumableDistributedSampler(range(11), num_replicas=2, rank=1, seed=0)
    keyed = EpochPositions(sampler)
    keyed.set_epoch(3)
    order = sampler.global_order()
    assert list(keyed) == [(3, p, order[p]) for p in range(1, 12, 2)] and len(keyed) == 6


@pytest.mark.slow
def test_augmented_run_resumed_with_a_worker_matches_an_uninterrupted_one(small, tmp_path):
    ckpt = tmp_path / "ckpt"
    args = [*common(small, ckpt, tmp_path / "m.json", epochs=1), "--augment", "--workers", "1"]
    whole = train_main(args)
    newest = list_checkpoints(ckpt)[0]
    newest.write_bytes(newest.read_bytes()[:100])  # resume from the mid-epoch one, in fresh workers
    with pytest.warns(UserWarning, match="skipping unreadable checkpoint"):
        resumed = train_main(args)
    assert resumed["resumes"] == [{"epoch": 0, "step": 6, "samples_consumed": 96, "world_size": 1}]
    same_results(whole, resumed)


# --- a stop requested by SIGTERM ----------------------------------------------------------------------------


def test_a_requested_stop_ends_after_the_step_with_exit_75_and_a_checkpoint(
    small, tmp_path, capsys, monkeypatch
):
    calls, stop = [], StopRequest()

    def after_step(model, done: int) -> None:
        calls.append(done)
        stop.signum = signal.SIGTERM  # asked after step 1, seen during step 2

    with pytest.raises(Preempted) as info:
        _one_pass(_batches(4), torch.nn.CrossEntropyLoss(), after_step, stop=stop)
    assert info.value.step == 2 and calls == [1, 2]  # asked during step 2: step 2 finishes
    monkeypatch.setattr(StopRequest, "requested", property(lambda self: True))
    ckpt = tmp_path / "ckpt"
    assert cli(common(small, ckpt, tmp_path / "m.json", epochs=2)) == PREEMPTED_EXIT_CODE
    expected = ckpt / checkpoint_name(0, 16)
    assert capsys.readouterr().err == f"preempted at epoch 0 step 1: checkpoint written to {expected}\n"
    assert [p.name for p in list_checkpoints(ckpt)] == [expected.name]

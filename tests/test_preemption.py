"""SIGTERM preemption under torchrun: every rank finishes its step, rank 0 checkpoints it, the job says where,
nothing of it stays alive, and the next launch ends bit-identical to an uninterrupted run."""

from __future__ import annotations

import json
import signal
import subprocess
import time

import pytest
from conftest import child_env, torchrun
from test_checkpoint import common, same_results

from lance_cookbook.testing import job_env, pause_env, wait_until_job_gone


@pytest.mark.slow
def test_sigterm_to_torchrun_checkpoints_the_step_and_resumes_bit_identically(small, tmp_path):
    subprocess.run(
        torchrun(2, *common(small, tmp_path / "a", tmp_path / "a.json")),
        check=True,
        env=child_env(),
        timeout=300,
    )
    job = job_env()
    proc = subprocess.Popen(
        torchrun(2, *common(small, tmp_path / "b", tmp_path / "b.json")),
        env=child_env(**pause_env(1, 2), **job),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        # 101 rows, 2 ranks, batch 16: 4 steps an epoch; ranks pause after the checkpoint of epoch 1, step 2
        paused = tmp_path / "b" / "checkpoint-e00001-s000000000064.pt"
        deadline = time.monotonic() + 300
        while not paused.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert paused.exists(), proc.communicate()[0]
        proc.send_signal(signal.SIGTERM)  # as SLURM or a spot instance's shutdown would
        out = proc.communicate(timeout=120)[0]
    finally:
        proc.kill()
    # the ranks left the pause at the signal, trained step 3 and stopped there together
    stopped = tmp_path / "b" / "checkpoint-e00001-s000000000096.pt"
    assert f"preempted at epoch 1 step 3: checkpoint written to {stopped}" in out, out
    assert stopped.exists()
    wait_until_job_gone(job, give_up_s=30)  # no rank, fork server or worker of the job left
    subprocess.run(
        torchrun(2, *common(small, tmp_path / "b", tmp_path / "b.json")),
        check=True,
        env=child_env(),
        timeout=300,
    )
    whole, resumed = (json.loads((tmp_path / f"{x}.json").read_text()) for x in "ab")
    assert resumed["resumes"] == [{"epoch": 1, "step": 3, "samples_consumed": 96, "world_size": 2}]
    same_results(whole, resumed)

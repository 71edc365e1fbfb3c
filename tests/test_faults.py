"""Processes die the way a cluster kills them (SIGKILL of one pid, Kernel > Interrupt) and leave nothing
behind: every process a job started ends, the launcher's output closes, later passes see every row once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest
import torch
import torch.multiprocessing
from conftest import child_env, torchrun
from test_checkpoint import common, same_results
from torch.utils.data import get_worker_info

from lance_cookbook import make_loader
from lance_cookbook.recipe.loader import WorkerInit
from lance_cookbook.testing import (
    job_env,
    job_processes,
    kill_rank_when_paused,
    pause_env,
    wait_until_gone,
    wait_until_job_gone,
)

linux_only = pytest.mark.skipif(sys.platform != "linux", reason="forkserver, pidfd and process groups: Linux")


def row_ids(rows: list[dict]) -> list[int]:
    return [r["id"] for r in rows]


class Reader(threading.Thread):
    """Reads a pipe to EOF, so a test can tell whether anything still holds its writing end."""

    def __init__(self, pipe):
        super().__init__(daemon=True)
        self.pipe, self.text = pipe, []

    def run(self) -> None:
        for line in self.pipe:
            self.text.append(line)


def test_worker_init_applies_the_starting_process_settings_and_the_callers_function(monkeypatch):
    """What a forkserver worker does not inherit: read when pickled (the loader starts its workers), applied
    in the worker (pytorch/pytorch#11201, #75269), then the caller's worker_init_fn."""
    calls = []
    init = WorkerInit(calls.append)
    previous = torch.multiprocessing.get_sharing_strategy()
    monkeypatch.setattr(torch.multiprocessing, "_sharing_strategy", "file_system")
    state = init.__getstate__()
    assert state["owner_pid"] == os.getpid() and state["sharing_strategy"] == "file_system"
    assert previous == "file_descriptor"


class ReportStrategy:
    """A collate that reports what the worker it runs in is set to."""

    def __call__(self, rows):
        return torch.multiprocessing.get_sharing_strategy(), get_worker_info() is not None, row_ids(rows)


@linux_only
def test_the_main_programs_sharing_strategy_reaches_the_workers(id_dataset, monkeypatch):
    """PyTorch's remedy for "Too many open files" set where its error message says, in the main program
    (t3-ldr-sharing-strategy): under forkserver the workers used to keep the default."""
    monkeypatch.setattr(torch.multiprocessing, "_sharing_strategy", "file_system")
    loader = make_loader(id_dataset, batch_size=8, num_workers=2, collate_fn=ReportStrategy(), columns=["id"])
    got = list(loader)
    assert {(strategy, in_worker) for strategy, in_worker, _ in got} == {("file_system", True)}
    assert sorted(i for *_, ids in got for i in ids) == list(range(53))


@linux_only
def test_an_interrupt_sent_to_the_process_group_leaves_persistent_workers_usable(id_dataset):
    """Jupyter's Kernel > Interrupt signals the kernel's whole process group, DataLoader workers included
    (open-mmlab/mmdetection#410, t3-ldr-notebook-interrupt): the next passes see every row exactly once."""
    loader = make_loader(id_dataset, batch_size=4, num_workers=2, collate_fn=row_ids, columns=["id"])
    assert sorted(i for batch in loader for i in batch) == list(range(53))
    seen = []
    with pytest.raises(KeyboardInterrupt):
        for batch in loader:
            seen += batch
            workers = loader._iterator._workers  # the persistent workers this pass uses
            for worker in workers:
                os.kill(worker.pid, signal.SIGINT)  # what killpg(SIGINT) does to them
            raise KeyboardInterrupt  # and to the kernel's main thread
    assert 0 < len(seen) < 53
    for _ in range(2):
        assert sorted(i for batch in loader for i in batch) == list(range(53))
    assert all(worker.is_alive() for worker in workers)


@pytest.mark.slow
@linux_only
def test_a_killed_notebook_kernel_after_an_interrupt_leaves_nothing_running(
    id_dataset, tmp_path, monkeypatch
):
    """A real kernel driven by jupyter_client, as JupyterLab drives it: Kernel > Interrupt during a pass,
    the same loader again (every row once), then the kernel SIGKILLed alone (the OOM killer): no process of
    it survives."""
    from jupyter_client import KernelManager

    spec = tmp_path / "kernels" / "probe"
    spec.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    (spec / "kernel.json").write_text(
        json.dumps({"argv": argv, "display_name": "probe", "language": "python"})
    )
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path))
    marker = job_env()
    manager = KernelManager(kernel_name="probe")
    manager.start_kernel(env=child_env(**marker))
    client = manager.client()
    client.start_channels()

    def run(code: str) -> tuple[str, str]:
        out = []
        reply = client.execute_interactive(
            code, timeout=120, output_hook=lambda m: out.append(m["content"].get("text", ""))
        )
        return reply["content"]["status"], "".join(out)

    try:
        client.wait_for_ready(timeout=120)
        assert run(
            "import time, lance_cookbook as lc\n"
            f"loader = lc.make_loader({id_dataset!r}, batch_size=4, num_workers=2, columns=['id'], "
            "collate_fn=list)\nprint(sum(len(b) for b in loader))"
        ) == ("ok", "53\n")
        msg_id = client.execute("for b in loader:\n    time.sleep(0.5)\n")
        time.sleep(1.0)  # inside the pass
        manager.interrupt_kernel()
        while (reply := client.get_shell_msg(timeout=60))["parent_header"].get("msg_id") != msg_id:
            pass
        assert reply["content"]["status"] == "error" and reply["content"]["ename"] == "KeyboardInterrupt"
        for _ in range(2):
            assert run("print(sorted(r['id'] for b in loader for r in b) == list(range(53)))") == (
                "ok",
                "True\n",
            )
        assert len(job_processes(marker)) >= 4  # the kernel, the fork server, two workers
        os.kill(manager.provisioner.process.pid, signal.SIGKILL)  # the kernel alone, not its group
        wait_until_job_gone(marker, give_up_s=30)
    finally:
        client.stop_channels()
        manager.shutdown_kernel(now=True)
        for p in job_processes(marker):
            p.kill()


@pytest.mark.slow
@linux_only
def test_a_rank_sigkilled_alone_restarts_matches_and_leaves_nothing_behind(small, tmp_path):
    """One rank killed by pid (its DataLoader workers and fork server left alone, as the OOM killer leaves
    them) under --max-restarts 1: the run matches an uninterrupted one, the launcher's output reaches EOF
    after it exits, and no process the job started is alive then (found by the marker every child inherits,
    never by name)."""
    workers = ["--workers", "1"]
    subprocess.run(
        torchrun(2, *common(small, tmp_path / "a", tmp_path / "a.json"), *workers),
        check=True,
        env=child_env(),
        timeout=300,
        capture_output=True,
    )
    marker = job_env()
    proc = subprocess.Popen(
        torchrun(2, *common(small, tmp_path / "b", tmp_path / "b.json"), *workers, restarts=1),
        env=child_env(**pause_env(1, 2), **marker),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    reader = Reader(proc.stdout)
    reader.start()
    try:
        kill = kill_rank_when_paused(proc, tmp_path / "b" / "checkpoint-e00001-s000000000064.pt", rank=1)
        assert len(kill.left) >= 2  # its fork server and its worker, left alone by the kill
        wait_until_gone(lambda: kill.left, give_up_s=30)  # they go while the job goes on
        assert proc.wait(timeout=300) == 0, "".join(reader.text)[-3000:]
        reader.join(30)
        assert not reader.is_alive(), "the launcher's output is still held open 30 s after it exited"
        wait_until_job_gone(marker, give_up_s=30)
    finally:
        proc.kill()
        for p in job_processes(marker):
            p.kill()
    whole, resumed = (json.loads((tmp_path / f"{x}.json").read_text()) for x in "ab")
    assert resumed["resumes"] == [{"epoch": 1, "step": 2, "samples_consumed": 64, "world_size": 2}]
    same_results(whole, resumed)


def test_job_processes_finds_a_marked_child_and_not_an_unmarked_one():
    marker = job_env()
    marked = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE,
                              env=child_env(**marker))  # fmt: skip
    plain = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        assert [p.pid for p in job_processes(marker)] == [marked.pid]
        with pytest.raises(
            RuntimeError, match=rf"1 process\(es\) alive after 0 s: {marked.pid} \(.*python -c"
        ):
            wait_until_job_gone(marker, give_up_s=0)
    finally:
        for p in (marked, plain):
            p.kill()
            p.wait()
    assert wait_until_job_gone(marker, give_up_s=5) >= 0


# Programs that start processes, then wait to be killed: {name: (source, processes of the job once ready)}
UNTIL_KILLED = {
    # a training process or a notebook kernel with a loader: itself, the fork server, two workers
    "loader": (
        """
import sys
import lance_cookbook as lc
loader = lc.make_loader(sys.argv[1], batch_size=4, num_workers=2, columns=["id"], collate_fn=list)
assert sum(len(b) for b in loader) == 53
""",
        4,
    ),
    # a conversion and its checking pool (workers blocked on their task queue): itself, fork server, 2 workers
    "conversion": (
        """
from data_prep.check import check_items
from data_prep.pool import CheckPool
pool = CheckPool(2)
assert pool._pool.submit(check_items, []).result() == []  # the workers have started
""",
        4,
    ),
    # a notebook that started a command (torchrun, a conversion): itself and the command
    "command": (
        """
import sys
from lance_cookbook.notebook.commands import start_command
proc = start_command([sys.executable, "-c", "import time; time.sleep(600)"])
""",
        2,
    ),
}


@linux_only
@pytest.mark.parametrize(
    "program",
    [pytest.param(p, marks=pytest.mark.slow) if p == "loader" else p for p in sorted(UNTIL_KILLED)],
)
def test_a_sigkilled_process_leaves_nothing_behind_and_closes_its_output(program, id_dataset, tmp_path):
    """The OOM killer ends one process alone. What it started goes too: forkserver workers watch it, not
    their parent (the fork server, which then exits; ../shared/GUIDE.md, measured 2026-12-03), and a
    command gets SIGTERM (PR_SET_PDEATHSIG); nothing holds its output open any more."""
    source, expected = UNTIL_KILLED[program]
    script = tmp_path / "until_killed.py"
    # everything under the main guard: forkserver and spawn workers import the main script again
    body = source.strip() + "\nprint('ready', flush=True)\nsys.stdin.read()  # until killed"
    script.write_text("import sys\n\nif __name__ == '__main__':\n" + textwrap.indent(body, "    ") + "\n")
    marker = job_env()
    proc = subprocess.Popen(
        [sys.executable, str(script), id_dataset], env=child_env(**marker), text=True,
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    reader = Reader(proc.stdout)
    reader.start()
    try:
        while "ready\n" not in reader.text or len(job_processes(marker)) < expected:
            assert proc.poll() is None, "".join(reader.text)
            time.sleep(0.05)
        proc.kill()
        proc.wait()
        wait_until_job_gone(marker, give_up_s=30)
        reader.join(30)
        assert not reader.is_alive()  # EOF: no process holds the output any more
    finally:
        proc.kill()
        for p in job_processes(marker):
            p.kill()

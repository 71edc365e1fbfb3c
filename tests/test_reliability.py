"""Bad input: one clear line naming the file, exit non-zero, nothing partial left behind."""

from __future__ import annotations

import _thread
import gc
import multiprocessing.forkserver
import re
import signal
import struct
import sys
import threading
import zlib
from multiprocessing import resource_tracker
from pathlib import Path

import lance
import pytest
from conftest import encode, make_imagefolder, photo

from data_prep import convert as convert_module
from data_prep import pool as pool_module
from data_prep import sources, write
from data_prep.check import ConversionError, InvalidImage, check_image
from data_prep.convert import main


def png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims ``width x height`` pixels: a decompression bomb's signature."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0"))
        + chunk(b"IEND", b"")
    )


def run_cli(capsys, *args) -> tuple[int, str, str]:
    code = main([*map(str, args), "--no-progress"])
    out, err = capsys.readouterr()
    return code, out, err


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".partial-" in p.name)


def jpeg_bytes() -> bytes:
    return encode(photo(9, (64, 64)), "JPEG")


BAD_FILES = {
    "truncated.jpg": lambda: jpeg_bytes()[: len(jpeg_bytes()) // 2],
    "text.jpg": lambda: b"this is a text file, not a JPEG\n",
    "empty.jpg": lambda: b"",
    "bomb.png": lambda: png_claiming(20000, 20000),
    "notes.txt": lambda: b"class notes",
}
REASONS = {
    "truncated.jpg": "truncated",
    "text.jpg": "not a readable image",
    "empty.jpg": "empty file",
    "bomb.png": "decompression bomb",
    "notes.txt": "unsupported extension '.txt'",
}


@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_bad_file_stops_with_one_line_and_nothing_at_output(tmp_path, capsys, name):
    folder = make_imagefolder(tmp_path / "src", per_class=2)
    (folder / "dog" / name).write_bytes(BAD_FILES[name]())
    out = tmp_path / "out.lance"
    code, stdout, err = run_cli(capsys, "--source", f"imagefolder:{folder}", "--output", out)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert f"dog/{name}" in lines[0] and REASONS[name] in lines[0], lines[0]
    assert not out.exists() and leftovers(tmp_path) == []


def test_skip_invalid_finishes_lists_and_records_the_skipped(tmp_path, capsys):
    folder = make_imagefolder(tmp_path / "src", per_class=2)
    for name, make in BAD_FILES.items():
        (folder / "cat" / name).write_bytes(make())
    out = tmp_path / "out.lance"
    code, stdout, _ = run_cli(capsys, "--source", f"imagefolder:{folder}", "--output", out, "--skip-invalid")
    assert code == 0
    assert f"skipped {len(BAD_FILES)} invalid" in stdout
    assert all(f"cat/{name}" in stdout for name in BAD_FILES)
    ds = lance.dataset(str(out))
    assert ds.count_rows() == 6
    skipped = write.conversion_record(ds)["skipped"]
    assert sorted(s.split(":")[0] for s in skipped) == sorted(f"cat/{n}" for n in BAD_FILES)


def test_bomb_limit_follows_pil_setting(monkeypatch):
    from PIL import Image

    small = encode(photo(0, (40, 40)), "PNG")
    assert check_image(small, "x") == (40, 40)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(InvalidImage, match="decompression bomb.*1,600 pixels"):
        check_image(small, "x")


@pytest.mark.parametrize(
    "layout, message",
    [
        ("missing", "does not exist"),
        ("empty-source", "holds no class folders"),
        ("empty-class", "class folder .*/bird holds no files"),
        ("a-file", "is not a folder"),
    ],
)
def test_bad_sources_are_named(tmp_path, capsys, layout, message):
    src = tmp_path / "src"
    if layout == "empty-source":
        src.mkdir()
    elif layout == "empty-class":
        make_imagefolder(src, per_class=1)
        (src / "bird").mkdir()
    elif layout == "a-file":
        src.write_text("x")
    out = tmp_path / "out.lance"
    code, _, err = run_cli(capsys, "--source", f"imagefolder:{src}", "--output", out)
    assert code == 2 and str(src) in err
    assert re.search(message, err), err
    assert not out.exists() and leftovers(tmp_path) == []


def test_output_that_is_a_file_or_foreign_folder_is_refused(tmp_path, capsys, imagefolder):
    target = tmp_path / "taken"
    target.write_text("precious")
    code, _, err = run_cli(capsys, "--source", f"imagefolder:{imagefolder}", "--output", target)
    assert code == 2 and "is a file" in err and target.read_text() == "precious"
    folder = tmp_path / "foreign"
    folder.mkdir()
    (folder / "keep.txt").write_text("mine")
    code, _, err = run_cli(
        capsys, "--source", f"imagefolder:{imagefolder}", "--output", folder, "--overwrite"
    )
    assert code == 2 and "not a Lance dataset" in err and (folder / "keep.txt").read_text() == "mine"


def test_existing_dataset_needs_overwrite_and_keeps_its_version(tmp_path, capsys, imagefolder):
    out = tmp_path / "out.lance"
    assert run_cli(capsys, "--source", f"imagefolder:{imagefolder}", "--output", out)[0] == 0
    code, _, err = run_cli(capsys, "--source", "digits", "--output", out)
    assert code == 2 and "--overwrite" in err
    assert lance.dataset(str(out)).version == 1 and lance.dataset(str(out)).count_rows() == 12


def test_failed_overwrite_keeps_previous_version_latest(tmp_path, capsys, imagefolder):
    out = tmp_path / "out.lance"
    assert run_cli(capsys, "--source", "digits", "--split", "test", "--output", out)[0] == 0
    (imagefolder / "dog" / "zz-broken.jpg").write_bytes(b"junk")
    code, _, err = run_cli(capsys, "--source", f"imagefolder:{imagefolder}", "--output", out, "--overwrite")
    assert code == 2 and "dog/zz-broken.jpg" in err
    ds = lance.dataset(str(out))
    assert ds.version == 1 and ds.count_rows() == 360


@pytest.mark.parametrize("existing", [False, True])
def test_interrupted_conversion_leaves_previous_state(tmp_path, capsys, monkeypatch, existing):
    """Ctrl-C halfway through the stream: no new dataset, or the previous version still the latest."""
    folder = make_imagefolder(tmp_path / "src", classes=("a", "b"), per_class=30, size=(16, 16))
    out = tmp_path / "out.lance"
    if existing:
        assert run_cli(capsys, "--source", "digits", "--split", "test", "--output", out)[0] == 0
    real = pool_module.checked_records
    calls = {"n": 0}

    def interrupt_halfway(records):
        calls["n"] += 1
        if calls["n"] == 4:  # after 3 batches of 8 of the 60 records
            raise KeyboardInterrupt
        return real(records)

    monkeypatch.setattr(pool_module, "checked_records", interrupt_halfway)
    monkeypatch.setattr(pool_module, "ThreadPoolExecutor", _InlineExecutor)
    args = ["--source", f"imagefolder:{folder}", "--output", out, "--overwrite", "--rows-per-file", "8"]
    code, _, err = run_cli(capsys, *args, "--batch-rows", "8")
    assert code == 130 and "interrupted" in err
    assert calls["n"] == 4  # it really stopped halfway
    if existing:
        ds = lance.dataset(str(out))
        assert ds.version == 1 and ds.count_rows() == 360
    else:
        assert not out.exists()
    assert leftovers(tmp_path) == []


class _InlineExecutor:
    """Runs ``map`` in the calling thread, so a KeyboardInterrupt raised by a record surfaces as it would."""

    def __init__(self, *args, **kwargs):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def map(self, fn, items):
        return map(fn, items)


def test_unknown_source_kind(tmp_path, capsys):
    code, _, err = run_cli(capsys, "--source", "ftp:somewhere", "--output", tmp_path / "o.lance")
    assert code == 2 and "unknown source 'ftp:somewhere'" in err


def test_no_remote_code_or_pickles_anywhere():
    """Security: no trust_remote_code, nothing pickled to disk, in the package or the notebooks."""
    from conftest import REPO

    needles = ("trust_remote_code", "pickle.dump(", "pickle.load(", "weights_only=False")
    for path in [
        *REPO.glob("lance_cookbook/*.py"),
        *REPO.glob("data_prep/*.py"),
        *REPO.glob("notebooks/*.ipynb"),
    ]:
        text = path.read_text()
        for needle in needles:
            assert needle not in text, f"{needle} in {path}"
        # checkpoints load, but only as tensors and plain containers (no pickled objects run on load)
        for call in re.findall(r"torch\.load\([^)]*\)", text):
            assert "weights_only=True" in call, f"{call} in {path}"


# ------------------------------------------------------------------ checking in worker processes (CheckPool)
def _children(parent: str = "self") -> set[int]:
    """PIDs of this process's live descendants (Linux /proc); a zombie is not counted. Descendants, not
    children: forkserver workers are children of the fork server."""
    pids = set()
    for task in Path(f"/proc/{parent}/task").iterdir():
        try:
            children = (task / "children").read_text().split()
        except OSError:  # the process or thread ended meanwhile
            continue
        for pid in children:
            try:
                alive = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
            except OSError:
                continue
            if alive:
                pids |= {int(pid)} | _children(pid)
    return pids


def small_folder(root: Path, classes=("a", "b"), per_class: int = 100) -> Path:
    """``root/<class>/<i>.jpg``: many small real JPEGs of one size, cheap to write and to check."""
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            (root / c / f"{i:03d}.jpg").write_bytes(encode(photo(i, (16, 12)), "JPEG"))
    return root


linux_only = pytest.mark.skipif(sys.platform != "linux", reason="counts child processes through /proc")


@pytest.fixture
def new_children():
    """A function listing the children started since the test began (a resource tracker, a moto server
    or Ray started by an earlier test of the session stay, and are not this test's)."""
    # A spawn pool's queues start multiprocessing's resource tracker, and a forkserver pool the fork
    # server; both live as long as this process
    resource_tracker.ensure_running()
    if pool_module.start_context().get_start_method() == "forkserver":
        multiprocessing.forkserver.ensure_running()
    before = _children()
    return lambda: _children() - before


@pytest.fixture
def processes(monkeypatch):
    """Check with two worker processes whatever the source's size (the default is threads below 2,000)."""
    monkeypatch.setattr(pool_module, "PROCESS_MIN_RECORDS", 0)
    started = []
    real = pool_module.CheckPool.__init__

    def spy(self, workers):
        real(self, workers)
        started.append(self)

    monkeypatch.setattr(pool_module.CheckPool, "__init__", spy)
    return started


@linux_only
def test_process_check_writes_the_same_table_as_threads(tmp_path, processes, new_children):
    folder = make_imagefolder(tmp_path / "src", per_class=70, size=(20, 16))
    (folder / "cat" / "gray.png").write_bytes(encode(photo(3, (30, 20)).convert("L"), "PNG"))
    by_threads = convert_module.convert(
        f"imagefolder:{folder}", tmp_path / "t.lance", workers=1, batch_rows=100, progress=False
    )
    assert not processes
    by_processes = convert_module.convert(
        f"imagefolder:{folder}", tmp_path / "p.lance", workers=2, batch_rows=100, progress=False
    )
    assert len(processes) == 1 and by_processes.rows == by_threads.rows == 211
    t, p = (lance.dataset(str(tmp_path / n)).to_table() for n in ("t.lance", "p.lance"))
    assert p.equals(t)
    assert new_children() == set()


@linux_only
@pytest.mark.parametrize("name", ["truncated.jpg", "bomb.png", "notes.txt", "empty.jpg"])
def test_process_check_names_the_bad_file_and_stops_its_workers(
    tmp_path, capsys, processes, name, new_children
):
    folder = small_folder(tmp_path / "src", classes=("cat", "dog"), per_class=40)
    (folder / "dog" / f"020-{name}").write_bytes(BAD_FILES[name]())
    out = tmp_path / "out.lance"
    code, _, err = run_cli(capsys, "--source", f"imagefolder:{folder}", "--output", out, "--workers", "2")
    assert len(processes) == 1
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    assert f"dog/020-{name}" in lines[0] and REASONS[name] in lines[0], lines[0]
    assert not out.exists() and leftovers(tmp_path) == []
    assert new_children() == set()


@linux_only
def test_process_check_skip_invalid_keeps_source_order(tmp_path, capsys, processes):
    folder = small_folder(tmp_path / "src", classes=("a", "b"), per_class=100)
    (folder / "a" / "050-bad.jpg").write_bytes(b"junk")
    out = tmp_path / "out.lance"
    code, stdout, _ = run_cli(
        capsys, "--source", f"imagefolder:{folder}", "--output", out, "--workers", "2", "--skip-invalid"
    )
    assert code == 0 and "a/050-bad.jpg" in stdout
    got = lance.dataset(str(out)).to_table(columns=["source", "id"]).to_pylist()
    expected = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.jpg") if "bad" not in p.name)
    assert [r["source"] for r in got] == expected and [r["id"] for r in got] == list(range(200))


@linux_only
def test_interrupted_process_check_leaves_nothing_running(
    tmp_path, capsys, monkeypatch, processes, new_children
):
    """Ctrl-C while worker processes are checking: exit 130, no dataset, no worker left behind."""
    folder = small_folder(tmp_path / "src", classes=("a", "b"), per_class=150)
    real_batches = write.record_batches

    def interrupt_after_first_batch(checked, *args, **kwargs):
        for i, batch in enumerate(real_batches(checked, *args, **kwargs)):
            if i == 1:
                raise KeyboardInterrupt
            yield batch

    monkeypatch.setattr(write, "record_batches", interrupt_after_first_batch)
    out = tmp_path / "out.lance"
    args = ["--source", f"imagefolder:{folder}", "--output", out, "--workers", "2", "--batch-rows", "64"]
    code, _, err = run_cli(capsys, *args)
    assert code == 130 and "interrupted" in err and len(processes) == 1
    assert not out.exists() and leftovers(tmp_path) == []
    assert new_children() == set()


@linux_only
@pytest.mark.parametrize("checker", ["threads", "processes"])
def test_ctrl_c_in_the_main_thread_stops_everything(tmp_path, capsys, monkeypatch, checker, new_children):
    """A real Ctrl-C lands in the main thread, inside lance's writer, while the reader thread is checking."""
    # interrupt_main does nothing where SIGINT is not Python's handler, and a KeyboardInterrupt raised while
    # the main thread runs a finalizer is printed and dropped ("Exception ignored in"): start with the
    # default handler and with no garbage left by earlier tests to finalize mid-run
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    gc.collect()
    if checker == "processes":
        monkeypatch.setattr(pool_module, "PROCESS_MIN_RECORDS", 0)
    folder = small_folder(tmp_path / "src", classes=("a", "b"), per_class=150)
    real_batches = write.record_batches
    produced = []

    def interrupt_main_after_first_batch(checked, *args, **kwargs):
        for batch in real_batches(checked, *args, **kwargs):
            produced.append(batch.num_rows)
            if len(produced) == 2:
                _thread.interrupt_main()  # what SIGINT does: KeyboardInterrupt in the main thread
                threading.Event().wait(0.5)  # the main thread stops while this thread is still here
            yield batch

    monkeypatch.setattr(write, "record_batches", interrupt_main_after_first_batch)
    out = tmp_path / "out.lance"
    args = ["--source", f"imagefolder:{folder}", "--output", out, "--workers", "2", "--batch-rows", "32"]
    gc.disable()
    try:
        code, _, err = run_cli(capsys, *args)
    finally:
        gc.enable()
        signal.signal(signal.SIGINT, previous)
    assert code == 130 and "interrupted" in err, err
    assert len(produced) < 300 // 32  # it stopped early
    assert not out.exists() and leftovers(tmp_path) == []
    assert new_children() == set()
    assert [t for t in threading.enumerate() if t.name.startswith("check")] == []


@linux_only
def test_process_check_with_max_rows_stops_early(tmp_path, processes, new_children):
    folder = small_folder(tmp_path / "src", classes=("a", "b"), per_class=200)
    out = tmp_path / "out.lance"
    summary = convert_module.convert(
        f"imagefolder:{folder}", out, workers=2, batch_rows=64, max_rows=100, progress=False
    )
    assert len(processes) == 1 and summary.rows == 100
    got = lance.dataset(str(out)).to_table(columns=["source"]).column("source").to_pylist()
    assert got == [f"a/{i:03d}.jpg" for i in range(100)]
    assert new_children() == set()


@linux_only
def test_worker_killed_during_conversion_is_named_and_cleaned_up(
    tmp_path, capsys, monkeypatch, processes, new_children
):
    folder = small_folder(tmp_path / "src", classes=("a", "b", "c"), per_class=400)
    real_batches = write.record_batches

    def kill_a_worker_after_first_batch(checked, *args, **kwargs):
        for i, batch in enumerate(real_batches(checked, *args, **kwargs)):
            if i == 0:
                for proc in processes[0].processes():
                    proc.kill()
            yield batch

    monkeypatch.setattr(write, "record_batches", kill_a_worker_after_first_batch)
    out = tmp_path / "out.lance"
    args = ["--source", f"imagefolder:{folder}", "--output", out, "--workers", "2", "--batch-rows", "64"]
    code, _, err = run_cli(capsys, *args)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    # under forkserver the server sometimes loses a killed worker's status (multiprocessing reports 255);
    # the message then says so instead of naming the signal: both are the right answer
    how = r"(was killed by signal 9|died \(killed, or out of memory\? the fork server lost its exit status\))"
    assert re.search(rf"checking worker process \(pid \d+\) {how}.* while checking [abc]/", err), err
    assert not out.exists() and leftovers(tmp_path) == []
    assert new_children() == set()


def test_unexpected_parser_failure_is_named_not_raised(monkeypatch):
    """A plugin failing in its own way (struct.error, TypeError ...) is an invalid image, named as such."""
    from data_prep import check

    png = encode(photo(1, (20, 20)), "PNG")

    def broken_open(*args, **kwargs):
        raise struct.error("unpack requires a buffer of 4 bytes")

    monkeypatch.setattr(check.Image, "open", broken_open)
    with pytest.raises(check.InvalidImage, match=r"^x.png: corrupt image \(error: unpack requires"):
        check.check_image(png, "x.png")
    assert check.check_items([png]) == ["corrupt image (error: unpack requires a buffer of 4 bytes)"]


@linux_only
def test_dead_check_worker_is_reported_naming_the_records(tmp_path, new_children):
    folder = small_folder(tmp_path / "src", classes=("a",), per_class=10)
    records = list(sources.open_source(f"imagefolder:{folder}").records)
    pool = pool_module.CheckPool(1)
    try:
        pool._pool.submit(int).result()  # the pool starts its worker on the first task
        # CheckPool.processes reads ProcessPoolExecutor's private _processes: this fails if CPython changes it
        (worker,) = pool.processes()
        worker.kill()
        worker.join()
        with pytest.raises(
            ConversionError,
            # a forkserver child's status reaches the pool through the server, which may lose it
            match=r"checking worker process \(pid \d+\) (was killed by signal 9|died \(killed).*"
            r"a/000.jpg to a/009.jpg",
        ):
            for batch in pool.checked([records]):
                list(batch)
    finally:
        pool.close()
    assert new_children() == set()

"""The loader benchmark end to end (--quick, small images) and the synthetic image folders it runs on."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import lance
import pyarrow as pa
import pytest
import torch
from PIL import Image

from data_prep.disk_usage import dir_bytes
from lance_cookbook import ImageCollate, LanceImageDataset, bench
from lance_cookbook.bench import cache, measure, synthetic

OPTIONS = [
    "--imagefolder",
    "--lance",
    "--shuffle",
    "--image-size",
    "--batch-size",
    "--workers",
    "--epochs",
    "--json",
    "--plot",
    "--breakdown",
    "--quick",
    "--generate",
    "--generate-size",
    "--classes",
    "--seed",
    "--loaders",
    "--work-dir",
    "--cache",
    "--no-progress",
]


def _digests(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha1(p.read_bytes()).hexdigest() for p in root.rglob("*.jpg")
    }


def test_help_mentions_every_option(capsys):
    with pytest.raises(SystemExit) as exit_:
        bench.main(["--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    for option in OPTIONS:
        assert option in text, option
    parsed = {s for a in bench.build_parser()._actions for s in a.option_strings if s.startswith("--")}
    assert parsed - {"--help"} == set(OPTIONS)  # every option the parser has is documented and tested here
    for key in bench.LOADERS:
        assert key in text, key


def test_synthetic_folder_layout_sizes_distinct(tmp_path):
    made = synthetic.generate_imagefolder(tmp_path / "a", 60, "40x30", classes=3, seed=1, workers=2)
    assert (made.count, made.classes, made.size) == (60, 3, (40, 30))
    root = tmp_path / "a"
    assert sorted(p.name for p in root.iterdir()) == ["class_000", "class_001", "class_002"]
    for k in range(3):
        assert len(list((root / f"class_{k:03d}").glob("*.jpg"))) == 20
    digests = _digests(root)
    assert len(digests) == 60 and len(set(digests.values())) == 60  # every image differs
    for path in root.rglob("*.jpg"):
        with Image.open(path) as im:
            assert (im.format, im.mode, im.size) == ("JPEG", "RGB", (40, 30))
    assert made.bytes == sum(p.stat().st_size for p in root.rglob("*.jpg"))


def test_synthetic_is_deterministic(tmp_path):
    synthetic.generate_imagefolder(tmp_path / "a", 24, (32, 32), classes=4, seed=7, workers=2)
    synthetic.generate_imagefolder(tmp_path / "b", 24, (32, 32), classes=4, seed=7, workers=1)
    synthetic.generate_imagefolder(tmp_path / "c", 24, (32, 32), classes=4, seed=8)
    a, b, c = (_digests(tmp_path / x) for x in "abc")
    assert a == b  # same seed, same bytes, whatever the thread count
    assert a.keys() == c.keys() and not set(a.values()) & set(c.values())


def test_synthetic_cli_and_errors(tmp_path, capsys):
    out = tmp_path / "cli"
    assert synthetic.main(["--output", str(out), "--count", "5", "--size", "20x10", "--classes", "2"]) == 0
    assert "wrote 5 JPEGs of 20x10" in capsys.readouterr().out
    assert synthetic.main(["--output", str(out), "--count", "5"]) == 2  # not empty
    assert "not empty" in capsys.readouterr().err
    assert synthetic.parse_size("32") == (32, 32)
    with pytest.raises(ValueError):
        synthetic.parse_size("axb")


def _jpeg(color: tuple[int, int, int], size=(24, 16)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="JPEG")
    return buf.getvalue()


def test_arrow_collate_matches_image_collate(tmp_path):
    blobs = [_jpeg((10 * i, 255 - 10 * i, 7 * i), size=(24 + i, 16)) for i in range(12)]
    table = pa.table({"image": pa.array(blobs, pa.binary()), "label": list(range(12)), "id": list(range(12))})
    uri = str(tmp_path / "t.lance")
    lance.write_dataset(table, uri)
    reference = ImageCollate(8, decoder="torchvision", dtype=torch.uint8)
    arrow = bench.ArrowImageCollate(8, decoder="torchvision", dtype=torch.uint8)
    rows_ds = LanceImageDataset(uri)
    arrow_ds = bench.ArrowLanceDataset(uri)
    indices = [11, 3, 5, 0]
    rows = rows_ds.__getitems__(indices)
    assert set(rows[0]) == {"image", "label"}  # projected: no id column
    want = reference(rows_ds.__getitems__(sorted(indices)))  # the Arrow path reads in row order
    got = arrow(arrow_ds.__getitems__(indices))
    assert torch.equal(got.image, want.image) and torch.equal(got.label, want.label)
    assert got.label.dtype == torch.int64
    # a sliced table (non-zero Arrow offset) is viewed at the right bytes
    sliced = arrow_ds.__getitems__([0, 1, 2, 3]).slice(1, 2)
    assert torch.equal(arrow(sliced).image, reference(sliced.to_pylist()).image)
    # a PNG in the batch: no all-JPEG fast path, same result as ImageCollate
    png = io.BytesIO()
    Image.new("RGB", (9, 9), (1, 2, 3)).save(png, format="PNG")
    mixed = pa.table({"image": pa.array([blobs[0], png.getvalue()], pa.binary()), "label": [0, 1]})
    assert bench.jpeg_views(mixed.column("image")) is None
    assert torch.equal(arrow(mixed).image, reference(mixed.to_pylist()).image)


def _quick_args(tmp_path: Path, workers: int, *extra: str) -> list[str]:
    return [
        "--imagefolder",
        str(tmp_path / "img"),
        "--generate",
        "192",
        "--generate-size",
        "32x32",
        "--classes",
        "4",
        "--image-size",
        "32",
        "--batch-size",
        "32",
        "--workers",
        str(workers),
        "--quick",
        "--json",
        str(tmp_path / "bench.json"),
        "--plot",
        str(tmp_path / "bench.png"),
        "--work-dir",
        str(tmp_path / "work"),
        "--no-progress",
        *extra,
    ]


@pytest.mark.slow  # a benchmark run
def test_bench_quick_every_loader(tmp_path, capsys):
    # every loader in-process (workers=0) keeps this fast; the spawn path is the next test
    assert bench.main(_quick_args(tmp_path, 0, "--breakdown")) == 0
    out = capsys.readouterr().out
    report = json.loads((tmp_path / "bench.json").read_text())
    assert set(report["loaders"]) == set(bench.LOADERS)
    for key, res in report["loaders"].items():
        assert res["images_per_s"] > 0, key
        assert len(res["rounds"]) == 1, key  # --quick: one warm-up epoch, one timed
        if key not in bench.BOUNDS:  # in-process loaders: the main process did all the work
            assert res["main_cpu_us"] is not None and res["worker_cpu_us"] is None, key
    steps = {step["step"]: step["cpu_us_per_image"] for step in report["breakdown"]}
    assert len(steps) == 10 and all(us > 0 for us in steps.values()), steps
    assert "where a worker's time goes" in out and "Lance take, random rows" in out
    assert report["conversion"]["rows"] == 192 and report["conversion"]["images_per_s"] > 0
    assert report["conversion"]["peak_rss"] > 0
    assert report["storage"]["lance_bytes"] > 0 and report["storage"]["imagefolder_bytes"] > 0
    assert report["hf_prepare"]["rows"] == 192
    assert {t["ratio"] for t in report["targets"]} >= {
        "lance_tv_uint8/imagefolder_pil",
        "lance_tv_uint8/imagefolder_tv",
    }
    assert (tmp_path / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for label in bench.LOADERS.values():
        assert label in out
    assert (tmp_path / "work" / "images.lance" / "_versions").is_dir()  # --work-dir keeps the dataset


@pytest.mark.slow  # a benchmark run in a child process, spawn workers
def test_bench_cli_spawn_workers(tmp_path):
    # the real command line, with spawn workers that unpickle the benchmark's own datasets and collates
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1")
    args = _quick_args(tmp_path, 1, "--loaders", "hf_datasets,lance_arrow")
    cmd = [sys.executable, "-m", "lance_cookbook.bench", *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "bench.json").read_text())
    assert set(report["loaders"]) == {"hf_datasets", "lance_arrow"}
    for res in report["loaders"].values():
        assert res["images_per_s"] > 0 and res["startup_s"] > 0
        assert len(res["worker_peak_rss_mib"]) == 1 and res["worker_peak_rss_mib"][0] > 0
        assert res["worker_cpu_us"] > 0  # the worker decoded: its CPU time is counted
    assert "images/s" in proc.stdout


def test_bench_rejects_bad_arguments(tmp_path, capsys):
    with pytest.raises(SystemExit):
        bench.main(["--imagefolder", str(tmp_path), "--loaders", "nope"])
    assert "unknown loader" in capsys.readouterr().err
    assert bench.main(["--imagefolder", str(tmp_path / "missing")]) == 2
    assert bench.main(["--imagefolder", str(tmp_path), "--epochs", "1"]) == 2


def test_breakdown_times_every_step_even_on_a_tiny_dataset(tmp_path):
    blobs = [_jpeg((20 * i, 40, 200 - 10 * i), size=(20 + i, 14)) for i in range(10)]
    uri = str(tmp_path / "tiny.lance")
    lance.write_dataset(pa.table({"image": pa.array(blobs, pa.binary()), "label": list(range(10))}), uri)
    files = []
    for i, blob in enumerate(blobs):
        files.append(str(tmp_path / f"{i}.jpg"))
        Path(files[-1]).write_bytes(blob)
    steps = bench.breakdown(uri, files, list(range(10))[::-1], size=8, batch_size=4, images=10)
    assert [s["step"] for s in steps][1] == "Lance take, runs of 10 contiguous rows"  # fewer rows than 16
    assert len(steps) == 10 and all(s["cpu_us_per_image"] > 0 for s in steps), steps


def test_process_figures_through_psutil(tmp_path):
    assert measure.cpu_seconds() > 0 and measure.rss_bytes() > 0
    child = subprocess.Popen(
        [sys.executable, "-c", "import sys; b = b'x' * (64 << 20); sys.stdin.read()"], stdin=subprocess.PIPE
    )
    try:
        with measure.PeakRSS(lambda: [None, child.pid], interval=0.005) as rss:
            deadline = time.monotonic() + 60
            while (measure.rss_bytes(child.pid) or 0) < 64 * measure.MiB and time.monotonic() < deadline:
                time.sleep(0.01)  # the child writes its 64 MiB
    finally:
        child.communicate(b"")
    assert rss.peaks[child.pid] >= 64 * measure.MiB and rss.peaks[None] > 0
    assert measure.cpu_seconds(child.pid) is None and measure.rss_bytes(child.pid) is None  # gone: unknown


def test_dir_bytes_counts_apparent_and_allocated(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.bin").write_bytes(b"x" * 1000)
    (tmp_path / "y.bin").write_bytes(b"y" * 5000)
    apparent, allocated = dir_bytes(tmp_path)
    assert apparent == 6000 and allocated > 0 and allocated % 512 == 0


def test_evict_advises_every_file_of_every_path(tmp_path, monkeypatch):
    # the page cache itself cannot be inspected from Python (no mincore): check that every file is opened
    # and advised DONTNEED over its whole length, after a sync
    (tmp_path / "folder" / "a").mkdir(parents=True)
    files = [tmp_path / "folder" / "a" / "1.jpg", tmp_path / "folder" / "2.jpg", tmp_path / "x.lance" / "d"]
    files[2].parent.mkdir()
    lone = tmp_path / "shard-0.tar"
    for path in [*files, lone]:
        path.write_bytes(b"data")
    calls: list[tuple[str, int, int, int]] = []
    events: list[str] = []

    def fadvise(fd, offset, length, advice):
        calls.append((os.readlink(f"/proc/self/fd/{fd}"), offset, length, advice))
        events.append("advise")

    monkeypatch.setattr(cache, "CAN_EVICT", True)
    monkeypatch.setattr(cache.os, "POSIX_FADV_DONTNEED", 4, raising=False)
    monkeypatch.setattr(cache.os, "posix_fadvise", fadvise, raising=False)
    monkeypatch.setattr(cache.os, "sync", lambda: events.append("sync"))
    paths = [tmp_path / "folder", tmp_path / "x.lance", lone, tmp_path / "missing"]
    assert cache.evict(paths) == 4
    assert sorted(c[0] for c in calls) == sorted(str(p) for p in [*files, lone])
    assert all(c[1:] == (0, 0, 4) for c in calls)  # whole file, DONTNEED
    assert events[0] == "sync" and events.count("sync") == 1
    assert cache.evict([tmp_path / "missing"]) == 0


def test_evict_refuses_without_fadvise(monkeypatch):
    monkeypatch.setattr(cache, "CAN_EVICT", False)
    with pytest.raises(OSError, match="cold regime"):
        cache.evict(["."])


@pytest.mark.slow  # a benchmark run
def test_bench_cold_and_warm_side_by_side(tmp_path, capsys, monkeypatch):
    evicted: list[list[str]] = []
    real_evict = cache.evict

    def spy(paths):
        evicted.append([str(p) for p in paths])
        return real_evict(paths)

    monkeypatch.setattr(bench.candidates, "evict", spy)
    loaders = "imagefolder_tv,lance_tv_uint8_block,bound_tv"
    assert bench.main(_quick_args(tmp_path, 0, "--cache", "both", "--loaders", loaders)) == 0
    out = capsys.readouterr().out
    report = json.loads((tmp_path / "bench.json").read_text())
    assert report["config"]["cache"] == "both"
    for key, res in report["loaders"].items():
        if key == "bound_tv":  # decodes bytes held in memory: no cold figure, two warm epochs instead
            assert len(res["rounds"]) == 2 and not res["cold_rounds"] and res["cold_images_per_s"] is None
            continue
        assert len(res["rounds"]) == 1 and len(res["cold_rounds"]) == 1, key
        assert res["images_per_s"] > 0 and res["cold_images_per_s"] > 0, key
    # one eviction per cold epoch, of that loader's own files
    folder, uri = str(tmp_path / "img"), report["lance_uri"]
    assert sorted(evicted) == sorted([[folder], [uri]])
    assert "cold img/s" in out and "warm and cold page cache" in out
    assert "cold lance_tv_uint8_block/imagefolder_tv" in report["ratios"]
    assert (tmp_path / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_peers_stay_out_of_the_core_import():
    # the core environment imports the benchmark without the peer libraries (Streaming's transformers
    # would break `datasets` there): they are imported only when a peer loader is built
    code = (
        "import sys, lance_cookbook.bench as b; "
        "assert set(b.PEER_LOADERS) == {'webdataset', 'streaming', 'litdata'}; "
        "print(sorted(m for m in ('webdataset', 'streaming', 'litdata') if m in sys.modules))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert proc.stdout.strip() == "[]"


def test_peer_rows_and_loader_keys(tmp_path, capsys):
    assert bench.peers.wds_row({"__key__": "0", "jpg": b"\xff\xd8", "cls": b"7"}) == {
        "image": b"\xff\xd8",
        "label": 7,
    }
    (tmp_path / "a.jpg").write_bytes(b"jpeg bytes")
    assert bench.peers.litdata_row((str(tmp_path / "a.jpg"), 3)) == {"image": b"jpeg bytes", "label": 3}
    args = bench.build_parser().parse_args(["--imagefolder", "x", "--loaders", "lance_tv_uint8,peers"])
    assert args.loaders == ["lance_tv_uint8", "webdataset", "streaming", "litdata"]
    assert not set(bench.PEER_LOADERS) & set(bench.LOADERS)  # not in the default set: they need extras
    with pytest.raises(SystemExit):
        bench.main(["--help"])
    text = capsys.readouterr().out
    assert all(key in text for key in bench.PEER_LOADERS)


@pytest.mark.slow  # a benchmark run
def test_peers_quick_in_the_peer_environment(tmp_path):
    # runs where the `bench` extra is installed (.venv-bench of `make bench`), skipped elsewhere
    for name in ("webdataset", "streaming", "litdata"):
        pytest.importorskip(name)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    args = _quick_args(
        tmp_path, 1, "--loaders", "lance_tv_uint8,peers", "--cache", "both", "--generate", "256"
    )
    proc = subprocess.run(
        [sys.executable, "-m", "lance_cookbook.bench", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "bench.json").read_text())
    assert set(report["loaders"]) == {"lance_tv_uint8", *bench.PEER_LOADERS}
    for key in bench.PEER_LOADERS:
        res = report["loaders"][key]
        assert res["images_per_s"] > 0 and res["cold_images_per_s"] > 0, key
        assert len(res["worker_peak_rss_mib"]) == 1, key  # its spawn worker was found and measured
        assert report["peer_conversion"][key]["rows"] == 256, key
        assert report["storage"][f"{key}_bytes"] > 0, key


@pytest.mark.slow  # a benchmark run in a child process, three loaders
def test_start_method_per_loader_and_later_loaders_first_batch(tmp_path):
    # loaders started one after the other (not --quick): make_loader's are forkserver, the rest spawn, and the
    # first batch of every forkserver loader after the first (which started the server) is reported
    env = dict(os.environ, OMP_NUM_THREADS="1")
    args = [a for a in _quick_args(tmp_path, 1, "--epochs", "2") if a != "--quick"]
    args += ["--loaders", "imagefolder_tv,lance_tv_uint8,lance_tv_uint8_block"]
    cmd = [sys.executable, "-m", "lance_cookbook.bench", *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "bench.json").read_text())
    methods = {key: res["start_method"] for key, res in report["loaders"].items()}
    assert methods == {
        "imagefolder_tv": "spawn",
        "lance_tv_uint8": "forkserver",
        "lance_tv_uint8_block": "forkserver",
    }
    later = report["later_loader_first_batch_s"]
    assert later == {"lance_tv_uint8_block": report["loaders"]["lance_tv_uint8_block"]["startup_s"]}
    assert later["lance_tv_uint8_block"] > 0


@pytest.mark.slow  # two benchmark runs
def test_shuffle_converts_rows_in_a_random_order_for_the_block_sampler(tmp_path):
    # the bench's own conversion in ImageFolder order gives the block sampler batches of one or two classes;
    # --shuffle SEED writes the rows in a random order, and its batches mix classes as a full shuffle does
    mixes = {}
    for shuffle in (None, "0"):
        run = tmp_path / f"shuffle-{shuffle}"
        extra = ["--loaders", "lance_tv_uint8_block"] + (["--shuffle", shuffle] if shuffle else [])
        args = _quick_args(run, 0, *extra)
        args[args.index("--imagefolder") + 1] = str(tmp_path / "img")  # one image folder for both runs
        assert bench.main(args) == 0
        report = json.loads((run / "bench.json").read_text())
        labels = lance.dataset(report["lance_uri"]).to_table(columns=["label"])["label"].to_pylist()
        assert (labels == sorted(labels)) == (shuffle is None)
        mixes[shuffle] = report["loaders"]["lance_tv_uint8_block"]["batch_label_entropy_vs_random"]
    assert mixes["0"] > 0.9 > 0.6 > mixes[None], mixes

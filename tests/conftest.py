"""Shared fixtures: small real image folders made with PIL, and the digits in Lance."""

from __future__ import annotations

import io
import os
import signal
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

REPO = Path(__file__).resolve().parent.parent

# What a test must leave as it found it: a later test that simulates Ctrl-C (``_thread.interrupt_main``) or
# SIGTERM does nothing if an earlier one left the handler changed (issue 21: CI failed on a clean clone, in
# one order only)
GUARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@pytest.fixture(autouse=True)
def leaves_the_process_as_it_found_it():
    """Fail a test that changes this process's signal handlers, blocked signals or working directory without
    restoring them (monkeypatch restores its own changes first), and restore them, so no test depends on
    another's state or on the order the tests run in."""
    handlers = {s: signal.getsignal(s) for s in GUARDED_SIGNALS}
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    cwd = os.getcwd()
    yield
    changed = []
    for s, handler in handlers.items():
        if signal.getsignal(s) != handler:
            changed.append(f"handler of {signal.Signals(s).name}")
            signal.signal(s, handler)
    if signal.pthread_sigmask(signal.SIG_SETMASK, blocked) != blocked:
        changed.append("blocked signals")
    if os.getcwd() != cwd:
        changed.append(f"working directory ({os.getcwd()})")
        os.chdir(cwd)
    assert not changed, f"the test left this process changed: {', '.join(changed)}"


def photo(seed: int, size: tuple[int, int] = (64, 48)) -> Image.Image:
    """A deterministic RGB image with structure (gradients + noise), so JPEG encodes it like a photo."""
    rng = np.random.default_rng(seed)
    w, h = size
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([x * 255 // max(w - 1, 1), y * 255 // max(h - 1, 1), (x + y + seed * 7) % 256], axis=-1)
    noise = rng.integers(0, 40, size=(h, w, 3))
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))


def encode(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def make_imagefolder(root: Path, classes=("cat", "dog", "eel"), per_class: int = 4, size=(64, 48)) -> Path:
    """``root/<class>/<i>.jpg`` of real JPEGs (different sizes and qualities)."""
    seed = 0
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            w, h = size[0] + 3 * i, size[1] + 2 * i
            (root / c / f"{i:03d}.jpg").write_bytes(encode(photo(seed, (w, h)), "JPEG", quality=70 + i))
            seed += 1
    return root


def id_image(i: int, mode: str = "RGB") -> bytes:
    """A solid-colour PNG whose pixels encode ``i`` (R = i % 256, G = i // 256): survives any resize."""
    return encode(Image.new("RGB", (10 + i % 7, 9 + i % 5), (i % 256, i // 256, 77)).convert(mode), "PNG")


@pytest.fixture
def imagefolder(tmp_path: Path) -> Path:
    return make_imagefolder(tmp_path / "folder")


@pytest.fixture(scope="session")
def digits(tmp_path_factory) -> tuple[str, str]:
    from data_prep.digits import ensure_digits

    return ensure_digits(tmp_path_factory.mktemp("digits"))


def torchrun(nproc: int, *args: str, restarts: int = 0) -> list[str]:
    """``python -m torch.distributed.run --standalone`` of ``lance_cookbook.train`` with ``args``."""
    return [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
        "--max-restarts", str(restarts), "-m", "lance_cookbook.train", *args,
    ]  # fmt: skip


def child_env(**extra: str) -> dict[str, str]:
    """This environment for a child process: one OpenMP thread (2 cores), unbuffered output."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **extra}


@pytest.fixture(scope="session")
def small(tmp_path_factory) -> tuple[str, str]:
    """Digits for training runs: 101 training rows and 51 held-out rows, divisible by neither 2 nor 3."""
    from data_prep.convert import convert

    root = tmp_path_factory.mktemp("small")
    convert("digits", root / "train.lance", split="train", max_rows=101, progress=False)
    convert("digits", root / "val.lance", split="test", max_rows=51, progress=False)
    return str(root / "train.lance"), str(root / "val.lance")


@pytest.fixture
def id_dataset(tmp_path: Path):
    """A Lance dataset of 53 rows whose images encode their row number (see ``id_image``)."""
    from data_prep.convert import convert

    root = tmp_path / "ids"
    for i in range(53):
        (root / f"c{i % 3}").mkdir(parents=True, exist_ok=True)
        (root / f"c{i % 3}" / f"{i:04d}.png").write_bytes(id_image(i))
    uri = tmp_path / "ids.lance"
    convert(f"imagefolder:{root}", uri, progress=False)
    return str(uri)

"""Realistic image folders made offline: distinct JPEGs cut from scikit-learn's two bundled photos.

    python -m lance_cookbook.bench.synthetic --output DIR --count N --size WxH --classes K --seed S

Every image is a random crop (area, aspect ratio and position), a resize to ``WxH``, a horizontal flip half
of the time and a colour jitter (brightness, contrast, per-channel gain) of ``china.jpg`` or ``flower.jpg``,
saved as a JPEG (quality 80-95) at ``DIR/<class>/<i>.jpg`` (``class_000`` ..., ImageFolder layout). Class
``k`` always draws from the same photo with its own colour cast, so the classes are learnable. The output
depends only on ``(seed, i)``: the same arguments give byte-identical files, whatever the thread count.
No two images of one folder have the same bytes (a collision is re-drawn).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import math
import os
import random
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

__all__ = ["generate_imagefolder", "parse_size", "GeneratedFolder"]


@dataclass
class GeneratedFolder:
    """What :func:`generate_imagefolder` wrote: root, images, classes, size, JPEG bytes, seconds."""

    root: str
    count: int
    classes: int
    size: tuple[int, int]
    bytes: int
    seconds: float

    def __str__(self) -> str:
        w, h = self.size
        return (
            f"wrote {self.count:,} JPEGs of {w}x{h} in {self.classes} classes to {self.root}: "
            f"{self.bytes / 1e6:,.1f} MB, {self.seconds:.1f} s "
            f"({self.count / max(self.seconds, 1e-9):,.0f}/s)"
        )


def parse_size(text: str) -> tuple[int, int]:
    """``"500x375"`` -> ``(500, 375)``; ``"32"`` -> ``(32, 32)``."""
    w, sep, h = text.lower().partition("x")
    try:
        size = (int(w), int(h) if sep else int(w))
    except ValueError:
        raise ValueError(f"expected WxH (e.g. 500x375), got {text!r}") from None
    if min(size) < 1:
        raise ValueError(f"width and height must be positive, got {text!r}")
    return size


_CHANNELS = np.arange(3)
_LEVELS = np.arange(256, dtype=np.float64)[None, :]
_LOG_ASPECT = math.log(1.25)


@lru_cache(maxsize=8)
def _sources(size: tuple[int, int]) -> tuple[Image.Image, ...]:
    """The two sample photos, shrunk once so that the smallest crop is still about 2x the output size.

    Resizing a crop is then cheap even when making 32x32 images.
    """
    from sklearn.datasets import load_sample_images

    photos = [Image.fromarray(a) for a in load_sample_images().images]
    out = []
    for im in photos:
        scale = min(1.0, 4.0 * max(size[0] / im.width, size[1] / im.height))
        if scale < 1.0:
            im = im.resize(
                (max(1, round(im.width * scale)), max(1, round(im.height * scale))), Image.BILINEAR
            )
        im.load()
        out.append(im)
    return tuple(out)


@lru_cache(maxsize=4096)
def _class_tint(seed: int, label: int) -> np.ndarray:
    return np.random.default_rng([seed, 1, label]).uniform(0.8, 1.2, size=3)


def _render(i: int, attempt: int, size: tuple[int, int], classes: int, seed: int) -> tuple[int, bytes]:
    label = i % classes
    src = _sources(size)[label % 2]
    rng = random.Random(f"{seed}:{i}:{attempt}")  # str seeds hash with SHA-512: stable across runs
    # crop: 30-100 % of the area, aspect ratio within 4/5..5/4 of the output's, anywhere in the photo
    area = rng.uniform(0.3, 1.0) * src.width * src.height
    aspect = size[0] / size[1] * math.exp(rng.uniform(-_LOG_ASPECT, _LOG_ASPECT))
    cw = min(src.width, math.sqrt(area * aspect))
    ch = min(src.height, math.sqrt(area / aspect))
    x0 = rng.uniform(0, src.width - cw)
    y0 = rng.uniform(0, src.height - ch)
    im = src.resize(size, Image.BILINEAR, box=(x0, y0, x0 + cw, y0 + ch), reducing_gap=2.0)
    if rng.random() < 0.5:
        im = im.transpose(Image.FLIP_LEFT_RIGHT)
    # colour jitter as one lookup table: contrast around mid-grey, brightness, per-channel gain (class tint)
    brightness, contrast = rng.uniform(0.75, 1.25), rng.uniform(0.75, 1.25)
    gain = _class_tint(seed, label) * np.array([rng.uniform(0.9, 1.1) for _ in range(3)]) * brightness
    lut = np.clip((_LEVELS * contrast + 128.0 * (1.0 - contrast)) * gain[:, None], 0, 255).astype(np.uint8)
    if size[0] * size[1] <= 128 * 128:  # small: numpy indexing beats Image.point's per-call table setup
        im = Image.fromarray(lut[_CHANNELS, np.asarray(im)])
    else:
        im = im.point(lut.ravel().tolist())
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=rng.randint(80, 95))
    return label, buf.getvalue()


def generate_imagefolder(
    root: str | os.PathLike,
    count: int,
    size: tuple[int, int] | str = (500, 375),
    classes: int = 10,
    seed: int = 0,
    *,
    workers: int | None = None,
    progress: bool = False,
) -> GeneratedFolder:
    """Write ``count`` distinct JPEGs of ``size`` (``(W, H)`` or ``"WxH"``) to ``root/<class>/<i>.jpg``.

    Image ``i`` belongs to class ``i % classes``. ``root`` must not hold files already (it is created).
    PIL releases the GIL while resizing and encoding, so ``workers`` threads (default: the cores) share
    the work.
    """
    if isinstance(size, str):
        size = parse_size(size)
    size = (int(size[0]), int(size[1]))
    if count < 1 or classes < 1:
        raise ValueError(f"count and classes must be positive, got count={count}, classes={classes}")
    root = Path(root)
    if root.exists() and any(root.iterdir()):
        raise FileExistsError(f"{root} is not empty; choose a new folder")
    names = [f"class_{k:03d}" for k in range(min(classes, count))]
    for name in names:
        (root / name).mkdir(parents=True, exist_ok=True)
    width = max(6, len(str(count - 1)))
    _sources(size)  # load once, before the threads
    workers = workers or os.cpu_count() or 1
    start = time.perf_counter()
    seen: set[bytes] = set()
    total = 0
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=count, unit="img", desc=f"generating {size[0]}x{size[1]} JPEGs")

    def write(i: int) -> tuple[int, bytes]:
        label, data = _render(i, 0, size, classes, seed)
        (root / names[label] / f"{i:0{width}d}.jpg").write_bytes(data)
        return label, data

    with ThreadPoolExecutor(max_workers=workers) as pool:
        for i, (label, data) in enumerate(pool.map(write, range(count), chunksize=1)):
            attempt = 0
            digest = hashlib.blake2b(data, digest_size=16).digest()
            while digest in seen:  # sequential, so re-draws are deterministic too
                attempt += 1
                label, data = _render(i, attempt, size, classes, seed)
                digest = hashlib.blake2b(data, digest_size=16).digest()
                (root / names[label] / f"{i:0{width}d}.jpg").write_bytes(data)
            seen.add(digest)
            total += len(data)
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    return GeneratedFolder(str(root), count, len(names), size, total, time.perf_counter() - start)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m lance_cookbook.bench.synthetic",
        description="Write N distinct JPEGs cut from scikit-learn's sample photos, in an ImageFolder layout.",
    )
    p.add_argument("--output", required=True, help="new folder to write DIR/<class>/<i>.jpg into")
    p.add_argument("--count", type=int, required=True, help="number of images")
    p.add_argument("--size", default="500x375", help="WxH of every image (default 500x375; e.g. 32x32)")
    p.add_argument("--classes", type=int, default=10, help="number of class folders (default 10)")
    p.add_argument("--seed", type=int, default=0, help="same seed, same bytes (default 0)")
    p.add_argument("--workers", type=int, help="threads (default: the number of cores)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = generate_imagefolder(
            args.output,
            args.count,
            parse_size(args.size),
            args.classes,
            args.seed,
            workers=args.workers,
            progress=not args.no_progress,
        )
    except (ValueError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Conversion batches are bounded by bytes of images as well as by rows, so large photos do not multiply
memory by --batch-rows (t3-conv-large-images-memory, datasets#741)."""

from __future__ import annotations

import lance
import numpy as np
import pytest
from conftest import encode
from PIL import Image

from data_prep import write as write_module
from data_prep.convert import main
from data_prep.pool import BATCH_BYTES, batched
from data_prep.sources import Record

MIB = 1 << 20


def records_of(*sizes: int) -> list[Record]:
    return [Record(f"r{i}", 0, data=b"x" * n) for i, n in enumerate(sizes)]


def test_batched_cuts_by_bytes_and_rows_in_order():
    sizes = [400, 400, 400, 1500, 100, 100, 100, 100, 100]
    batches = list(batched(records_of(*sizes), rows=3, nbytes=1000))
    assert [[len(r.data) for r in b] for b in batches] == [
        [400, 400],  # a third would pass 1,000 bytes
        [400],
        [1500],  # larger than the budget: alone
        [100, 100, 100],  # 3 rows
        [100, 100],
    ]
    assert [r.source for b in batches for r in b] == [f"r{i}" for i in range(len(sizes))]


def test_batched_counts_files_by_their_size_and_invalid_records_as_nothing(tmp_path):
    paths = []
    for i, n in enumerate([600, 600]):
        paths.append(tmp_path / f"{i}.jpg")
        paths[-1].write_bytes(b"x" * n)
    records = [
        Record("a", 0, path=str(paths[0])),
        Record("bad", 0, path=str(tmp_path / "gone.jpg"), problem="broken link"),
        Record("b", 0, path=str(paths[1])),
    ]
    assert [[r.source for r in b] for b in batched(records, rows=512, nbytes=1000)] == [["a", "bad"], ["b"]]


def test_default_budget_keeps_small_images_in_full_row_batches():
    assert BATCH_BYTES == 32 * MIB  # 512 images of 24 KB (12 MB) still make one batch
    assert [len(b) for b in batched(records_of(*[24_000] * 1024), rows=512, nbytes=BATCH_BYTES)] == [512, 512]


@pytest.fixture
def photo_folder(tmp_path):
    """8 distinct noise JPEGs of ~0.4 MB each, in two classes: photos that hardly compress."""
    rng = np.random.default_rng(0)
    sizes = []
    for i in range(8):
        folder = tmp_path / "photos" / ("a" if i % 2 else "b")
        folder.mkdir(parents=True, exist_ok=True)
        data = encode(
            Image.fromarray(rng.integers(0, 256, (480, 720, 3), dtype=np.uint8)), "JPEG", quality=95
        )
        (folder / f"{i}.jpg").write_bytes(data)
        sizes.append(len(data))
    assert MIB // 4 < min(sizes) and max(sizes) < MIB // 2
    return tmp_path / "photos", sizes


def test_batches_streamed_to_lance_stay_within_batch_mib(photo_folder, tmp_path, capsys, monkeypatch):
    folder, sizes = photo_folder
    seen: list[tuple[int, int]] = []  # (rows, image bytes) of each record batch handed to Lance
    original = write_module.record_batches

    def spy(*args, **kw):
        for batch in original(*args, **kw):
            seen.append((batch.num_rows, batch.column("image").nbytes))
            yield batch

    monkeypatch.setattr(write_module, "record_batches", spy)
    out = tmp_path / "out.lance"
    code = main(
        ["--source", f"imagefolder:{folder}", "--output", str(out), "--no-progress", "--batch-mib", "1"]
    )
    assert code == 0, capsys.readouterr().err
    assert sum(rows for rows, _ in seen) == 8 == lance.dataset(str(out)).count_rows()
    # --batch-rows is 512: without the byte budget all 8 photos (~3 MB) would be one batch
    assert len(seen) >= 3
    assert all(nbytes <= MIB for _, nbytes in seen), seen


def test_batch_mib_below_one_is_refused(tmp_path, capsys, imagefolder):
    with pytest.raises(SystemExit) as exit_info:
        main(
            [
                "--source",
                f"imagefolder:{imagefolder}",
                "--output",
                str(tmp_path / "o.lance"),
                "--batch-mib",
                "0",
            ]
        )
    assert exit_info.value.code == 2
    assert "argument --batch-mib: must be at least 1, got 0" in capsys.readouterr().err

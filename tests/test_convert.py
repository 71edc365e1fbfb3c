"""Conversion round trips: original bytes kept, labels and label names right, for every source kind."""

from __future__ import annotations

from pathlib import Path

import lance
import pytest
from conftest import make_imagefolder
from PIL import Image

from data_prep.convert import ConversionError, convert, main
from data_prep.write import conversion_record
from lance_cookbook import label_names


def rows(uri) -> list[dict]:
    return lance.dataset(str(uri)).to_table().to_pylist()


def test_imagefolder_keeps_original_bytes_and_imagefolder_labels(imagefolder: Path, tmp_path: Path):
    from torchvision.datasets import ImageFolder

    out = tmp_path / "out.lance"
    summary = convert(f"imagefolder:{imagefolder}", out, progress=False)
    reference = ImageFolder(str(imagefolder))
    got = rows(out)
    assert summary.rows == len(got) == len(reference.samples) == 12
    for row, (path, target) in zip(got, reference.samples, strict=True):
        assert row["image"] == Path(path).read_bytes()
        assert row["label"] == target
        assert row["source"] == Path(path).relative_to(imagefolder).as_posix()
        assert (row["width"], row["height"]) == Image.open(path).size
    assert [r["id"] for r in got] == list(range(12))
    assert label_names(out) == reference.classes == ["cat", "dog", "eel"]
    assert summary.classes == 3 and summary.image_bytes == sum(len(r["image"]) for r in got)


def test_hub_style_local_folder_through_hf_keeps_bytes(tmp_path: Path):
    hub = tmp_path / "hub"
    make_imagefolder(hub / "train", per_class=3)
    make_imagefolder(hub / "val", per_class=2)
    for split, expected in (("train", 9), ("val", 6), ("validation", 6)):
        out = tmp_path / f"{split}.lance"
        convert(f"hf:{hub}", out, split=split, progress=False)
        got = rows(out)
        assert len(got) == expected
        folder = hub / ("train" if split == "train" else "val")
        for row in got:
            path = Path(row["source"])
            assert path.parent.parent == folder
            assert row["image"] == path.read_bytes()
            assert label_names(out)[row["label"]] == path.parent.name
        assert label_names(out) == ["cat", "dog", "eel"]


def test_hf_unknown_split_and_missing_columns_are_clear(tmp_path: Path):
    hub = tmp_path / "hub"
    make_imagefolder(hub / "train", per_class=1)
    with pytest.raises(ConversionError, match="test"):
        convert(f"hf:{hub}", tmp_path / "x.lance", split="test", progress=False)
    with pytest.raises(ConversionError, match="no label column found.*--label-column"):
        convert(f"hf:{hub}", tmp_path / "y.lance", label_column="nope", progress=False)
    with pytest.raises(ConversionError, match="local dataset folder .*/nowhere does not exist"):
        convert(f"hf:{tmp_path / 'nowhere'}", tmp_path / "z.lance", progress=False)
    assert not any((tmp_path / n).exists() for n in ("x.lance", "y.lance", "z.lance"))


def test_digits_splits_are_disjoint_pngs_with_names(tmp_path: Path):
    sizes = {}
    sources = {}
    for split in ("train", "test", "all"):
        out = tmp_path / f"{split}.lance"
        convert("digits", out, split=split, progress=False)
        got = rows(out)
        sizes[split] = len(got)
        sources[split] = {r["source"] for r in got}
        assert all(r["image"].startswith(b"\x89PNG") for r in got)
        assert {r["label"] for r in got} == set(range(10))
        assert label_names(out) == [str(i) for i in range(10)]
    assert sizes == {"train": 1437, "test": 360, "all": 1797}
    assert not sources["train"] & sources["test"]
    assert sources["train"] | sources["test"] == sources["all"]


def test_max_rows_and_rows_per_file(tmp_path: Path):
    out = tmp_path / "small.lance"
    convert("digits", out, max_rows=25, rows_per_file=10, progress=False)
    ds = lance.dataset(str(out))
    assert ds.count_rows() == 25
    assert [f.count_rows() for f in ds.get_fragments()] == [10, 10, 5]


def test_cli_summary_overwrite_and_versions(tmp_path: Path, capsys):
    out = tmp_path / "d.lance"
    assert main(["--source", "digits", "--split", "test", "--output", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "360 rows" in printed and "10 classes" in printed and "images/s" in printed
    assert main(["--source", "digits", "--split", "test", "--output", str(out), "--no-progress"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    argv = ["--source", "digits", "--output", str(out), "--max-rows", "5", "--overwrite", "--no-progress"]
    assert main(argv) == 0
    ds = lance.dataset(str(out))
    assert ds.version == 2 and ds.count_rows() == 5
    assert lance.dataset(str(out), version=1).count_rows() == 360
    meta = conversion_record(ds)
    assert meta["skipped"] == [] and "digits" in meta["source"]


def test_memory_stays_bounded_while_streaming(tmp_path: Path):
    """The writer consumes batches as they are produced: the source is never materialised."""
    from data_prep import write as mod

    folder = make_imagefolder(tmp_path / "f", classes=("a",), per_class=40, size=(16, 16))
    produced = []
    real = mod.record_batches

    def spy(*args, **kwargs):
        for batch in real(*args, **kwargs):
            produced.append(batch.num_rows)
            yield batch

    mod.record_batches = spy
    try:
        convert(f"imagefolder:{folder}", tmp_path / "o.lance", batch_rows=8, progress=False)
    finally:
        mod.record_batches = real
    assert produced == [8] * 5


def test_hub_parquet_layout_with_embedded_bytes(tmp_path: Path):
    """Laid out like uoft-cs/cifar10 on the hub: parquet shards, an ``img`` column holding encoded bytes."""
    import datasets
    from conftest import encode, photo

    blobs = [encode(photo(i, (32, 32)), "PNG") for i in range(6)]
    features = datasets.Features(
        {"img": datasets.Image(), "label": datasets.ClassLabel(names=["airplane", "cat"])}
    )
    table = datasets.Dataset.from_dict(
        {"img": [{"bytes": b, "path": None} for b in blobs], "label": [0, 1, 0, 1, 1, 0]}, features=features
    )
    (tmp_path / "repo" / "plain_text").mkdir(parents=True)
    table.to_parquet(str(tmp_path / "repo" / "plain_text" / "train-00000-of-00001.parquet"))
    out = tmp_path / "cifar.lance"
    convert(f"hf:{tmp_path / 'repo'}", out, split="train", progress=False)
    got = rows(out)
    assert [r["image"] for r in got] == blobs
    assert [r["label"] for r in got] == [0, 1, 0, 1, 1, 0]
    assert label_names(out) == ["airplane", "cat"]
    assert got[0]["source"].endswith("[train] row 0")

"""``convert(..., shuffle=SEED)`` / ``--shuffle SEED``: the same rows, in the seeded order of
``data_prep.sources.permutation``, labels intact, ``id`` numbering rows as written."""

from __future__ import annotations

import json
from pathlib import Path

import lance
import pytest
from conftest import make_imagefolder

from data_prep.convert import convert, main
from data_prep.imagefolder import imagefolder_source
from data_prep.sources import permutation, shuffled
from data_prep.write import conversion_record


def _table(uri: Path) -> dict[str, list]:
    return lance.dataset(str(uri)).to_table(columns=["image", "label", "id", "source"]).to_pydict()


def test_shuffle_writes_the_seeded_permutation_of_the_same_rows(tmp_path: Path):
    folder = make_imagefolder(tmp_path / "src", per_class=7, size=(20, 16))
    convert(f"imagefolder:{folder}", tmp_path / "plain.lance", progress=False)
    convert(f"imagefolder:{folder}", tmp_path / "shuf.lance", shuffle=3, progress=False)
    plain, shuf = _table(tmp_path / "plain.lance"), _table(tmp_path / "shuf.lance")
    order = permutation(21, 3)
    assert shuf["source"] == [plain["source"][i] for i in order] != plain["source"]
    # every row keeps its own image and label; id numbers the rows as written
    by_source = {
        s: (im, lb) for s, im, lb in zip(plain["source"], plain["image"], plain["label"], strict=True)
    }
    assert [by_source[s] for s in shuf["source"]] == list(zip(shuf["image"], shuf["label"], strict=True))
    assert shuf["id"] == list(range(21))


def test_shuffle_is_repeatable_and_seed_dependent():
    assert list(permutation(50, 1)) == list(permutation(50, 1)) != list(permutation(50, 2))


def test_shuffled_source_needs_random_access(tmp_path: Path):
    from data_prep.check import ConversionError
    from data_prep.sources import Source

    one_pass = Source(iter(()), ["a"], "a stream", total=3)
    with pytest.raises(ConversionError, match="cannot be shuffled"):
        shuffled(one_pass, 0)
    src = shuffled(imagefolder_source(make_imagefolder(tmp_path / "src", per_class=2)), 5)
    assert "shuffled (seed 5)" in src.description and len(list(src.records)) == 6


def test_digits_shuffle_and_max_rows_take_a_random_subset(tmp_path: Path):
    convert("digits", tmp_path / "d.lance", shuffle=0, max_rows=40, progress=False)
    rows = _table(tmp_path / "d.lance")
    assert rows["id"] == list(range(40))
    expected = [f"sklearn-digits[{i}]" for i in _digits_train_positions()[permutation(1437, 0)[:40]]]
    assert rows["source"] == expected


def _digits_train_positions():
    import numpy as np
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    target = load_digits().target
    train, _ = train_test_split(np.arange(len(target)), test_size=0.2, random_state=0, stratify=target)
    return np.sort(train)


def test_cli_shuffle(tmp_path: Path, capsys):
    folder = make_imagefolder(tmp_path / "src", per_class=3)
    out = tmp_path / "c.lance"
    assert (
        main(["--source", f"imagefolder:{folder}", "--output", str(out), "--shuffle", "7", "--no-progress"])
        == 0
    )
    assert "shuffled (seed 7)" in json.dumps(conversion_record(lance.dataset(str(out))))
    folder_order = [f"{c}/{i:03d}.jpg" for c in ("cat", "dog", "eel") for i in range(3)]
    rows = _table(out)
    assert rows["source"] == [folder_order[i] for i in permutation(9, 7)]
    assert rows["label"] == [i // 3 for i in permutation(9, 7)]

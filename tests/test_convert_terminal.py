"""File names reach the terminal escaped: no control character of a name is printed raw
(t3-sec-terminal-escapes, bat#3691)."""

from __future__ import annotations

import re

import lance
import pytest
from conftest import encode, photo

from data_prep.convert import main
from data_prep.result import Summary
from data_prep.sources import printable
from data_prep.write import conversion_record

# Control characters other than the newline that ends a line: what a terminal acts on instead of showing
RAW_CONTROL = re.compile("[\x00-\x09\x0b-\x1f\x7f-\x9f]")
EVIL = "evil\x1b]0;PWNED\x07\x1b[2J\x1b[31m.jpg"  # retitles the terminal, clears it, turns it red
FAKE = "fake\rall 2 images OK.jpg"  # the carriage return lets the rest overwrite its own line


@pytest.fixture
def hostile_folder(tmp_path):
    root = tmp_path / "in"
    for cls in ("cat", "dog"):
        (root / cls).mkdir(parents=True)
        (root / cls / "ok.jpg").write_bytes(encode(photo(1, (8, 8)), "JPEG"))
    for name in (EVIL, FAKE):
        (root / "cat" / name).write_bytes(b"this is not an image\n")
    return root


@pytest.mark.parametrize(
    "text, shown",
    [
        ("plain name.jpg", "plain name.jpg"),
        ("café.jpg", "café.jpg"),
        (EVIL, "evil\\x1b]0;PWNED\\x07\\x1b[2J\\x1b[31m.jpg"),
        (FAKE, "fake\\rall 2 images OK.jpg"),
        ("a\tb\nc\x00\x7f\x85.png", "a\\tb\\nc\\x00\\x7f\\x85.png"),
        ("bad\udcffbyte.png", "bad\\xffbyte.png"),  # a name that is not UTF-8, as os.fsdecode gives it
    ],
)
def test_printable_escapes_control_characters_and_odd_bytes(text, shown):
    assert printable(text) == shown
    assert printable(shown) == shown  # idempotent: a message escaped twice reads the same


def test_one_line_error_names_the_file_escaped(hostile_folder, tmp_path, capsys):
    code = main(
        ["--source", f"imagefolder:{hostile_folder}", "--output", str(tmp_path / "a.lance"), "--no-progress"]
    )
    out, err = capsys.readouterr()
    assert code == 2
    assert not RAW_CONTROL.search(out + err), repr(err)
    assert len(err.strip().splitlines()) == 1
    assert "cat/evil\\x1b]0;PWNED\\x07" in err or "cat/fake\\rall" in err


def test_skipped_summary_lists_every_name_escaped(hostile_folder, tmp_path, capsys):
    out_uri = tmp_path / "b.lance"
    code = main(
        [
            "--source",
            f"imagefolder:{hostile_folder}",
            "--output",
            str(out_uri),
            "--no-progress",
            "--skip-invalid",
        ]
    )
    out, err = capsys.readouterr()
    assert code == 0
    assert not RAW_CONTROL.search(out + err), repr(out)
    assert "cat/evil\\x1b]0;PWNED\\x07\\x1b[2J\\x1b[31m.jpg: not a readable image" in out
    assert "cat/fake\\rall 2 images OK.jpg: not a readable image" in out
    skipped = conversion_record(lance.dataset(str(out_uri)))["skipped"]
    assert not any(RAW_CONTROL.search(s) for s in skipped)


def test_summary_escapes_what_it_is_given():
    summary = Summary(
        "out\x1b[2J", 1, 1, 10, None, 1.0, 1, skipped=[f"cat/{EVIL}: x"], warnings=[f"{FAKE} not followed"]
    )
    text = str(summary)
    assert not RAW_CONTROL.search(text), repr(text)
    assert "out\\x1b[2J" in text and "cat/evil\\x1b]0;PWNED" in text and "fake\\rall" in text

"""Bad and unusual inputs: every problem ends in one ``error:`` line (exit 2, nothing written) or a listed
skip, never a traceback; image folders are listed in exactly torchvision ImageFolder's order."""

from __future__ import annotations

import os
from pathlib import Path

import lance
import pytest
from conftest import encode, id_image, photo

from data_prep import check
from data_prep import pool as pool_module
from data_prep.convert import ConversionError, convert, main
from data_prep.write import conversion_record
from lance_cookbook import label_names


def rows(uri) -> list[tuple[str, int]]:
    table = lance.dataset(str(uri)).to_table(columns=["source", "label"]).to_pylist()
    return [(r["source"], r["label"]) for r in table]


def metadata(uri) -> dict:
    return conversion_record(lance.dataset(str(uri)))


def run(capsys, *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()  # what came before, e.g. HF's progress while building the input
    code = main([*map(str, argv), "--no-progress"])
    out, err = capsys.readouterr()
    return code, out, err


def assert_refused(code: int, err: str, out: Path, message: str) -> None:
    """Exit 2, one ``error:`` line holding ``message``, nothing at ``out`` nor beside it."""
    errors = [line for line in err.splitlines() if line.startswith("error: ")]  # beside HF's own progress
    assert code == 2 and "Traceback" not in err
    assert len(errors) == 1 and message in errors[0], err
    assert not out.exists()
    assert not out.parent.exists() or not [p for p in out.parent.iterdir() if ".partial-" in p.name]


def tree(root: Path, files: dict[str, bytes]) -> Path:
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return root


# --------------------------------------------------------------------------------------- image folders
@pytest.mark.parametrize("processes", [False, True], ids=["threads", "worker-processes"])
def test_non_utf8_names_convert_with_escaped_source(tmp_path: Path, capsys, monkeypatch, processes):
    """Latin-1 names (an old Windows zip): read as they are, shown with their odd bytes as \\xNN."""
    from torchvision.datasets import ImageFolder

    if processes:
        monkeypatch.setattr(pool_module, "PROCESS_MIN_RECORDS", 1)
    root = os.fsencode(tmp_path / "in")
    for rel, seed in ((b"cat/ok.jpg", 0), (b"dog/caf\xe9.jpg", 1), (b"d\xf6g/a.jpg", 2)):
        os.makedirs(os.path.dirname(os.path.join(root, rel)), exist_ok=True)
        with open(os.path.join(root, rel), "wb") as f:
            f.write(encode(photo(seed), "JPEG"))
    out = tmp_path / "out.lance"
    code, _, err = run(capsys, "--source", f"imagefolder:{tmp_path / 'in'}", "--output", out, "--workers", 2)
    assert code == 0, err
    assert rows(out) == [("cat/ok.jpg", 0), ("dog/caf\\xe9.jpg", 1), ("d\\xf6g/a.jpg", 2)]
    assert label_names(out) == ["cat", "dog", "d\\xf6g"]
    reference = ImageFolder(str(tmp_path / "in"))
    assert [target for _, target in reference.samples] == [0, 1, 2]


def test_symlink_loop_is_not_followed_in_either_mode(tmp_path: Path, capsys):
    """``cat/up -> ..`` (a loop): today's os.walk made 82 rows of 2 images, 40 of dog's labelled cat."""
    root = tree(
        tmp_path / "in", {"cat/a.jpg": encode(photo(0), "JPEG"), "dog/b.jpg": encode(photo(1), "JPEG")}
    )
    os.symlink("..", root / "cat" / "up")
    os.symlink("../../..", root / "dog" / "way-up")  # above the source folder: a loop too
    for flags in ([], ["--skip-invalid"]):
        out = tmp_path / f"out{len(flags)}.lance"
        code, printed, err = run(capsys, "--source", f"imagefolder:{root}", "--output", out, *flags)
        assert code == 0, err
        assert rows(out) == [("cat/a.jpg", 0), ("dog/b.jpg", 1)]
        assert (
            f"{root}/cat/up not followed: it leads back to the source folder or above it (a loop)" in printed
        )
        assert f"{root}/dog/way-up not followed: it leads back" in printed
        assert len(metadata(out)["warnings"]) == 2


def test_links_leaving_the_tree_are_followed_once(tmp_path: Path):
    """Links out of the tree are followed (ImageFolder does), each target once; links into it are not (their
    target is listed at its own place, with its own class); a loop outside the tree ends too."""
    outside = tree(
        tmp_path / "pool", {"p1.png": id_image(1), "sub/p2.png": id_image(2), "lone.png": id_image(3)}
    )
    os.symlink(outside, outside / "sub" / "back")  # a loop outside the source folder
    root = tree(tmp_path / "in", {"cat/a.png": id_image(4), "dog/b.png": id_image(5)})
    os.symlink(outside, root / "cat" / "pool")
    os.symlink(outside, root / "dog" / "pool-again")  # the same target: would list it twice
    os.symlink(outside / "lone.png", root / "dog" / "lone.png")  # a file out of the tree
    os.symlink("../dog/b.png", root / "cat" / "b-too.png")  # a file inside the tree
    os.symlink(tmp_path / "nowhere.png", root / "dog" / "broken.png")
    out = tmp_path / "out.lance"
    summary = convert(f"imagefolder:{root}", out, skip_invalid=True, progress=False)
    assert rows(out) == [
        ("cat/a.png", 0),
        ("cat/pool/lone.png", 0),
        ("cat/pool/p1.png", 0),
        ("cat/pool/sub/p2.png", 0),
        ("dog/b.png", 1),
    ]
    assert summary.skipped == ["dog/broken.png: broken link"]
    notes = "\n".join(summary.warnings)
    assert f"{root}/cat/b-too.png not followed: it leads to dog/b.png inside the source folder" in notes
    assert f"{root}/dog/pool-again not followed: it leads to a file or folder already listed" in notes
    assert f"{root}/dog/lone.png not followed: it leads to a file or folder already listed" in notes
    assert f"{root}/cat/pool/sub/back not followed" in notes


def test_class_folder_link_into_the_tree_is_refused(tmp_path: Path, capsys):
    root = tree(tmp_path / "in", {"cat/a.png": id_image(1)})
    os.symlink("cat", root / "kitty")
    out = tmp_path / "out.lance"
    code, _, err = run(capsys, "--source", f"imagefolder:{root}", "--output", out)
    assert_refused(
        code, err, out, f"class folder {root}/kitty is a link not followed: it leads to cat inside"
    )


def test_hidden_entries_and_macosx_folders_are_ignored(tmp_path: Path):
    """What a macOS zip and tools leave beside the images; ImageFolder would make classes of them."""
    good = {"cat/a.png": id_image(1), "cat/sub/b.png": id_image(2), "dog/c.png": id_image(3)}
    junk = {
        "__MACOSX/cat/._a.png": b"\x00\x05\x16\x07",
        ".ipynb_checkpoints/x.png": id_image(4),
        "cat/.DS_Store": b"\x00\x00\x00\x01Bud1",
        "cat/._a.png": b"\x00\x05\x16\x07",
        "cat/.thumbs/a.png": id_image(5),
        "cat/__MACOSX/._b.png": b"\x00\x05\x16\x07",
    }
    root = tree(tmp_path / "in", {**good, **junk})
    out = tmp_path / "out.lance"
    convert(f"imagefolder:{root}", out, progress=False)
    assert rows(out) == [("cat/a.png", 0), ("cat/sub/b.png", 0), ("dog/c.png", 1)]
    assert label_names(out) == ["cat", "dog"]


@pytest.mark.parametrize("contents", [{}, {"cat/.DS_Store": b"x"}], ids=["empty", "only-hidden"])
def test_empty_class_folder_is_an_error(tmp_path: Path, capsys, contents):
    root = tree(tmp_path / "in", {"dog/a.png": id_image(1), **contents})
    (root / "cat").mkdir(exist_ok=True)
    out = tmp_path / "out.lance"
    for flags in ([], ["--skip-invalid"]):
        code, _, err = run(capsys, "--source", f"imagefolder:{root}", "--output", out, *flags)
        assert_refused(code, err, out, f"class folder {root}/cat holds no files")


def test_unreadable_file_is_named_or_skipped(tmp_path: Path, capsys, monkeypatch):
    root = tree(tmp_path / "in", {f"{c}/{i}.png": id_image(i) for c in ("cat", "dog") for i in range(3)})
    real_open = open

    def denying_open(path, *args, **kwargs):
        # chmod 000 stops nobody when the tests run as root: refuse the read the way the kernel does
        if str(path).endswith("dog/1.png"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(check, "open", denying_open, raising=False)
    out = tmp_path / "new" / "sub" / "out.lance"
    code, _, err = run(capsys, "--source", f"imagefolder:{root}", "--output", out)
    assert_refused(code, err, out, "error: dog/1.png: cannot read file: Permission denied")
    assert not (tmp_path / "new").exists()  # the folders made for --output went too
    code, printed, _ = run(capsys, "--source", f"imagefolder:{root}", "--output", out, "--skip-invalid")
    assert code == 0
    assert [s for s, _ in rows(out)] == ["cat/0.png", "cat/1.png", "cat/2.png", "dog/0.png", "dog/2.png"]
    assert "skipped 1 invalid image(s):\n  dog/1.png: cannot read file: Permission denied" in printed


def test_unreadable_folder_is_named_or_skipped(tmp_path: Path, capsys, monkeypatch):
    root = tree(tmp_path / "in", {"cat/a.png": id_image(1), "cat/locked/b.png": id_image(2)})
    real_scandir = os.scandir

    def denying_scandir(path="."):
        if str(path).endswith("locked"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", denying_scandir)
    out = tmp_path / "out.lance"
    code, _, err = run(capsys, "--source", f"imagefolder:{root}", "--output", out)
    assert_refused(code, err, out, "error: cat/locked/: cannot read folder: Permission denied")
    code, printed, _ = run(capsys, "--source", f"imagefolder:{root}", "--output", out, "--skip-invalid")
    assert code == 0 and rows(out) == [("cat/a.png", 0)]
    assert "cat/locked/: cannot read folder: Permission denied" in printed


def test_row_order_is_imagefolders_on_names_that_sort_differently_as_paths(tmp_path: Path):
    """ImageFolder sorts whole folder paths (``sorted(os.walk(...))``): "a b" and "a-b" come before "a/x"
    (" " and "-" sort before "/"), so a depth-first walk with sorted sub-folders gives another order."""
    from torchvision.datasets import ImageFolder

    names = ["x.png", "a/x.png", "a b/x.png", "a-b/x.png", "a.b/x.png", "a/a/x.png", "a/B/x.png", "a0/x.png"]
    names += ["a/y.gif", "Z.png", "a b/c/x.jpg", "a-b/.hidden/x.png"]
    files = {
        f"{c}/{n}": id_image(i) for i, (c, n) in enumerate((c, n) for c in ("k 1", "k", "k-1") for n in names)
    }
    root = tree(tmp_path / "in", files)
    out = tmp_path / "out.lance"
    convert(f"imagefolder:{root}", out, progress=False)
    got = rows(out)
    reference = ImageFolder(str(root))
    both = [(Path(p).relative_to(root).as_posix(), t) for p, t in reference.samples if ".hidden" not in p]
    assert [r for r in got if not r[0].endswith(".gif")] == both  # ImageFolder skips .gif
    # the files of folder a, then of "a b", "a-b", "a.b", and only then of a's sub-folders a/B, a/a
    expected = ["Z.png", "x.png", "a/x.png", "a/y.gif", "a b/x.png", "a b/c/x.jpg", "a-b/x.png", "a.b/x.png"]
    expected += ["a/B/x.png", "a/a/x.png", "a0/x.png"]
    assert got[: len(expected)] == [(f"k/{n}", 0) for n in expected]
    assert label_names(out) == reference.classes == ["k", "k 1", "k-1"]
    assert [label for _, label in got] == [0] * 11 + [1] * 11 + [2] * 11


# ------------------------------------------------------------------------------------ Hugging Face
def hub(tmp_path: Path, images: list, labels: list, label_feature=None) -> Path:
    """A local dataset in hub layout (``data/train-*.parquet``) with an ``image`` column and ``label``."""
    import datasets

    features = datasets.Features(
        {"image": datasets.Image(), "label": label_feature or datasets.Value("string")}
    )
    repo = tmp_path / "repo"
    (repo / "data").mkdir(parents=True)
    table = datasets.Dataset.from_dict({"image": images, "label": labels}, features=features)
    table.to_parquet(str(repo / "data" / "train-00000-of-00001.parquet"))
    return repo


def blob(seed: int) -> dict:
    return {"bytes": encode(photo(seed, (16, 16)), "JPEG"), "path": None}


def test_hf_missing_image_names_the_row_or_is_skipped(tmp_path: Path, capsys):
    import datasets

    repo = hub(tmp_path, [blob(0), None, blob(2)], [0, 1, 1], datasets.ClassLabel(names=["cat", "dog"]))
    out = tmp_path / "out.lance"
    code, _, err = run(capsys, "--source", f"hf:{repo}", "--output", out)
    assert_refused(code, err, out, f"error: hf:{repo}[train] row 1: no image (column 'image' is empty")
    code, printed, err = run(capsys, "--source", f"hf:{repo}", "--output", out, "--skip-invalid")
    assert code == 0, err
    assert [label for _, label in rows(out)] == [0, 1]
    assert rows(out)[1][0] == f"hf:{repo}[train] row 2"
    assert metadata(out)["skipped"] == [
        f"hf:{repo}[train] row 1: no image (column 'image' is empty in this row)"
    ]
    assert "skipped 1 invalid image(s)" in printed


def test_hf_string_labels_become_sorted_class_indices(tmp_path: Path):
    repo = hub(tmp_path, [blob(i) for i in range(4)], ["dog", "cat", "eel", "dog"])
    out = tmp_path / "out.lance"
    summary = convert(f"hf:{repo}", out, progress=False)
    assert [label for _, label in rows(out)] == [1, 0, 2, 1]
    assert label_names(out) == ["cat", "dog", "eel"] and summary.classes == 3 and summary.unlabelled == 0


def test_hf_unlabelled_split_converts_with_label_minus_one(tmp_path: Path, capsys):
    """A hub test split often has label -1 everywhere (no labels published): kept, and said so."""
    import datasets

    repo = hub(tmp_path, [blob(i) for i in range(3)], [-1, -1, -1], datasets.ClassLabel(names=["cat", "dog"]))
    out = tmp_path / "out.lance"
    code, printed, err = run(capsys, "--source", f"hf:{repo}", "--output", out)
    assert code == 0, err
    assert [label for _, label in rows(out)] == [-1, -1, -1]
    assert "unlabelled: all 3 rows have label -1 (the source gives no label)" in printed
    assert label_names(out) == ["cat", "dog"] and metadata(out)["unlabelled"] == 3


def test_hf_missing_string_label_is_unlabelled(tmp_path: Path):
    repo = hub(tmp_path, [blob(0), blob(1)], ["dog", None])
    summary = convert(f"hf:{repo}", tmp_path / "out.lance", progress=False)
    assert [label for _, label in rows(tmp_path / "out.lance")] == [0, -1]
    assert summary.unlabelled == 1 and "1 of 2 rows have label -1" in str(summary)


def test_hf_label_outside_the_class_names_names_the_row(tmp_path: Path, capsys):
    import datasets

    repo = hub(tmp_path, [blob(0), blob(1)], [0, 7], datasets.Value("int64"))
    # declare 2 class names over labels that reach 7, as a hand-edited dataset_info might
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b"])})
    table = datasets.Dataset.from_parquet(str(repo / "data" / "train-00000-of-00001.parquet"))
    table = table.cast(features)
    table.to_parquet(str(repo / "data" / "train-00000-of-00001.parquet"))
    out = tmp_path / "out.lance"
    code, _, err = run(capsys, "--source", f"hf:{repo}", "--output", out)
    assert_refused(code, err, out, f"hf:{repo}[train] row 1: label 7 is not -1 (no label) nor one of the 2")


def test_hf_label_column_of_another_type_is_clear(tmp_path: Path):
    import datasets

    repo = hub(tmp_path, [blob(0)], [0.5], datasets.Value("float32"))
    with pytest.raises(ConversionError, match="label column 'label' holds .*float32.*expected a ClassLabel"):
        convert(f"hf:{repo}", tmp_path / "out.lance", progress=False)
    assert not (tmp_path / "out.lance").exists()

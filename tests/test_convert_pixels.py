"""The pixel limit of the image check: PIL's by default, raised by --max-image-pixels for large camera photos
(t3-conv-100mp-photo-refused, TagStudio#164), followed by worker processes and Ray tasks alike."""

from __future__ import annotations

import io

import lance
import pytest
from conftest import encode, make_imagefolder, photo
from PIL import Image

from data_prep.check import InvalidImage, check_image, image_pixel_limit, pil_settings
from data_prep.convert import build_parser, main
from data_prep.pool import CheckPool
from data_prep.ray_engine import _check_block
from data_prep.sources import Record

# Stands in for PIL's 89.5 MP, so that 64x48 test images play 100-MP photos: above the limit, below twice it
# (where PIL's own guard, with its own message, would refuse first)
SMALL_LIMIT = 2000


def run_cli(capsys, *args) -> tuple[int, str, str]:
    code = main([*map(str, args), "--no-progress"])
    out, err = capsys.readouterr()
    return code, out, err


def test_help_documents_the_pixel_limit_option():
    text = build_parser().format_help()
    assert "--max-image-pixels N" in text and "89,478,485" in text


def test_an_image_over_the_limit_is_one_line_naming_the_option(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", SMALL_LIMIT)
    folder = make_imagefolder(tmp_path / "src", per_class=1)
    code, _, err = run_cli(capsys, "--source", f"imagefolder:{folder}", "--output", tmp_path / "a.lance")
    assert code == 2
    assert "cat/000.jpg: decompression bomb: 64x48 = 3,072 pixels is more than" in err
    assert "pass --max-image-pixels N to accept larger images, or --skip-invalid" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "a.lance").exists()


def test_max_image_pixels_accepts_larger_images_and_restores_pil(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", SMALL_LIMIT)
    folder = make_imagefolder(tmp_path / "src", per_class=2)  # 64x48 to 67x50 pixels
    out = tmp_path / "b.lance"
    code, stdout, err = run_cli(
        capsys, "--source", f"imagefolder:{folder}", "--output", out, "--max-image-pixels", 3400
    )
    assert code == 0, err
    assert lance.dataset(str(out)).count_rows() == 6
    assert Image.MAX_IMAGE_PIXELS == SMALL_LIMIT  # the limit was the conversion's only


def test_max_image_pixels_can_also_lower_the_limit(tmp_path, capsys):
    folder = make_imagefolder(tmp_path / "src", per_class=2)  # 3,072 to 3,350 pixels
    code, stdout, _ = run_cli(
        capsys, "--source", f"imagefolder:{folder}", "--output", tmp_path / "c.lance",
        "--max-image-pixels", 3200, "--skip-invalid",
    )  # fmt: skip
    assert code == 0
    assert (
        "skipped 3 invalid image(s)" in stdout and "is more than PIL.Image.MAX_IMAGE_PIXELS (3,200)" in stdout
    )


def test_max_image_pixels_below_one_is_refused(tmp_path, capsys, imagefolder):
    code, _, err = run_cli(
        capsys,
        "--source",
        f"imagefolder:{imagefolder}",
        "--output",
        tmp_path / "d.lance",
        "--max-image-pixels",
        0,
    )
    assert code == 2 and "--max-image-pixels must be at least 1, got 0" in err


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # PIL's, before the check refuses
def test_a_genuine_bomb_stays_refused_by_default():
    """dataset-viewer#1192: a 10000x9000 PNG of a few KB (90 MP: above PIL's limit, below twice it)."""
    buf = io.BytesIO()
    Image.new("1", (10000, 9000)).save(buf, format="PNG")
    assert len(buf.getvalue()) < 50_000
    with pytest.raises(InvalidImage, match="decompression bomb: 10000x9000 = 90,000,000 pixels"):
        check_image(buf.getvalue(), "bomb.png")


def test_worker_processes_and_ray_tasks_follow_the_limit(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    data = encode(photo(0, (40, 40)), "PNG")  # 1,600 pixels
    records = [Record("a.png", 0, data=data)]
    with image_pixel_limit(2000):
        settings = pil_settings()
        pool = CheckPool(1)  # its worker copies this process's PIL settings when it starts
        try:
            sizes = [result for batch in pool.checked([records]) for _, _, result in batch]
        finally:
            pool.close()
    assert sizes == [(40, 40)]
    outcomes, rows = _check_block(records, settings)  # what a Ray task runs, on any node
    assert outcomes == [(0, len(data))] and rows.num_rows == 1
    outcomes, rows = _check_block(records, {**settings, "max_image_pixels": 1000})
    assert "decompression bomb" in outcomes[0][1] and rows.num_rows == 0

"""Both decoders of ImageCollate give the pixels torchvision's ImageFolder loader gives, for every format and
mode the conversion accepts; 16-bit samples become round(v / 257) where that loader saturates them. The tensor
path decodes with TorchCodec, which always applies EXIF orientation where that loader ignores it."""

from __future__ import annotations

import struct
import warnings
import zlib
from functools import lru_cache
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
import torch
from conftest import encode, photo
from PIL import Image
from torchvision.datasets.folder import pil_loader
from torchvision.transforms import v2

from lance_cookbook import DecodeError, ImageCollate
from lance_cookbook.recipe import decode

SIZE = 16
TOLERANCE = 2  # of 255 levels: libjpeg/libwebp builds and the PIL vs tensor resize may round differently
DECODERS = ["pil", "torchvision"]


# ------------------------------------------------------------------------------------ hand-made encoders
def png16(samples: np.ndarray) -> bytes:
    """A 16-bit PNG from uint16 ``[H, W]`` (grey), ``[H, W, 2]`` (grey+alpha), ``[H, W, 3]`` or ``[H, W, 4]``:
    PIL writes 16-bit grey only."""
    h, w = samples.shape[:2]
    color_type = {1: 0, 2: 4, 3: 2, 4: 6}[samples.shape[2] if samples.ndim == 3 else 1]
    raw = b"".join(b"\x00" + samples[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", w, h, 16, color_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )


def tiff48(samples: np.ndarray) -> bytes:
    """An uncompressed little-endian 48-bit RGB TIFF from uint16 ``[H, W, 3]`` (PIL cannot write one)."""
    h, w, c = samples.shape
    data = samples.astype("<u2").tobytes()
    bits_at, data_at = 8, 16  # header, then the three BitsPerSample values (padded to 8 bytes), then pixels
    tags = [  # (tag, type: 3 SHORT / 4 LONG, count, value or offset)
        (256, 3, 1, w),
        (257, 3, 1, h),
        (258, 3, c, bits_at),
        (259, 3, 1, 1),  # no compression
        (262, 3, 1, 2),  # RGB
        (273, 4, 1, data_at),
        (277, 3, 1, c),
        (278, 3, 1, h),
        (279, 4, 1, len(data)),
        (284, 3, 1, 1),  # interleaved
    ]
    ifd = struct.pack("<H", len(tags))
    for tag, kind, count, value in tags:
        fmt = "<HHII" if kind == 4 or count > 1 else "<HHIHH"
        ifd += (
            struct.pack(fmt, tag, kind, count, value)
            if fmt == "<HHII"
            else struct.pack(fmt, tag, kind, count, value, 0)
        )
    head = b"II*\x00" + struct.pack("<I", data_at + len(data)) + struct.pack("<HHHH", 16, 16, 16, 0)
    return head + data + ifd + struct.pack("<I", 0)


def netpbm16(samples: np.ndarray) -> bytes:
    """A binary PGM (``[H, W]``) or PPM (``[H, W, 3]``) with maxval 65535."""
    h, w = samples.shape[:2]
    magic = b"P6" if samples.ndim == 3 else b"P5"
    return magic + f"\n{w} {h}\n65535\n".encode() + samples.astype(">u2").tobytes()


def to_8_bits(samples: np.ndarray) -> np.ndarray:
    """What a 16-bit sample must become: ``round(v / 257)``, grey replicated, alpha dropped."""
    rgb = np.repeat(samples[..., None], 3, -1) if samples.ndim == 2 else samples[..., :3]
    if samples.ndim == 3 and samples.shape[2] == 2:  # grey + alpha
        rgb = np.repeat(samples[..., :1], 3, -1)
    return np.round(rgb.astype(np.float64) / 257).astype(np.uint8)


def ramp16(w: int, h: int, seed: int = 0) -> np.ndarray:
    """uint16 samples whose low byte is no guide to the value (v / 257 and v % 256 disagree)."""
    rng = np.random.default_rng(seed)
    return (rng.integers(0, 256, (h, w)) * 256 + 200).clip(0, 65535).astype(np.uint16)


def exif_block(orientation: int, endian: str = "MM") -> bytes:
    """A TIFF-formatted EXIF block (no ``Exif\\0\\0`` prefix) whose IFD0 holds one entry: the orientation."""
    o = ">" if endian == "MM" else "<"
    return (
        endian.encode()
        + struct.pack(o + "HI", 42, 8)
        + struct.pack(o + "H", 1)
        + struct.pack(o + "HHIHH", 0x0112, 3, 1, orientation, 0)
        + struct.pack(o + "I", 0)
    )


def jpeg_segment(marker: int, body: bytes) -> bytes:
    return bytes([0xFF, marker]) + struct.pack(">H", len(body) + 2) + body


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_with_exif(png: bytes, exif: bytes, after_idat: bool = False) -> bytes:
    """``png`` with an ``eXIf`` chunk just after IHDR, or just before IEND."""
    at = (
        len(png) - 12 if after_idat else 8 + 25
    )  # IEND is the last 12 bytes; IHDR the first 25 after the magic
    return png[:at] + png_chunk(b"eXIf", exif) + png[at:]


# ------------------------------------------------------------------------------------------- the corpus
class Sample(NamedTuple):
    filename: str  # the extension is what the conversion looks at
    data: bytes
    truth: np.ndarray | None  # uint8 [H, W, 3] for 16-bit inputs; None: the ImageFolder loader is the truth


@lru_cache(maxsize=1)
def corpus() -> dict[str, Sample]:
    im = photo(5, (37, 29))  # odd, non-square: every resize really resamples
    grey = im.convert("L")
    rgba = im.convert("RGBA")
    rgba.putalpha(Image.fromarray(np.arange(37 * 29, dtype=np.uint8).reshape(29, 37)))
    palette = im.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    other = Image.fromarray(255 - np.asarray(im))
    rotated = Image.Exif()
    rotated[0x0112] = 6  # orientation "rotate 90": ImageFolder ignores it, so must we
    g16, w, h = ramp16(23, 19), 23, 19
    rgb48 = np.stack([ramp16(w, h, 1), ramp16(w, h, 2), ramp16(w, h, 3)], -1)
    samples = [
        Sample("jpeg_baseline.jpg", encode(im, "JPEG", quality=85), None),
        Sample("jpeg_progressive.jpeg", encode(im, "JPEG", progressive=True), None),
        Sample("jpeg_grey.jpg", encode(grey, "JPEG"), None),
        Sample("jpeg_cmyk.jpg", encode(im.convert("CMYK"), "JPEG"), None),  # Adobe, inverted
        Sample("jpeg_444.jpg", encode(im, "JPEG", subsampling=0), None),
        Sample("jpeg_exif_rotated.jpg", encode(im, "JPEG", exif=rotated), None),
        Sample("png_rgb.png", encode(im, "PNG"), None),
        Sample("png_rgba.png", encode(rgba, "PNG"), None),
        Sample("png_grey.png", encode(grey, "PNG"), None),
        Sample("png_grey_alpha.png", encode(rgba.convert("LA"), "PNG"), None),
        Sample("png_1bit.png", encode(im.convert("1"), "PNG"), None),
        Sample("png_palette.png", encode(palette, "PNG"), None),
        Sample("png_palette_transparent_index.png", encode(palette, "PNG", transparency=3), None),
        Sample("png_palette_alpha.png", encode(rgba.quantize(16), "PNG"), None),
        Sample("png_exif_rotated.png", encode(im, "PNG", exif=rotated), None),
        Sample("png_animated.png", encode(im, "PNG", save_all=True, append_images=[other]), None),
        Sample("png_grey16.png", png16(g16), to_8_bits(g16)),
        Sample("png_grey_alpha16.png", png16(np.stack([g16, g16[::-1]], -1)), to_8_bits(g16)),
        Sample("png_rgb48.png", png16(rgb48), to_8_bits(rgb48)),
        Sample("png_rgba64.png", png16(np.concatenate([rgb48, g16[..., None]], -1)), to_8_bits(rgb48)),
        Sample("bmp_rgb.bmp", encode(im, "BMP"), None),
        Sample("bmp_palette.bmp", encode(palette, "BMP"), None),
        Sample("bmp_rgba.bmp", encode(rgba, "BMP"), None),
        Sample("gif_still.gif", encode(palette, "GIF"), None),
        Sample("gif_transparent_index.gif", encode(palette, "GIF", transparency=3), None),
        Sample(
            "gif_animated.gif",
            encode(palette, "GIF", save_all=True, append_images=[other], duration=50),
            None,
        ),
        Sample("webp_lossy.webp", encode(im, "WEBP", quality=80), None),
        Sample("webp_lossless_rgba.webp", encode(rgba, "WEBP", lossless=True), None),
        Sample(
            "webp_animated.webp", encode(im, "WEBP", save_all=True, append_images=[other], duration=50), None
        ),
        Sample("tif_rgb.tif", encode(im, "TIFF"), None),
        Sample("tif_rgba_deflate.tiff", encode(rgba, "TIFF", compression="tiff_adobe_deflate"), None),
        Sample("tif_cmyk.tiff", encode(im.convert("CMYK"), "TIFF"), None),
        Sample("tif_two_pages.tif", encode(im, "TIFF", save_all=True, append_images=[other]), None),
        Sample("tif_grey16.tif", encode(Image.fromarray(g16), "TIFF"), to_8_bits(g16)),
        Sample("tif_rgb48.tif", tiff48(rgb48), to_8_bits(rgb48)),
        Sample("ppm_rgb.ppm", encode(im, "PPM"), None),
        Sample("ppm_rgb48.ppm", netpbm16(rgb48), to_8_bits(rgb48)),
        Sample("pgm_grey.pgm", encode(grey, "PPM"), None),
        Sample("pgm_grey16.pgm", netpbm16(g16), to_8_bits(g16)),
        Sample("pbm_1bit.pbm", encode(im.convert("1"), "PPM"), None),
    ]
    return {s.filename.split(".")[0]: s for s in samples}


# ImageCollate(train=False)'s geometry, written out: shorter side to SIZE, centre crop SIZE
RESIZE = v2.Compose([v2.Resize(SIZE, antialias=True), v2.CenterCrop(SIZE), v2.PILToTensor()])


def expected(sample: Sample, path: Path) -> torch.Tensor:
    """uint8 ``[3, SIZE, SIZE]``: the ImageFolder loader (or the 8-bit truth) through the same resize."""
    if sample.truth is not None:
        return RESIZE(Image.fromarray(sample.truth))
    return RESIZE(pil_loader(str(path)))


def rows_of(blobs: list[bytes], names: list[str] | None = None) -> list[dict]:
    names = names or [f"f{i}" for i in range(len(blobs))]
    return [{"image": b, "label": i, "source": n} for i, (b, n) in enumerate(zip(blobs, names, strict=True))]


# ---------------------------------------------------------------------------------------------- tests
def test_corpus_covers_every_extension_the_conversion_accepts():
    from data_prep.convert import IMAGE_EXTENSIONS

    assert {Path(s.filename).suffix for s in corpus().values()} == set(IMAGE_EXTENSIONS)


@pytest.mark.parametrize("decoder", DECODERS)
@pytest.mark.parametrize("name", sorted(corpus()))
def test_decoders_match_the_imagefolder_loader(name, decoder, tmp_path):
    sample = corpus()[name]
    path = tmp_path / sample.filename
    path.write_bytes(sample.data)
    want = expected(sample, path)
    rows = rows_of([sample.data], [sample.filename])
    got = ImageCollate(size=SIZE, decoder=decoder, dtype=torch.uint8)(rows).image[0]
    assert got.shape == (3, SIZE, SIZE) and got.dtype == torch.uint8
    err = (got.int() - want.int()).abs().max().item()
    assert err <= TOLERANCE, f"{name}: off by up to {err} levels"
    scaled = ImageCollate(size=SIZE, decoder=decoder, dtype=torch.float32)(rows).image[0]
    assert 0.0 <= scaled.min() and scaled.max() <= 1.0
    assert torch.equal(scaled, got.float() / 255)


@pytest.mark.parametrize("decoder", DECODERS)
@pytest.mark.parametrize(
    "name", ["png_grey16", "png_rgb48", "tif_grey16", "tif_rgb48", "pgm_grey16", "ppm_rgb48"]
)
def test_16_bit_samples_scaled_to_8_bits(name, decoder):
    """The case img-png16: the ImageFolder loader saturates 16-bit grey (pytorch/vision#2218) and
    torchvision's decode_image kept the low byte once cast; both decoders must give round(v / 257)."""
    g16 = (np.arange(SIZE * SIZE, dtype=np.uint32) * 256 + 200).astype(np.uint16).reshape(SIZE, SIZE)
    rgb48 = np.stack([g16, g16[::-1], np.full_like(g16, 40000)], -1)
    samples = g16 if "grey" in name else rgb48
    encoder = {"png": png16, "tif": tiff48, "pgm": netpbm16, "ppm": netpbm16}[name.split("_")[0]]
    data = encode(Image.fromarray(g16), "TIFF") if name == "tif_grey16" else encoder(samples)
    want = torch.from_numpy(to_8_bits(samples)).permute(2, 0, 1)
    # crop_fraction=1.0 at the image's own size: the resize and the crop change nothing
    got = ImageCollate(size=SIZE, decoder=decoder, dtype=torch.uint8, crop_fraction=1.0)(
        rows_of([data])
    ).image[0]
    assert torch.equal(got, want)
    scaled = ImageCollate(size=SIZE, decoder=decoder, crop_fraction=1.0)(rows_of([data])).image[0]
    assert scaled.max() <= 1.0 and torch.equal((scaled * 255).round().to(torch.uint8), want)


@pytest.mark.parametrize("decoder", DECODERS)
@pytest.mark.parametrize("fmt", ["GIF", "WEBP"])
def test_animated_image_gives_its_first_frame(fmt, decoder):
    """The case img-gif-animated: TorchCodec's decode_image returns every frame of a GIF or WebP; the first
    one, as the ImageFolder loader shows it, is the image."""
    first, second = (Image.new("RGB", (SIZE, SIZE), (v, v, v)) for v in (50, 220))
    kw = {"lossless": True} if fmt == "WEBP" else {}
    animated = encode(first, fmt, save_all=True, append_images=[second], duration=100, loop=0, **kw)
    still = encode(Image.new("RGB", (SIZE, SIZE), (120, 120, 120)), "PNG")
    for blobs, values in (([animated, still], [50, 120]), ([still, animated], [120, 50])):
        images = ImageCollate(size=SIZE, decoder=decoder, dtype=torch.uint8)(rows_of(blobs)).image
        assert images.shape == (2, 3, SIZE, SIZE)
        assert [img.unique().tolist() for img in images] == [[v] for v in values]


def test_broken_image_in_a_fast_batch_is_named_and_skipped():
    """A fault anywhere in the torchvision path (batched JPEG decode, routed formats, resize) names its row;
    with on_error="skip" the other rows, routed ones included, still arrive."""
    jpeg = encode(photo(1, (40, 30)), "JPEG")
    broken = jpeg[:200] + bytes(64)  # a JPEG header, then nothing decodable
    blobs = [jpeg, corpus()["gif_animated"].data, broken, corpus()["png_rgb48"].data, jpeg]
    names = ["a.jpg", "b.gif", "broken.jpg", "d.png", "e.jpg"]
    with pytest.raises(DecodeError, match=r"source='broken.jpg'"):
        ImageCollate(size=SIZE, decoder="torchvision")(rows_of(blobs, names))
    collate = ImageCollate(size=SIZE, decoder="torchvision", dtype=torch.uint8, on_error="skip")
    with pytest.warns(UserWarning, match=r"source='broken.jpg'"):
        images, labels = collate(rows_of(blobs, names))
    assert labels.tolist() == [0, 1, 3, 4] and collate.skipped == 1
    alone = [collate(rows_of([b])).image[0] for b in blobs[:2] + blobs[3:]]
    assert torch.equal(images, torch.stack(alone))  # the batch decodes each row as it decodes alone


def test_every_format_converts_and_loads_like_imagefolder(tmp_path):
    """End to end: one class folder per sample, converted, then read back through make_loader."""
    from data_prep.convert import convert
    from lance_cookbook import make_loader

    root = tmp_path / "folder"
    names = sorted(corpus())  # class folders sort as the names, so label i is names[i]
    for name in names:
        sample = corpus()[name]
        (root / name).mkdir(parents=True)
        (root / name / sample.filename).write_bytes(sample.data)
    uri = str(tmp_path / "all.lance")
    convert(f"imagefolder:{root}", uri, progress=False)
    want = torch.stack([expected(corpus()[n], root / n / corpus()[n].filename) for n in names])
    for decoder in DECODERS:
        collate = ImageCollate(size=SIZE, decoder=decoder, dtype=torch.uint8)
        batches = list(make_loader(uri, batch_size=16, num_workers=0, collate_fn=collate))
        images = torch.cat([b.image for b in batches])
        labels = torch.cat([b.label for b in batches])
        assert sorted(labels.tolist()) == list(range(len(names)))  # every file converted and read once
        err = (images.int() - want[labels].int()).abs().amax(dim=(1, 2, 3))
        assert err.max() <= TOLERANCE, {
            names[y]: e for y, e in zip(labels.tolist(), err.tolist(), strict=True) if e > TOLERANCE
        }


# ------------------------------------------------------------------------- TorchCodec's EXIF orientation
def oriented(fmt: str, orientation: int) -> bytes:
    """A non-square photo whose EXIF says ``orientation`` (PIL writes a big-endian block)."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    kw = {"quality": 90} if fmt == "JPEG" else {"lossless": True} if fmt == "WEBP" else {}
    return encode(photo(7, (37, 29)), fmt, exif=exif, **kw)


def exif_variants() -> dict[str, bytes]:
    """Where else EXIF sits: each says "rotate 90" (6), which the ImageFolder loader ignores. TorchCodec 0.17
    reads only the first APP1 and only an eXIf before IDAT: the XMP-first and after-IDAT cases guard a later
    release that reads more."""
    jpeg = encode(photo(7, (37, 29)), "JPEG", quality=90)
    exif = b"Exif\x00\x00" + exif_block(6)
    xmp = b"http://ns.adobe.com/xap/1.0/\x00<x:xmpmeta/>"
    png = encode(photo(7, (37, 29)), "PNG")
    return {
        "jpeg_little_endian": jpeg[:2] + jpeg_segment(0xE1, b"Exif\x00\x00" + exif_block(6, "II")) + jpeg[2:],
        "jpeg_xmp_then_exif": jpeg[:2] + jpeg_segment(0xE1, xmp) + jpeg_segment(0xE1, exif) + jpeg[2:],
        "jpeg_fill_bytes": jpeg[:2] + b"\xff\xff" + jpeg_segment(0xE1, exif) + jpeg[2:],
        "png_exif_after_idat": png_with_exif(png, exif_block(6), after_idat=True),
        "png_little_endian": png_with_exif(png, exif_block(6, "II")),
    }


@pytest.mark.parametrize("decoder", DECODERS)
@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
def test_exif_orientation_is_ignored_as_imagefolder_does(fmt, orientation, decoder, tmp_path):
    """TorchCodec rotates and flips by EXIF (torchvision.io did not); the stored pixels are the image."""
    data = oriented(fmt, orientation)
    path = tmp_path / f"x.{fmt.lower()}"
    path.write_bytes(data)
    want = expected(Sample(path.name, data, None), path)
    got = ImageCollate(size=SIZE, decoder=decoder, dtype=torch.uint8)(rows_of([data])).image[0]
    assert (got.int() - want.int()).abs().max() <= TOLERANCE
    stored = v2.functional.pil_to_tensor(pil_loader(str(path)))
    assert torch.equal(decode.decode_one(data, decode.fast_path(data)), stored) or fmt == "JPEG"


@pytest.mark.parametrize("name", sorted(exif_variants()))
def test_exif_anywhere_torchcodec_reads_it_is_ignored(name, tmp_path):
    data = exif_variants()[name]
    path = tmp_path / ("x.jpg" if name.startswith("jpeg") else "x.png")
    path.write_bytes(data)
    want = v2.functional.pil_to_tensor(pil_loader(str(path)))
    assert want.shape == (3, 29, 37)
    got = decode.decode_batch([data])[0]
    assert got.shape == want.shape and (got.int() - want.int()).abs().max() <= TOLERANCE


@pytest.mark.parametrize("decoder", DECODERS)
def test_16_bit_png_with_exif_orientation(decoder):
    """16-bit PNG goes to TorchCodec on both paths (PIL has no 16-bit colour mode): its EXIF is hidden too."""
    rgb48 = np.stack([ramp16(SIZE, SIZE, 1), ramp16(SIZE, SIZE, 2), ramp16(SIZE, SIZE, 3)], -1)
    rgb48[0, :] = 0  # a dark top row: a rotation or flip would move it
    data = png_with_exif(png16(rgb48), exif_block(8))
    got = ImageCollate(size=SIZE, decoder=decoder, dtype=torch.uint8, crop_fraction=1.0)(rows_of([data]))
    assert torch.equal(got.image[0], torch.from_numpy(to_8_bits(rgb48)).permute(2, 0, 1))


def test_exif_hiding_copies_only_what_holds_exif():
    plain = encode(photo(1), "JPEG")
    assert decode._without_exif(plain) is plain  # no APP1 segment: no copy
    assert decode._without_exif(oriented("JPEG", 6)) == decode._without_exif(oriented("JPEG", 1))
    assert b"eXIf" not in decode._without_exif(oriented("PNG", 6))
    assert b"EXIF" not in decode._without_exif(oriented("WEBP", 6))
    # a JPEG that mentions APP1 but whose markers cannot be walked goes to PIL, which names its fault
    assert decode._without_exif(JPEG_HEADER_THEN_JUNK) is None
    with pytest.raises(DecodeError, match="broken.jpg"):
        ImageCollate(size=SIZE, decoder="torchvision")(rows_of([JPEG_HEADER_THEN_JUNK], ["broken.jpg"]))


JPEG_HEADER_THEN_JUNK = b"\xff\xd8\xff\xe1\x00\x08Exif" + b"\x00junk\xff\xe1"


def test_no_deprecation_warning_from_decoding():
    """torchvision 0.29 deprecates torchvision.io's decoders for TorchCodec's: the package calls none."""
    blobs = [s.data for s in corpus().values()]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for decoder in DECODERS:
            ImageCollate(size=SIZE, decoder=decoder, dtype=torch.uint8)(rows_of(blobs))
    assert not [w for w in caught if issubclass(w.category, DeprecationWarning)]

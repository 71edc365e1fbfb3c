"""Encoded bytes to uint8 RGB tensors with the pixels torchvision's ``ImageFolder`` loader gives.

TorchCodec decodes JPEG (one ``decode_jpeg`` call a batch), PNG (8 and 16 bits) and still WebP; PIL the rest.
TorchCodec always applies EXIF orientation, which that loader ignores: the EXIF block is hidden from it first.
"""

from __future__ import annotations

import io
import struct
import warnings

import numpy as np
import torch
from PIL import Image
from torchcodec.decoders import decode_image, decode_jpeg, decode_png
from torchvision.transforms import v2

__all__ = ["JPEG_MAGIC", "PNG_MAGIC", "decode_batch", "decode_one", "fast_path", "pil_to_rgb"]

JPEG_MAGIC = b"\xff\xd8\xff"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# The decoders only read their input, so viewing read-only buffers (Python bytes, Arrow buffers) with
# torch.frombuffer is safe; one targeted filter instead of catch_warnings, which is not thread-safe.
warnings.filterwarnings("ignore", message="The given buffer is not writable", category=UserWarning)

_BIG_ENDIAN_U16 = struct.Struct(">H").unpack_from

# PIL reads uncompressed 48/64-bit images (TIFF) through these raw modes keeping only each sample's high byte
_RAW_16_BIT = {"RGB;16L": "<u2", "RGB;16B": ">u2", "RGB;16N": "=u2", "RGBA;16L": "<u2", "RGBA;16B": ">u2"}


def _png_bit_depth(data: bytes) -> int | None:  # from the IHDR chunk, always first; None if not a PNG
    return data[24] if data[:8] == PNG_MAGIC and len(data) > 24 else None


def _cut(data: bytes, spans: list[tuple[int, int]]) -> bytes:
    """Return ``data`` without the byte ranges ``spans`` (in order, not overlapping); ``data`` if none."""
    if not spans:
        return data
    starts = [0] + [end for _, end in spans]
    ends = [start for start, _ in spans] + [len(data)]
    return b"".join(data[a:b] for a, b in zip(starts, ends, strict=True))


def _jpeg_exif_spans(data: bytes) -> list[tuple[int, int]] | None:
    """The APP1 segments before the first scan, where TorchCodec looks for EXIF; None: the walk fails."""
    pos, spans, size = 2, [], len(data)
    while pos + 4 <= size and data[pos] == 0xFF:  # each header segment starts with a marker
        marker = data[pos + 1]
        if marker == 0xDA:  # start of scan: entropy-coded data follows
            return spans
        if marker == 0xFF:  # fill byte
            pos += 1
        elif 0xD0 <= marker <= 0xD9 or marker == 0x01:  # markers without a length field
            pos += 2
        else:
            end = pos + 2 + _BIG_ENDIAN_U16(data, pos + 2)[0]
            if marker == 0xE1:
                spans.append((pos, end))
            pos = end
    return None


def _png_exif_spans(data: bytes) -> list[tuple[int, int]] | None:
    """The ``eXIf`` chunks (ancillary: the PNG stays valid without them); None: a chunk overruns the data."""
    pos, spans = 8, []
    while pos + 8 <= len(data):
        end = pos + 12 + int.from_bytes(data[pos : pos + 4], "big")  # length, type, data, CRC
        if end > len(data):
            return None
        kind = data[pos + 4 : pos + 8]
        if kind == b"eXIf":
            spans.append((pos, end))
        elif kind == b"IEND":
            break
        pos = end
    return spans


def _webp_exif_chunks(data: bytes) -> list[int]:
    """The offsets of the ``EXIF`` chunks, walked as TorchCodec walks them (it stops at a truncated chunk)."""
    pos, found = 12, []
    while pos + 8 <= len(data):
        size = int.from_bytes(data[pos + 4 : pos + 8], "little")
        if pos + 8 + size > len(data):
            break
        if data[pos : pos + 4] == b"EXIF":
            found.append(pos)
        pos += 8 + size + (size & 1)  # chunks are padded to an even size
    return found


def _without_exif(data: bytes) -> bytes | None:
    """Return ``data`` with its EXIF hidden from TorchCodec, which always applies EXIF orientation.

    ``ImageFolder``'s loader (and ``torchvision.io``) ignore the orientation, so must we: JPEG's APP1 segments
    and PNG's ``eXIf`` chunks are cut, WebP's ``EXIF`` chunks renamed to one readers skip (no size changes).
    ``data`` itself when it holds none (the walks stop at the first scan or IEND; a byte search for the
    marker would cost more, as entropy-coded JPEG data is full of 0xFF); None when a JPEG or PNG cannot be
    walked (PIL decodes it, or names its fault).
    """
    if data[:3] == JPEG_MAGIC:
        spans = _jpeg_exif_spans(data)
    elif data[:8] == PNG_MAGIC:
        spans = _png_exif_spans(data)
    elif data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        found = _webp_exif_chunks(data)
        if not found:
            return data
        out = bytearray(data)
        for pos in found:
            out[pos : pos + 4] = b"exif"
        return bytes(out)
    else:
        return data
    return None if spans is None else _cut(data, spans)


def _to_8_bits(samples: np.ndarray) -> np.ndarray:
    """Scale 16-bit samples (clipped to [0, 65535]) to uint8 as ``round(v / 257)``: ``v + 128`` never ties."""
    return ((samples.astype(np.int64).clip(0, 65535) + 128) // 257).astype(np.uint8)


def _raw_16_bit_samples(im: Image.Image, data: bytes) -> np.ndarray | None:
    """Return the ``[H, W, C]`` uint16 samples at PIL's raw 16-bit tiles; None if ``im`` has other tiles."""
    if im.mode not in ("RGB", "RGBA") or not im.tile:
        return None
    out = None
    for tile in im.tile:
        args = tile.args if isinstance(tile.args, tuple) else (tile.args,)
        packed_top_down = tuple(args[1:]) in ((), (0,), (0, 1))  # no padded stride, not bottom-up
        if tile.codec_name != "raw" or args[0] not in _RAW_16_BIT or not packed_top_down:
            return None
        channels = len(args[0].split(";")[0])
        if out is None:
            out = np.empty((im.height, im.width, channels), np.uint16)
        x0, y0, x1, y1 = tile.extents
        count = (x1 - x0) * (y1 - y0) * channels
        tile_samples = np.frombuffer(data, _RAW_16_BIT[args[0]], count, tile.offset)
        out[y0:y1, x0:x1] = tile_samples.reshape(y1 - y0, x1 - x0, channels)
    return out


def pil_to_rgb(data: bytes) -> Image.Image:
    """Decode ``data`` to the RGB image ``Image.open(f).convert("RGB")`` gives, save for 16-bit samples.

    First frame only; alpha dropped; EXIF orientation ignored. A 16-bit sample ``v`` becomes
    ``round(v / 257)``, where ``convert("RGB")`` saturates 16-bit grey to white (pytorch/vision#2218).
    Raises what PIL (or TorchCodec's ``decode_png``, for 16-bit PNG) raises for bytes it cannot decode.
    """
    if _png_bit_depth(data) == 16:  # PIL has no 16-bit colour mode; TorchCodec's uint8 is round(v / 257)
        stored = _without_exif(data)
        if stored is None:
            raise ValueError("a 16-bit PNG whose chunks overrun its data")
        return Image.fromarray(decode_png(_view(stored), mode="RGB").permute(1, 2, 0).numpy())
    with Image.open(io.BytesIO(data)) as im:
        if im.mode == "I" or im.mode.startswith("I;16"):  # 16-bit grey (PGM, TIFF) or 32-bit integer
            return Image.fromarray(_to_8_bits(np.asarray(im))).convert("RGB")
        wide = _raw_16_bit_samples(im, data)
        if wide is not None:
            return Image.fromarray(_to_8_bits(wide[..., :3]))
        if im.mode == "P" and isinstance(im.info.get("transparency"), bytes):
            # dropped by convert("RGB") anyway; left in, PIL warns for each such image in every epoch
            del im.info["transparency"]
        return im.convert("RGB")


def _view(data: bytes) -> torch.Tensor:
    return torch.frombuffer(data, dtype=torch.uint8)  # no copy; the buffer warning is filtered above


def fast_path(data: bytes) -> str:
    """Pick the decoder for ``data`` from its header: ``"jpeg"`` (batched), ``"image"`` or ``"pil"``."""
    if data[:3] == JPEG_MAGIC:
        return "jpeg"
    if data[:8] == PNG_MAGIC:
        return "image"  # 16-bit too: TorchCodec's uint8 output is round(v / 257), as pil_to_rgb's
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        animated = data[12:16] == b"VP8X" and len(data) > 20 and data[20] & 0x02
        return "pil" if animated else "image"  # TorchCodec gives every frame
    # GIF: TorchCodec returns every frame and fills transparency differently; BMP, TIFF, PNM: no decoder
    return "pil"


def decode_one(data: bytes, path: str = "image") -> torch.Tensor:
    """Decode one image to uint8 ``[3, H, W]`` via ``path`` (:func:`fast_path`); ``ValueError`` if empty."""
    if not data:
        raise ValueError("empty image bytes")
    stored = _without_exif(data) if path != "pil" else None
    if stored is not None:
        try:
            img = decode_image(_view(stored), mode="RGB")
        except (RuntimeError, ValueError):
            img = None  # a variant TorchCodec lacks (12-bit JPEG ...): PIL decodes it or names the fault
        # a header the routing misread (a multi-frame result) goes to PIL too
        if img is not None and img.dtype == torch.uint8 and img.shape[0] == 3 and img.dim() == 3:
            return img
    return v2.functional.pil_to_tensor(pil_to_rgb(data))


def decode_batch(blobs: list[bytes]) -> list[torch.Tensor | Exception]:
    """Decode ``blobs`` to uint8 ``[3, H, W]`` tensors (JPEGs in one call); a failure gives its exception."""
    out: list[torch.Tensor | Exception | None] = [None] * len(blobs)
    stored = [_without_exif(b) if fast_path(b) == "jpeg" else None for b in blobs]
    jpegs = [i for i, s in enumerate(stored) if s is not None]
    if jpegs:
        try:
            for i, img in zip(jpegs, decode_jpeg([_view(stored[i]) for i in jpegs], mode="RGB"), strict=True):
                out[i] = img
        except (RuntimeError, ValueError):
            pass  # one bad JPEG fails the whole call: decode them one by one below
    for i, b in enumerate(blobs):
        if out[i] is None:
            try:
                out[i] = decode_one(b, fast_path(b) if b else "pil")
            except Exception as e:  # noqa: BLE001 - reported per row by the caller
                out[i] = e
    return out

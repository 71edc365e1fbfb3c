"""Encoded bytes to uint8 RGB tensors with the pixels torchvision's ``ImageFolder`` loader gives.

JPEG: one ``decode_jpeg`` call a batch; 8-bit PNG, still WebP: ``decode_image``; the rest: PIL.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_image, decode_jpeg, decode_png
from torchvision.transforms import v2

__all__ = ["JPEG_MAGIC", "PNG_MAGIC", "decode_batch", "decode_one", "fast_path", "pil_to_rgb"]

JPEG_MAGIC = b"\xff\xd8\xff"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# The decoders only read their input, so viewing read-only buffers (Python bytes, Arrow buffers) with
# torch.frombuffer is safe; one targeted filter instead of catch_warnings, which is not thread-safe.
warnings.filterwarnings("ignore", message="The given buffer is not writable", category=UserWarning)

# PIL reads uncompressed 48/64-bit images (TIFF) through these raw modes keeping only each sample's high byte
_RAW_16_BIT = {"RGB;16L": "<u2", "RGB;16B": ">u2", "RGB;16N": "=u2", "RGBA;16L": "<u2", "RGBA;16B": ">u2"}


def _png_bit_depth(data: bytes) -> int | None:  # from the IHDR chunk, always first; None if not a PNG
    return data[24] if data[:8] == PNG_MAGIC and len(data) > 24 else None


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
    Raises what PIL (or ``decode_png``) raises for bytes it cannot decode.
    """
    if _png_bit_depth(data) == 16:  # PIL has no 16-bit colour mode; libpng gives every sample
        wide = decode_png(torch.frombuffer(data, dtype=torch.uint8), mode=ImageReadMode.RGB)
        return Image.fromarray(_to_8_bits(wide.to(torch.int32).permute(1, 2, 0).numpy()))
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


def fast_path(data: bytes) -> str:
    """Pick the decoder for ``data`` from its header: ``"jpeg"`` (batched), ``"image"`` or ``"pil"``."""
    if data[:3] == JPEG_MAGIC:
        return "jpeg"
    if data[:8] == PNG_MAGIC:
        return "pil" if _png_bit_depth(data) == 16 else "image"  # torchvision gives 16-bit PNGs as uint16
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        animated = data[12:16] == b"VP8X" and len(data) > 20 and data[20] & 0x02
        return "pil" if animated else "image"  # decode_webp refuses animations
    # GIF: decode_image returns every frame and fills transparency differently; BMP, TIFF, PNM: no decoder
    return "pil"


def decode_one(data: bytes, path: str = "image") -> torch.Tensor:
    """Decode one image to uint8 ``[3, H, W]`` via ``path`` (:func:`fast_path`); ``ValueError`` if empty."""
    if not data:
        raise ValueError("empty image bytes")
    if path != "pil":
        try:
            img = decode_image(torch.frombuffer(data, dtype=torch.uint8), mode=ImageReadMode.RGB)
        except RuntimeError:
            img = None  # a variant torchvision lacks (12-bit JPEG ...): PIL decodes it or names the fault
        # a header the routing misread (uint16 or multi-frame result) goes to PIL too
        if img is not None and img.dtype == torch.uint8 and img.shape[0] == 3 and img.dim() == 3:
            return img
    return v2.functional.pil_to_tensor(pil_to_rgb(data))


def decode_batch(blobs: list[bytes]) -> list[torch.Tensor | Exception]:
    """Decode ``blobs`` to uint8 ``[3, H, W]`` tensors (JPEGs in one call); a failure gives its exception."""
    out: list[torch.Tensor | Exception | None] = [None] * len(blobs)
    paths = [fast_path(b) if b else "pil" for b in blobs]
    jpegs = [i for i, path in enumerate(paths) if path == "jpeg"]
    if jpegs:
        try:
            tensors = [torch.frombuffer(blobs[i], dtype=torch.uint8) for i in jpegs]
            for i, img in zip(jpegs, decode_jpeg(tensors, mode=ImageReadMode.RGB), strict=True):
                out[i] = img
        except RuntimeError:
            pass  # one bad JPEG fails the whole call: decode them one by one below
    for i, (b, path) in enumerate(zip(blobs, paths, strict=True)):
        if out[i] is None:
            try:
                out[i] = decode_one(b, path)
            except Exception as e:  # noqa: BLE001 - reported per row by the caller
                out[i] = e
    return out

"""Decode a batch of stored image bytes into tensors, inside the DataLoader workers.

Workers fetch raw encoded bytes with one batched ``take``; decoding and resizing happen here, in the
collate function, so they run in parallel across workers and only fixed-size tensors cross processes.

What makes the ``decoder="torchvision"`` path fast (each step measured in ``docs/benchmark.md``, "Where
the time goes"):

- one ``decode_jpeg`` call per batch, reading the bytes in place (no copy);
- resize and crop through torchvision's tensor kernels, skipping the per-call overhead of ``v2.Compose``
  (a third of the decode time of a 32 px JPEG);
- decoded images are stored HWC, so the batch is stacked NHWC (``channels_last``): a plain copy, where
  stacking into NCHW is a transpose (five times slower at 224 px);
- a large batch is written straight into shared memory inside a worker, so handing it over copies nothing;
  a small one (and every label tensor) travels through the worker's pipe by value, because passing a
  shared-memory file descriptor costs a socket round trip per tensor (see :class:`Batch`).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import math
import warnings
from collections.abc import Mapping
from typing import Any, NamedTuple

import numpy as np
import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.io import ImageReadMode, decode_image, decode_jpeg, decode_png
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

__all__ = ["AUGMENT_SEED", "Batch", "ImageCollate", "DecodeError", "augment_seed", "stack_channels_last"]

# The row key that carries a sample's own augmentation seed (see augment_seed); rows without it draw from the
# process's generator as before.
AUGMENT_SEED = "augment_seed"


def augment_seed(seed: int, epoch: int, position: int) -> int:
    """The seed of one sample's random crop and flip: a 63-bit int from SHA-256 of ``seed``, ``epoch`` and the
    sample's ``position`` in the epoch's global order.

    Drawn from the DataLoader workers' own generators, augmentation depended on when the workers started, so
    a run resumed from a checkpoint cropped differently from an uninterrupted one (t3-ckpt-augment-resume-
    differs; starVLA#351). A seed of (seed, epoch, position) is the same in both, for any number of workers or
    processes.
    """
    digest = hashlib.sha256(f"{seed}:{epoch}:{position}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


@contextlib.contextmanager
def _seeded(seed: int | None):
    """Draw from a generator seeded with ``seed`` inside the block and leave the process's generator as it
    was; nothing changes when ``seed`` is None."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


JPEG_MAGIC = b"\xff\xd8\xff"

# The evaluation crop's share of the resized shorter side. torchvision's references/classification/presets.py
# (ClassificationPresetEval) uses 224 of 256 = 0.875 for ImageNet photos; the default here is 1.0 (shorter
# side to the output size, centre crop): nothing is cut from a square image, such as the embedded digits.
REFERENCE_CROP_FRACTION = 0.875
EVAL_CROP_FRACTION = 1.0

# The decoders only read the bytes they get, so viewing read-only buffers (Python bytes, Arrow buffers)
# with torch.frombuffer is safe; one targeted filter instead of catch_warnings, which is not thread-safe.
warnings.filterwarnings("ignore", message="The given buffer is not writable", category=UserWarning)

# Tensors up to this size cross from a worker to the main process by value, through the pipe; larger ones
# through shared memory. Measured with 2 spawn workers handing over empty uint8 batches of 64: by value
# 189k images/s at 32 px (192 KiB a batch) and 47k at 64 px (768 KiB) against 68k and 41k through shared
# memory; at 96 px (1.7 MiB) by value lost, 17k against 30k (docs/benchmark.md).
BY_VALUE_MAX_BYTES = 1 << 20


def _pack(t: torch.Tensor) -> Any:
    """A small dense CPU tensor as a numpy array in its own memory order (pickled by value); anything
    else is returned as is, for torch's shared-memory reduction."""
    if t.device.type != "cpu" or t.requires_grad or t.numel() * t.element_size() > BY_VALUE_MAX_BYTES:
        return t
    nhwc = t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)
    try:
        return ("nhwc", t.permute(0, 2, 3, 1).numpy()) if nhwc else ("dense", t.contiguous().numpy())
    except TypeError:  # a dtype numpy lacks (bfloat16)
        return t


def _unpack(part: Any) -> torch.Tensor:
    if isinstance(part, torch.Tensor):
        return part
    layout, array = part
    t = torch.from_numpy(array)
    return t.permute(0, 3, 1, 2) if layout == "nhwc" else t


def _rebuild_batch(image: Any, label: Any) -> Batch:
    return Batch(_unpack(image), _unpack(label))


class Batch(NamedTuple):
    """A decoded batch: unpacks as ``images, labels`` and also has ``.image`` / ``.label``.

    Pickling (how a DataLoader worker hands a batch to the main process) sends tensors of at most
    ``BY_VALUE_MAX_BYTES`` by value and larger ones through torch's shared memory; shapes, strides and
    values are unchanged either way.
    """

    image: torch.Tensor  # [B, 3, S, S], float32 in [0, 1] or uint8 in [0, 255]
    label: torch.Tensor  # [B], int64

    def __reduce__(self):
        return (_rebuild_batch, (_pack(self.image), _pack(self.label)))


def _in_worker() -> bool:
    return torch.utils.data.get_worker_info() is not None


def _empty(shape: tuple[int, ...], dtype: torch.dtype, shared: bool | None = None) -> torch.Tensor:
    """An uninitialised tensor; inside a worker (``shared=None``) or with ``shared=True``, a large one lives
    in shared memory from the start, as ``default_collate`` does, so sending it to the main process copies
    nothing."""
    nbytes = int(np.prod(shape)) * torch.empty(0, dtype=dtype).element_size()
    if nbytes > BY_VALUE_MAX_BYTES and (_in_worker() if shared is None else shared):
        storage = torch.UntypedStorage._new_shared(nbytes)
        return torch.empty(0, dtype=dtype).set_(storage).view(shape)
    return torch.empty(shape, dtype=dtype)


def stack_channels_last(
    images: list[torch.Tensor], dtype: torch.dtype | None = None, *, shared: bool | None = None
) -> torch.Tensor:
    """Stack ``[3, H, W]`` images into a ``[B, 3, H, W]`` batch stored NHWC (``channels_last``).

    ``decode_jpeg`` and the uint8 resize return images stored HWC, so this is a plain copy where
    ``torch.stack`` into NCHW is a transpose (five times slower at 224 px, ``docs/benchmark.md``).
    ``dtype=torch.float32`` converts uint8 to float in [0, 1] in the same pass. A batch over
    ``BY_VALUE_MAX_BYTES`` is written into shared memory when ``shared`` is True, or by default when called
    inside a DataLoader worker.
    """
    c, h, w = images[0].shape
    out = _empty((len(images), h, w, c), dtype or images[0].dtype, shared)
    hwc = [img.permute(1, 2, 0) for img in images]
    if out.dtype == images[0].dtype:
        torch.stack(hwc, out=out)
    else:
        for i, img in enumerate(hwc):
            out[i].copy_(img)
        if out.is_floating_point() and not images[0].is_floating_point():
            out.div_(255)
    return out.permute(0, 3, 1, 2)


class DecodeError(ValueError):
    """Stored bytes that do not decode; the message names the row."""


def _row_name(rows: list[dict[str, Any]], position: int) -> str:
    row = rows[position]
    for key in ("source", "id"):
        if row.get(key) is not None:
            return f"row {key}={row[key]!r}"
    describe = getattr(rows, "describe", None)  # lance_cookbook.recipe.dataset.Rows: looks the source file up
    return describe(position) if describe is not None else f"batch position {position}"


PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# PIL reads uncompressed 48/64-bit images (TIFF) through these raw modes keeping only each sample's high byte
_RAW_16_BIT = {"RGB;16L": "<u2", "RGB;16B": ">u2", "RGB;16N": "=u2", "RGBA;16L": "<u2", "RGBA;16B": ">u2"}


def _png_bit_depth(data: bytes) -> int | None:
    """The bit depth in a PNG's header (IHDR is always the first chunk), or None for anything else."""
    return data[24] if data[:8] == PNG_MAGIC and len(data) > 24 else None


def _to_8_bits(samples: np.ndarray) -> np.ndarray:
    """16-bit samples (any integer dtype; clipped to [0, 65535]) to uint8 as ``round(v / 257)``, which maps
    65535 to 255 and is exact (``v + 128`` never lands on a tie)."""
    return ((samples.astype(np.int64).clip(0, 65535) + 128) // 257).astype(np.uint8)


def _raw_16_bit_samples(im: Image.Image, data: bytes) -> np.ndarray | None:
    """``[H, W, C]`` uint16 samples of an uncompressed 16-bit colour image, read from ``data`` where PIL's
    tiles say they are; None if PIL reads ``im`` any other way (compressed, planar, 8-bit)."""
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
        tile_samples = np.frombuffer(data, _RAW_16_BIT[args[0]], count, tile.offset)  # truncated: ValueError
        out[y0:y1, x0:x1] = tile_samples.reshape(y1 - y0, x1 - x0, channels)
    return out


def _pil_to_rgb(data: bytes) -> Image.Image:
    """Encoded bytes to an RGB image as the ``ImageFolder`` loader (``Image.open(f).convert("RGB")``) shows
    it, save for 16-bit samples; the reference both decoders of :class:`ImageCollate` follow.

    The first frame of an animated image; alpha dropped, not composited (as ``ImageReadMode.RGB``); palette
    transparency ignored; EXIF orientation ignored. 16-bit samples become ``round(v / 257)``, where
    ``convert("RGB")`` saturates 16-bit grey to white (pytorch/vision#2218) and keeps only the high byte of
    16-bit colour. Raises what PIL (or ``decode_png``) raises for bytes they cannot decode.
    """
    if _png_bit_depth(data) == 16:
        # PIL has no 16-bit colour mode; libpng gives every sample (grey replicated, alpha dropped)
        wide = decode_png(torch.frombuffer(data, dtype=torch.uint8), mode=ImageReadMode.RGB)
        return Image.fromarray(_to_8_bits(wide.to(torch.int32).permute(1, 2, 0).numpy()))
    with Image.open(io.BytesIO(data)) as im:
        if im.mode == "I" or im.mode.startswith("I;16"):  # 16-bit grey (PGM, TIFF) or 32-bit integer
            return Image.fromarray(_to_8_bits(np.asarray(im))).convert("RGB")
        wide = _raw_16_bit_samples(im, data)
        if wide is not None:
            return Image.fromarray(_to_8_bits(wide[..., :3]))
        if im.mode == "P" and isinstance(im.info.get("transparency"), bytes):
            # a per-entry palette alpha, dropped by convert("RGB") anyway (same pixels): without this PIL
            # warns "should be converted to RGBA" for each such image in every epoch
            del im.info["transparency"]
        return im.convert("RGB")


def _fast_path(data: bytes) -> str:
    """Which decoder of the ``"torchvision"`` path gets ``data``, from its header alone: ``"jpeg"`` (one
    batched ``decode_jpeg``), ``"image"`` (``decode_image``) or ``"pil"`` (:func:`_pil_to_rgb`), for the
    formats where torchvision's pixels differ from ``ImageFolder``'s or it cannot decode them."""
    if data[:3] == JPEG_MAGIC:
        return "jpeg"  # baseline, progressive, grey and (Adobe) CMYK all match PIL exactly
    if data[:8] == PNG_MAGIC:
        return "pil" if _png_bit_depth(data) == 16 else "image"  # torchvision gives 16-bit PNGs as uint16
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        animated = data[12:16] == b"VP8X" and len(data) > 20 and data[20] & 0x02
        return "pil" if animated else "image"  # decode_webp refuses animations
    # GIF: decode_image returns every frame and fills transparent pixels differently from PIL; BMP, TIFF and
    # PNM: torchvision has no decoder
    return "pil"


class ImageCollate:
    """Collate ``SafeLanceDataset`` rows (``list[dict]`` with encoded ``image`` bytes and ``label``) into
    a :class:`Batch`. Picklable, so spawn workers can use it; transforms are built once.

    Parameters
    ----------
    size : int
        Output height and width in pixels.
    train : bool
        ``True``: ``RandomResizedCrop(size)`` + horizontal flip, drawn for each row from a generator seeded
        with the row's ``AUGMENT_SEED`` entry when it has one (:func:`augment_seed`), else from the
        process's generator. ``False``: the evaluation transform, shorter
        side resized to ``floor(size / crop_fraction)`` then a centre crop of ``size``, so a non-square
        photo keeps its proportions instead of being squashed.
    decoder : {"pil", "torchvision"}
        ``"torchvision"`` decodes all JPEGs of the batch in one ``torchvision.io.decode_jpeg`` call (8-bit
        PNG and still WebP through ``decode_image``; GIF, animated WebP, 16-bit PNG, BMP, TIFF and PNM
        through the PIL reference, chosen from each image's header) and resizes uint8 tensors; ``"pil"``
        decodes and transforms each image with PIL. Both give the pixels torchvision's ``ImageFolder``
        loader (``Image.open(f).convert("RGB")``) gives, to within 2 of 255 levels after the same resize
        (``tests/test_decoders.py``): the first frame of an animated image, alpha dropped (not composited),
        EXIF orientation ignored. One deliberate difference: a 16-bit sample ``v`` (PNG, TIFF, PGM/PPM)
        becomes ``round(v / 257)``, where that loader saturates 16-bit grey to white (pytorch/vision#2218).
    dtype : {torch.float32, torch.uint8}
        ``torch.float32`` (scaled to [0, 1]) or ``torch.uint8`` (raw pixels: 4x fewer bytes between
        processes; convert and normalize on the device with :func:`lance_cookbook.to_device`).
    on_error : {"raise", "skip"}
        ``"raise"`` raises :class:`DecodeError` naming the row; ``"skip"`` drops the row with a warning and
        counts it in ``self.skipped`` (per process); a batch with no decodable row still raises.
    image_column, label_column : str
        Column names in the rows.
    crop_fraction : float
        The evaluation crop's share of the resized shorter side, in (0, 1]. 1.0 (default) resizes the
        shorter side to ``size`` and crops the rest; 0.875 (``REFERENCE_CROP_FRACTION``) is torchvision's
        ``references/classification/presets.py`` recipe for photos (resize 256, crop 224).

    Returns
    -------
    Batch
        Called on rows: ``(image [B, 3, size, size], label int64 [B])``; on one row (a ``dict``, as a
        ``DataLoader`` with ``batch_size=None`` passes): ``(image [3, size, size], label int64 [])``. The
        image batch is stored ``channels_last`` (NHWC strides, the layout the decoders write; convolutions
        accept it and it is the faster layout on GPUs); ``images.contiguous()`` gives NCHW strides.
        Grayscale, RGBA, palette and CMYK inputs all come out RGB.

    Raises
    ------
    ValueError
        At construction, for an unknown ``decoder``, ``dtype``, ``on_error``, a size below 1 or a
        ``crop_fraction`` outside (0, 1].
    DecodeError
        When called, for bytes neither path decodes (with ``on_error="raise"``), naming the row, wherever in
        the batch decode it fails; with ``on_error="skip"``, when no row of the batch decodes.
    """

    def __init__(
        self,
        size: int = 224,
        train: bool = False,
        decoder: str = "pil",
        dtype: torch.dtype = torch.float32,
        on_error: str = "raise",
        image_column: str = "image",
        label_column: str = "label",
        crop_fraction: float = EVAL_CROP_FRACTION,
    ):
        if decoder not in ("pil", "torchvision"):
            raise ValueError(f"decoder must be 'pil' or 'torchvision', got {decoder!r}")
        if dtype not in (torch.float32, torch.uint8):
            raise ValueError(f"dtype must be torch.float32 or torch.uint8, got {dtype}")
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        if int(size) < 1:
            raise ValueError(f"size must be a positive int, got {size!r}")
        if not 0 < crop_fraction <= 1:
            raise ValueError(f"crop_fraction must be in (0, 1], got {crop_fraction!r}")
        self.size = int(size)
        self.crop_fraction = crop_fraction
        self.resize_size = math.floor(self.size / crop_fraction)
        self.train = train
        self.decoder = decoder
        self.dtype = dtype
        self.on_error = on_error
        self.image_column = image_column
        self.label_column = label_column
        self.skipped = 0
        self._crop = v2.RandomResizedCrop(self.size, antialias=True)  # its scale and ratio serve both paths
        if train:
            geometry = [self._crop, v2.RandomHorizontalFlip()]
        else:
            geometry = [v2.Resize(self.resize_size, antialias=True), v2.CenterCrop(self.size)]
        # PIL path: geometry on the PIL image, then to tensor; the torchvision path calls the same geometry's
        # tensor kernels directly (_geometry)
        self._pil_transform = v2.Compose([*geometry, v2.PILToTensor()])

    @property
    def columns(self) -> tuple[str, ...]:
        """The columns it reads; ``make_loader`` reads only these (a subclass may name more)."""
        return (self.image_column, self.label_column)

    def __repr__(self) -> str:
        return (
            f"ImageCollate(size={self.size}, train={self.train}, decoder={self.decoder!r}, "
            f"dtype={self.dtype}, on_error={self.on_error!r}, crop_fraction={self.crop_fraction})"
        )

    # ------------------------------------------------------------------------------------------- decode
    def _geometry(self, img: torch.Tensor) -> torch.Tensor:
        """``RandomResizedCrop`` + flip (train) or shorter-side ``Resize`` + ``CenterCrop`` (evaluation) on a
        uint8 ``[3, H, W]`` tensor, through torchvision's kernels (same parameters and results as the ``v2``
        transforms the PIL path composes)."""
        size = [self.size, self.size]
        if self.train:
            top, left, h, w = T.RandomResizedCrop.get_params(img, self._crop.scale, self._crop.ratio)
            img = F.resized_crop_image(img, top, left, h, w, size=size, antialias=True)
            return F.horizontal_flip_image(img) if torch.rand(1) < 0.5 else img
        img = F.resize_image(img, [self.resize_size], antialias=True)
        return F.center_crop_image(img, size)

    def _decode_pil(self, data: bytes) -> torch.Tensor:
        return self._pil_transform(_pil_to_rgb(data))

    def _decode_one(self, data: bytes, path: str) -> torch.Tensor:
        """One image as a uint8 ``[3, H, W]`` tensor, through torchvision where it gives ``ImageFolder``'s
        pixels and through :func:`_pil_to_rgb` otherwise."""
        if not data:
            raise ValueError("empty image bytes")
        if path != "pil":
            try:
                img = decode_image(torch.frombuffer(data, dtype=torch.uint8), mode=ImageReadMode.RGB)
            except RuntimeError:
                img = None  # a variant torchvision lacks (12-bit JPEG ...); PIL decodes it or names the fault
            # a header the routing misread (uint16 or multi-frame result): PIL, never wrapped bytes or frames
            if img is not None and img.dtype == torch.uint8 and img.shape[0] == 3 and img.dim() == 3:
                return img
        return v2.functional.pil_to_tensor(_pil_to_rgb(data))

    def _decode_torchvision(
        self, blobs: list[bytes], seeds: list[int | None] | None = None
    ) -> list[torch.Tensor | Exception]:
        """Decode ``blobs``; ``seeds[i]`` (None: this process's generator) draws row i's augmentation."""
        seeds = seeds if seeds is not None else [None] * len(blobs)
        out: list[torch.Tensor | Exception | None] = [None] * len(blobs)
        paths = [_fast_path(b) if b else "pil" for b in blobs]
        jpegs = [i for i, path in enumerate(paths) if path == "jpeg"]
        if jpegs:
            try:
                tensors = [torch.frombuffer(blobs[i], dtype=torch.uint8) for i in jpegs]
                for i, img in zip(jpegs, decode_jpeg(tensors, mode=ImageReadMode.RGB), strict=True):
                    out[i] = img
            except RuntimeError:
                pass  # one bad or unsupported JPEG fails the whole call: decode those one by one below
        for i, (b, path) in enumerate(zip(blobs, paths, strict=True)):
            # every step of one row inside its own try, so a fault anywhere names that row and obeys on_error
            try:
                with _seeded(seeds[i]):
                    out[i] = self._geometry(out[i] if out[i] is not None else self._decode_one(b, path))
            except Exception as e:  # noqa: BLE001 - reported per row by the caller
                out[i] = e
        return out

    def __call__(self, rows: list[dict[str, Any]] | Mapping[str, Any]) -> Batch:
        if isinstance(rows, Mapping):  # one row: a DataLoader with batch_size=None passes rows one by one
            image, label = self([rows])
            return Batch(image[0], label[0])
        blobs = [row[self.image_column] for row in rows]
        # a row's own seed (AUGMENT_SEED, set by training's loader) makes its crop and flip reproducible
        seeds = [row.get(AUGMENT_SEED) if self.train else None for row in rows]
        if self.decoder == "torchvision":
            decoded = self._decode_torchvision(blobs, seeds)
        else:
            decoded = []
            for b, seed in zip(blobs, seeds, strict=True):
                try:
                    if not b:
                        raise ValueError("empty image bytes")
                    with _seeded(seed):
                        decoded.append(self._decode_pil(b))
                except Exception as e:  # noqa: BLE001 - reported per row below
                    decoded.append(e)
        images, labels = [], []
        for position, (row, img) in enumerate(zip(rows, decoded, strict=True)):
            if isinstance(img, Exception):
                message = f"cannot decode image at {_row_name(rows, position)}: {img}"
                if self.on_error == "raise":
                    raise DecodeError(message) from img
                self.skipped += 1
                warnings.warn(f"skipped {message}", stacklevel=2)
                continue
            images.append(img)
            labels.append(row[self.label_column])
        if not images:
            raise DecodeError(f"no image in this batch of {len(rows)} rows could be decoded")
        return Batch(stack_channels_last(images, self.dtype), torch.tensor(labels, dtype=torch.int64))

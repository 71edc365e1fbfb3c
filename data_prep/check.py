"""One image's check: the test every converted image passes, importable without Lance, PyArrow or torch.

:func:`check_image` checks encoded bytes; :func:`check_items` reads and checks a list of them, which is the
unit of work of a checking worker process (``data_prep.pool``); :func:`init_worker` gives such a worker
this process's PIL settings. This module imports only PIL, so a worker starts without loading Lance.
"""

from __future__ import annotations

import io
import signal
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

from PIL import Image, ImageFile, JpegImagePlugin, UnidentifiedImageError

from lance_cookbook.recipe.start_method import end_with_process

__all__ = [
    "ConversionError",
    "InvalidImage",
    "ParameterError",
    "apply_pil_settings",
    "check_image",
    "check_items",
    "image_pixel_limit",
    "init_worker",
    "pil_settings",
    "read_image",
]


class ConversionError(Exception):
    """Bad input for a conversion; the message names the file, row or path at fault."""


class ParameterError(ConversionError):
    """A parameter of ``convert()`` that cannot be used.

    The message names it as the Python API does (``max_rows``); :attr:`cli_message` names the command-line
    flag instead (``--max-rows``).

    ``template`` holds ``{name}`` where the parameter goes; ``api_name``/``cli_name`` fill it.
    """

    def __init__(self, template: str, api_name: str, cli_name: str):
        super().__init__(template.format(name=api_name))
        self.cli_message = template.format(name=cli_name)


class InvalidImage(ConversionError):
    """One image failed its check; ``where`` names the file or row."""

    def __init__(self, where: str, reason: str):
        super().__init__(f"{where}: {reason}")
        self.where = where
        self.reason = reason


def check_image(data: bytes, where: str) -> tuple[int, int]:
    """Return ``(width, height)`` of an encoded image, or raise :class:`InvalidImage` naming ``where``.

    Opens the image with PIL, runs ``verify()`` (checksums, structure) and then really decodes it,
    at 1/8 scale for JPEG (libjpeg's DCT scaling keeps this cheap), which is what catches truncated files.
    Images with more pixels than ``PIL.Image.MAX_IMAGE_PIXELS`` are refused as decompression bombs (PIL
    itself only warns up to twice that: refusing at the limit keeps a genuine bomb such as
    dataset-viewer#1192's 90-MP PNG of 11 KB out; :func:`image_pixel_limit` raises it for a conversion).
    """
    if not data:
        raise InvalidImage(where, "empty file (0 bytes)")
    if data[:3] == b"\xff\xd8\xff":
        size = _check_jpeg(data)
        if size is not None:
            return size
    try:
        with Image.open(io.BytesIO(data)) as im:
            width, height = im.size
            _refuse_bomb(width, height, where)
            if im.format == "JPEG":
                # PIL's verify() checks nothing for JPEG: decode on this handle instead of parsing the
                # headers a second time (half the cost of a check of a small JPEG)
                im.draft(im.mode, (max(1, width // 8), max(1, height // 8)))
                im.load()
                return width, height
            im.verify()
        with Image.open(io.BytesIO(data)) as im:
            im.load()
    except InvalidImage:
        raise
    except Image.DecompressionBombError as e:
        raise InvalidImage(where, f"decompression bomb: {e}") from None
    except UnidentifiedImageError:
        raise InvalidImage(where, f"not a readable image ({len(data):,} bytes PIL cannot identify)") from None
    except (OSError, SyntaxError, ValueError, EOFError, IndexError) as e:
        raise InvalidImage(where, f"corrupt image: {e}") from None
    except MemoryError:
        raise
    except Exception as e:  # noqa: BLE001 - a plugin's parser failing in its own way (struct.error ...)
        raise InvalidImage(where, f"corrupt image ({type(e).__name__}: {e})") from None
    return width, height


def _refuse_bomb(width: int, height: int, where: str) -> None:
    limit = Image.MAX_IMAGE_PIXELS
    if limit and width * height > limit:
        raise InvalidImage(
            where,
            f"decompression bomb: {width}x{height} = {width * height:,} pixels is more than "
            f"PIL.Image.MAX_IMAGE_PIXELS ({limit:,})",
        )


@contextmanager
def image_pixel_limit(max_pixels: int | None) -> Iterator[None]:
    """Set ``PIL.Image.MAX_IMAGE_PIXELS`` to ``max_pixels`` (width x height) for the block, then restore it.

    ``None`` leaves it as it is.

    The one setting both checks read: :func:`check_image` refuses images above it, and PIL's own guard,
    which refuses at twice it, never refuses first. Checking workers copy it (:func:`pil_settings`). It is
    process-wide: two conversions in one process at once must not ask for different limits. Why an option:
    a 100-MP camera photo is above PIL's default (89.5 MP), and a command-line user had no way to raise it
    (TagStudio#164, the t3-conv-100mp-photo-refused report).
    """
    previous = Image.MAX_IMAGE_PIXELS
    if max_pixels is not None:
        Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = previous


def _check_jpeg(data: bytes) -> tuple[int, int] | None:
    """``(width, height)`` of a sound JPEG within the pixel limit, else None (the general path decides).

    The same draft decode as :func:`check_image`, without ``Image.open``'s format probing: a fifth of the
    check of a small JPEG. Any doubt returns None, so every message still comes from one place.
    """
    try:
        with JpegImagePlugin.JpegImageFile(io.BytesIO(data)) as im:
            width, height = im.size
            limit = Image.MAX_IMAGE_PIXELS
            if limit and width * height > limit:
                return None
            im.draft(im.mode, (max(1, width // 8), max(1, height // 8)))
            im.load()
            return width, height
    except Exception:
        return None


def read_image(path: str, where: str) -> bytes:
    """The bytes of the file at ``path``; raises :class:`InvalidImage` naming ``where`` if unreadable."""
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise InvalidImage(where, f"cannot read file: {e.strerror or e}") from None


# ------------------------------------------------------------------------------------- worker processes
def pil_settings() -> dict:
    """The PIL settings that change what :func:`check_image` accepts, for a worker process to copy."""
    return {
        "max_image_pixels": Image.MAX_IMAGE_PIXELS,
        "load_truncated_images": bool(ImageFile.LOAD_TRUNCATED_IMAGES),
    }


def check_items(items: list[str | bytes]) -> list[tuple[bytes | None, int, int] | str]:
    """Read (a ``str`` is a path) and check each item, in order.

    Returns per item ``(data, width, height)``, where ``data`` is the file's bytes for a path and None for
    bytes (the caller has them already), or the reason it is invalid (a ``str``, the ``reason`` of the
    :class:`InvalidImage`: exceptions with extra fields do not survive pickling intact).
    """
    # All reads first, then all checks: 20 % faster for small images than alternating (CPU caches)
    datas: list[bytes | InvalidImage] = []
    for item in items:
        try:
            datas.append(read_image(item, item) if isinstance(item, str) else item)
        except InvalidImage as e:
            datas.append(e)
    out: list[tuple[bytes | None, int, int] | str] = []
    for item, data in zip(items, datas, strict=True):
        try:
            if isinstance(data, InvalidImage):
                raise data
            out.append((data if isinstance(item, str) else None, *check_image(data, "")))
        except InvalidImage as e:
            out.append(e.reason)
    return out


def init_worker(settings: dict, parent_pid: int | None = None) -> None:
    """Initializer of a checking worker process.

    It applies ``settings`` (:func:`pil_settings` of the parent, so both sides accept the same images),
    leaves SIGINT to the parent, and ends with ``parent_pid``.

    A Ctrl-C in a terminal reaches every process of the foreground group; the parent stops the pool itself,
    and a worker dying of KeyboardInterrupt would only turn that into a broken pool and a traceback. A
    worker forked from a fork server would outlive a SIGKILLed conversion for ever (blocked on its task
    queue, and keeping the fork server alive): it watches the conversion's pid instead
    (:func:`lance_cookbook.recipe.start_method.end_with_process`).
    """
    if parent_pid is not None:
        end_with_process(parent_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    apply_pil_settings(settings)
    # check_image refuses such images with its own message; the warning would only add noise
    warnings.simplefilter("ignore", Image.DecompressionBombWarning)


def apply_pil_settings(settings: dict) -> None:
    """Make this process's PIL accept what the process that took ``settings`` (:func:`pil_settings`) does.

    This process is a checking worker process, or a Ray task on another node.
    """
    Image.MAX_IMAGE_PIXELS = settings["max_image_pixels"]
    ImageFile.LOAD_TRUNCATED_IMAGES = settings["load_truncated_images"]

"""Decoding one image value, whatever form a dataset stores it in, into 8-bit RGB, or a clear `UnreadableImageError`.

`decode_image` accepts a PIL image, `{"bytes", "path"}` records (what `sources.disable_image_decoding` leaves),
raw bytes, a file path or URL, and numpy arrays; it applies the EXIF orientation, turns every mode (palette, 16-bit,
float, CMYK, with alpha) into RGB (`to_rgb`), and decodes a large JPEG at a reduced size when the later random crop
allows it (`reduced_decode_size`), or straight to a uint8 tensor (`fast_jpeg`). An empty, truncated or non-image
value raises `UnreadableImageError` naming the file, which `pipeline.py`'s example transforms turn into a skipped
example. Imports nothing of the package.

One size limit for every decoder: before any pixel is decoded, the image's width and height are read from its header
(PIL's lazy `Image.open`, or for the fast JPEG path the frame header, `jpeg_frame_size`) and `check_image_pixels`
refuses an image of more than `max_image_pixels` pixels (`--max_image_pixels`, by default PIL's
`Image.MAX_IMAGE_PIXELS`, 89,478,485; `None` or 0 for no limit) as an `UnreadableImageError` naming the file, its
size and the limit. A 2 MB JPEG can claim 13,441 x 13,441 pixels (half a gigabyte decoded) or 65,000 x 65,000
(12.7 GB); none is decoded. PIL's own guard (a warning above its limit, an error above twice that) is lifted while
the header is read, so that the limit given here is the one that holds, on every path alike; the segmentation masks
(`segmentation.read_mask`) and `webdataset.write_shards` call the same check.
"""

from __future__ import annotations

import io
import logging
import math
import os
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, BinaryIO

import numpy as np
import PIL.Image
import PIL.ImageOps
import torch
from torchvision.io import ImageReadMode
from torchvision.io import decode_image as decode_image_tensor

from modeling_mimco.data.arguments import DEFAULT_MAX_IMAGE_PIXELS


logger = logging.getLogger(__name__)


class UnreadableImageError(OSError):
    """An image that cannot be decoded: empty, truncated, not an image, or of an unsupported kind.

    Attributes:
        path: The file path or name of the image when known, else `None`.
    """

    def __init__(self, description: str, path: str | None = None):
        super().__init__(description)
        self.path = path


def check_image_pixels(
    width: int,
    height: int,
    label: str,
    max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
    path: str | None = None,
) -> None:
    """Refuses an image whose header gives it more than `max_image_pixels` pixels, before it is decoded.

    The one size check of every path that turns stored bytes into pixels. `label` names the image in the message
    (e.g. `"'train/n01440764_10026.JPEG'"`), `path` is kept on the error. `None` or 0 sets no limit.

    Raises:
        UnreadableImageError: naming the image, its width x height and the limit.
    """
    if not max_image_pixels or max_image_pixels < 0:
        return
    pixels = int(width) * int(height)
    if pixels > max_image_pixels:
        raise UnreadableImageError(
            f"Unreadable image {label}: its header gives {width} x {height} = {pixels:,} pixels, more than the limit "
            f"of {max_image_pixels:,} (--max_image_pixels; a possible decompression bomb); not decoded.",
            path=path,
        )


_PIL_GUARD_LOCK = threading.Lock()


@contextmanager
def pil_size_guard_lifted() -> Iterator[None]:
    """PIL's own decompression-bomb guard switched off while a header is read (`PIL.Image.open`), so that
    `check_image_pixels` with the caller's limit is the one that holds (PIL would warn above its limit and refuse
    above twice that, whatever the caller's limit). Only the header is parsed meanwhile; a lock keeps threads from
    restoring each other's setting."""
    with _PIL_GUARD_LOCK:
        saved = PIL.Image.MAX_IMAGE_PIXELS
        PIL.Image.MAX_IMAGE_PIXELS = None
        try:
            yield
        finally:
            PIL.Image.MAX_IMAGE_PIXELS = saved


def open_checked(
    data: bytes | BinaryIO,
    label: str,
    max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
    path: str | None = None,
) -> PIL.Image.Image:
    """`PIL.Image.open` of encoded bytes or an open binary file (the header only, nothing decoded yet) and
    `check_image_pixels` on the size it reads; the lazily opened image, to `load()` or `draft()`. PIL's errors for
    data that is no image pass through as they are."""
    with pil_size_guard_lifted():
        image = PIL.Image.open(io.BytesIO(data) if isinstance(data, (bytes, bytearray)) else data)
    check_image_pixels(*image.size, label, max_image_pixels, path)
    return image


# SOF0..SOF15 but DHT (C4), JPG (C8) and DAC (CC): the frame headers, which hold the image's height and width
_JPEG_FRAME_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


def jpeg_frame_size(data: bytes) -> tuple[int, int] | None:
    """`(width, height)` from a JPEG's frame header (SOFn), found by walking the marker segments from the start;
    `None` when `data` is not a JPEG or no frame header comes before the scan. Costs microseconds: the fast path
    checks the size without PIL's header parse."""
    if data[:2] != b"\xff\xd8":
        return None
    position, end = 2, len(data)
    while position + 4 <= end:
        if data[position] != 0xFF:
            return None
        marker = data[position + 1]
        if marker == 0xFF:  # a fill byte
            position += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # markers without a length
            position += 2
            continue
        if marker in (0xD9, 0xDA):  # the end, or a scan, before any frame header
            return None
        if marker in _JPEG_FRAME_MARKERS:
            if position + 9 > end:
                return None
            height = int.from_bytes(data[position + 5 : position + 7], "big")
            width = int.from_bytes(data[position + 7 : position + 9], "big")
            return width, height
        position += 2 + int.from_bytes(data[position + 2 : position + 4], "big")
    return None


def to_rgb(image: PIL.Image.Image) -> PIL.Image.Image:
    """Converts any PIL image to 8-bit RGB of the same size.

    - `RGB` is returned as is; `1`, `L`, `P`, `CMYK`, `YCbCr`, `HSV`, `RGBX` are converted by PIL.
    - Transparency (`RGBA`, `RGBa`, `LA`, `La`, `PA`, and `P`/`L`/`RGB` images with a `transparency` entry) is
      **composited on a white background**: fully transparent pixels become white, not whatever colour happens to
      lie under zero alpha (often black or noise), which is what an image viewer shows.
    - 16-bit integers (`I;16`, `I;16B`, `I;16L`, `I;16N`) are scaled from 0..65535 to 0..255 (not clipped).
    - 32-bit integers (`I`): values within 0..255 are kept, within 0..65535 scaled as 16-bit, anything else
      (negative or larger) min-max normalised.
    - 32-bit floats (`F`): values within 0..1 are multiplied by 255, within 0..255 kept, anything else min-max
      normalised; NaNs become 0.
    """
    mode = image.mode
    if mode == "RGB" and "transparency" not in image.info:
        return image
    if mode.startswith("I;16"):
        return _array_to_rgb(np.asarray(image).astype(np.float64) * (255.0 / 65535.0))
    if mode == "I":
        values = np.asarray(image).astype(np.float64)
        low, high = (values.min(), values.max()) if values.size else (0.0, 0.0)
        if low >= 0 and high <= 255:
            return _array_to_rgb(values)
        if low >= 0 and high <= 65535:
            return _array_to_rgb(values * (255.0 / 65535.0))
        return _array_to_rgb(_min_max(values))
    if mode == "F":
        values = np.nan_to_num(np.asarray(image).astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        low, high = (values.min(), values.max()) if values.size else (0.0, 0.0)
        if low >= 0 and high <= 1:
            return _array_to_rgb(values * 255.0)
        if low >= 0 and high <= 255:
            return _array_to_rgb(values)
        return _array_to_rgb(_min_max(values))
    has_alpha = mode in ("RGBA", "RGBa", "LA", "La", "PA") or "transparency" in image.info
    if has_alpha:
        if mode == "La":  # premultiplied; PIL converts it to RGBA only through LA
            image = image.convert("LA")
        rgba = image.convert("RGBA")
        background = PIL.Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return PIL.Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _min_max(values: np.ndarray) -> np.ndarray:
    low, high = values.min(), values.max()
    if high <= low:
        return np.zeros_like(values)
    return (values - low) * (255.0 / (high - low))


def _array_to_rgb(values: np.ndarray) -> PIL.Image.Image:
    pixels = np.clip(np.round(values), 0, 255).astype(np.uint8)
    return PIL.Image.fromarray(pixels).convert("RGB")


def _describe_image_value(value: Any) -> str | None:
    """The file path or name behind an image value, when it has one."""
    if isinstance(value, dict):
        path = value.get("path")
        return str(path) if path else None
    if isinstance(value, (str, os.PathLike)):
        return os.fspath(value)
    if isinstance(value, PIL.Image.Image):
        return getattr(value, "filename", None) or None
    return None


def reduced_decode_size(width: int, height: int, image_size: int, min_crop_scale: float) -> tuple[int, int] | None:
    """The smallest size a JPEG may be decoded at so that even the smallest random crop (area fraction
    `min_crop_scale`, aspect ratio down to 3/4) still covers `image_size` pixels on its short side; `None` when
    decoding at full size is needed."""
    factor = image_size / math.sqrt(min_crop_scale * width * height * 0.75)
    if factor >= 0.5:  # libjpeg reduces by 1/2, 1/4 or 1/8 only
        return None
    return max(1, math.ceil(width * factor)), max(1, math.ceil(height * factor))


def _decode_jpeg_to_tensor(data: bytes) -> torch.Tensor | None:
    """libjpeg-turbo through torchvision, straight into a uint8 `(3, H, W)` tensor, about twice as fast as PIL
    followed by a conversion; `None` for anything but a complete JPEG, or when it fails (PIL then decodes, and reports
    a broken file the usual way)."""
    if not (data[:3] == b"\xff\xd8\xff" and data[-2:] == b"\xff\xd9"):
        return None
    try:
        return decode_image_tensor(
            torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB, apply_exif_orientation=True
        )
    except RuntimeError:
        return None


def decode_image(
    value: Any,
    token: str | bool | None = None,
    draft_for: tuple[int, float] | None = None,
    fast_jpeg: bool = False,
    where: str | None = None,
    max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
) -> PIL.Image.Image | torch.Tensor:
    """Opens, fully loads and converts one image to 8-bit RGB (see `to_rgb`).

    Args:
        value: What a `datasets.Image(decode=False)` column holds (`{"bytes": ..., "path": ...}`; `bytes` may be
            `None`, then the local or remote `path` is read), a PIL image, raw encoded `bytes`, or a file path.
        token: Hub token used to read a remote `path` (streamed Hub datasets without embedded bytes).
        draft_for: `(image_size, min_crop_scale)` of the random crop that follows. A large JPEG is then decoded by
            libjpeg at 1/2, 1/4 or 1/8 of its size when even the smallest crop keeps `image_size` pixels
            (`reduced_decode_size`), which makes decoding several times faster.
        fast_jpeg: Return a JPEG that needs no reduction as a uint8 `(3, H, W)` tensor decoded by torchvision
            (faster); other images are still returned as PIL images. For transforms that accept both.
        where: Where the value came from (e.g. `"row 7 (0-based) of '/data/train.parquet'"`), named in the error
            when the value carries no file name.
        max_image_pixels: The largest width x height decoded (`check_image_pixels`, on the size the header gives,
            before decoding, on every path: PIL, the reduced-size JPEG, the fast JPEG, a PIL image given); `None` or
            0 for no limit. Default: PIL's `Image.MAX_IMAGE_PIXELS`.

    The pixels are read completely (`Image.load()`), so a truncated file fails here rather than later. The EXIF
    orientation is applied, as `datasets` does when it decodes images itself. Note that PIL decodes truncated files
    without error if some code sets `PIL.ImageFile.LOAD_TRUNCATED_IMAGES = True`.

    Raises:
        UnreadableImageError: for empty, truncated or non-image data, or an image of more than `max_image_pixels`
            pixels; the message names the file when known.
    """
    name = _describe_image_value(value)
    if name:
        label = repr(name)
    else:
        label = f"in {where} (no file name)" if where else "(no file name)"
    try:
        if isinstance(value, PIL.Image.Image):
            image = value
            check_image_pixels(*image.size, label, max_image_pixels, name)
            image.load()
        else:
            data = _read_image_bytes(value, token)
            if len(data) == 0:
                raise UnreadableImageError(f"Unreadable image {label}: the file is empty (0 bytes).", path=name)
            if fast_jpeg and draft_for is None:
                # the size from the frame header alone: PIL's parsing of the header costs a third of the decoding
                size = jpeg_frame_size(data)
                if size is not None:
                    check_image_pixels(*size, label, max_image_pixels, name)
                    tensor = _decode_jpeg_to_tensor(data)
                    if tensor is not None:
                        return tensor
            image = open_checked(data, label, max_image_pixels, name)
            reduced = None
            if draft_for is not None and image.format == "JPEG":
                reduced = reduced_decode_size(*image.size, *draft_for)
                if reduced is not None:
                    image.draft("RGB", reduced)
            if fast_jpeg and reduced is None:
                tensor = _decode_jpeg_to_tensor(data)
                if tensor is not None:
                    return tensor
            image.load()
        image = _apply_exif_orientation(image)
        return to_rgb(image)
    except UnreadableImageError:
        raise
    except Exception as err:  # PIL raises many kinds of errors for broken files
        # PIL names an in-memory file by its object address, which tells the reader nothing
        detail = _BYTES_IO_REPR.sub("", str(err))
        raise UnreadableImageError(f"Unreadable image {label}: {type(err).__name__}: {detail}", path=name) from err


_BYTES_IO_REPR = re.compile(r" ?<_io\.BytesIO object at 0x[0-9a-fA-F]+>")


def _read_image_bytes(value: Any, token: str | bool | None) -> bytes:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, (str, os.PathLike)):
        value = {"bytes": None, "path": os.fspath(value)}
    if not isinstance(value, dict):
        raise TypeError(f"expected an image record, PIL image, bytes or path, got {type(value).__name__}")
    if value.get("bytes") is not None:
        return bytes(value["bytes"])
    path = value.get("path")
    if not path:
        raise ValueError("the image record has neither bytes nor a path")
    if "://" in path or "::" in path:
        from datasets import DownloadConfig
        from datasets.utils.file_utils import xopen

        with xopen(path, "rb", download_config=DownloadConfig(token=token)) as file:
            return file.read()
    with open(path, "rb") as file:
        return file.read()


def _apply_exif_orientation(image: PIL.Image.Image) -> PIL.Image.Image:
    try:
        orientation = image.getexif().get(PIL.Image.ExifTags.Base.Orientation)
    except Exception:  # a broken EXIF block does not make the pixels unreadable
        return image
    if orientation is None or orientation == 1:
        return image
    return PIL.ImageOps.exif_transpose(image)

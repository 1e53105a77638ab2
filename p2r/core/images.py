"""Image decoding and the model-side resize (qwen-vl-utils' ``smart_resize``, factor 32).

Every image a model receives (original, annotated, crops) goes through ``resize_for_model`` with
the same pixel bounds, as in the reference runs; decoding errors become ``ImageError`` with a
message that names what was wrong, so servers and loaders can report it to the user.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

from PIL import Image, ImageOps, UnidentifiedImageError

from p2r.core.errors import UserError

RESIZE_FACTOR = 32
"""Qwen3-VL: 16-pixel patches merged 2x2."""
MIN_PIXELS = 4 * 32 * 32
TRAIN_MAX_PIXELS = 2_097_152
EVAL_MIN_PIXELS = 16 * 32 * 32
EVAL_MAX_PIXELS = 4096 * 32 * 32
MAX_ASPECT_RATIO = 200


class ImageError(UserError):
    """An image that cannot be used: empty, undecodable, or beyond a configured limit."""


@dataclass(frozen=True)
class PixelBounds:
    """min/max pixel budget handed to ``smart_resize``."""

    min_pixels: int = MIN_PIXELS
    max_pixels: int = TRAIN_MAX_PIXELS

    def __post_init__(self) -> None:
        if not 0 < self.min_pixels <= self.max_pixels:
            raise ValueError(
                f"pixel bounds need 0 < min_pixels <= max_pixels, "
                f"got {self.min_pixels} and {self.max_pixels}"
            )


TRAIN_BOUNDS = PixelBounds(MIN_PIXELS, TRAIN_MAX_PIXELS)
EVAL_BOUNDS = PixelBounds(EVAL_MIN_PIXELS, EVAL_MAX_PIXELS)


def open_image(data: bytes, *, field: str = "image", max_pixels: int | None = None) -> Image.Image:
    """Read the header of encoded image bytes: format and size are checked, pixels not decoded.

    Cheap, so a server can validate a whole batch before decoding any of it; ``max_pixels``
    guards against decompression bombs before the pixels are materialised.
    """
    if not data:
        raise ImageError(f"{field}: image is empty (0 bytes)")
    try:
        image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise ImageError(
            f"{field}: cannot decode image ({len(data)} bytes): not a JPEG, PNG, WebP or other known format"
        ) from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ImageError(f"{field}: cannot decode image ({len(data)} bytes): {e}") from None
    if max_pixels is not None and image.width * image.height > max_pixels:
        raise ImageError(
            f"{field}: image has {image.width}x{image.height} = "
            f"{image.width * image.height} pixels, over the limit of {max_pixels}"
        )
    return image


_EXIF_ORIENTATION = 0x0112
_TRANSPOSING = frozenset({5, 6, 7, 8})
"""EXIF orientations that swap width and height (90/270-degree rotations, transposes)."""


def orientation(image: Image.Image) -> int:
    """The EXIF orientation tag (1 = as stored), read from the header; unreadable EXIF counts
    as 1, shown as stored, as browsers do."""
    try:
        value = image.getexif().get(_EXIF_ORIENTATION, 1)
    except (OSError, SyntaxError, ValueError):
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def displayed_size(image: Image.Image) -> tuple[int, int]:
    """(width, height) as a viewer shows the image: a phone JPEG stored 400x200 with EXIF
    orientation 6 is displayed 200x400. Read from the header, pixels not decoded."""
    return (image.height, image.width) if orientation(image) in _TRANSPOSING else image.size


def load_image(image: Image.Image, *, field: str = "image") -> Image.Image:
    """Decode the pixels of an opened image into RGB, upright; corrupt data is an ImageError.

    The EXIF orientation is applied here, at the one place every image is decoded (gRPC, HTTP,
    OpenAI, data loading, eval), so regions are in the coordinates people see: the page draws
    them on the browser-rotated image.

    An RGB image is returned as decoded: ``convert("RGB")`` would copy it, holding twice the
    memory of a 100-megapixel image for nothing. Callers pass a freshly opened image, so the
    other mode's original is freed as soon as this returns."""
    try:
        image.load()
        upright = image if orientation(image) == 1 else ImageOps.exif_transpose(image)
        return upright if upright.mode == "RGB" else upright.convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ImageError(f"{field}: cannot decode image: {e}") from None


def decode_image(data: bytes, *, field: str = "image", max_pixels: int | None = None) -> Image.Image:
    """Decode encoded bytes (JPEG/PNG/WebP/...) into an RGB image."""
    return load_image(open_image(data, field=field, max_pixels=max_pixels), field=field)


def encode_image(image: Image.Image, fmt: str = "PNG") -> bytes:
    """Encode an image to bytes (PNG by default: lossless, so tests compare exact pixels)."""
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """(height, width) exactly as ``qwen_vl_utils.vision_process.smart_resize`` computes it.

    Reproduced rather than imported: qwen-vl-utils imports torchvision and pulls PyAV for video.
    It differs from transformers' function of the same name for thin images: each side is first
    rounded to the nearest multiple of ``factor`` but at least one factor (``max(factor,
    round(side / factor) * factor)``, Python's round), and only then are the pixel bounds applied
    (floor when over ``max_pixels``, ceil when under ``min_pixels``). So (6, 722) gives (32, 736)
    at the training and the evaluation bounds alike, where transformers gives (32, 704) and
    (32, 1408). The released checkpoints saw the reference's sizes.
    """
    if min(height, width) <= 0:
        raise ValueError(f"image sides must be positive, got {height}x{width}")
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise ValueError(f"absolute aspect ratio must be smaller than {MAX_ASPECT_RATIO}, "
                         f"got {max(height, width) / min(height, width)}")
    h_bar = max(factor, round(height / factor) * factor)
    w_bar = max(factor, round(width / factor) * factor)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = math.floor(height / beta / factor) * factor
        w_bar = math.floor(width / beta / factor) * factor
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    if h_bar <= 0 or w_bar <= 0:  # the reference's floor can reach 0 for a side under one factor
        raise ValueError(f"a side rounds to 0 pixels under max_pixels {max_pixels}")
    return h_bar, w_bar


def model_size(width: int, height: int, bounds: PixelBounds) -> tuple[int, int]:
    """(width, height) after ``smart_resize``: multiples of 32 within the pixel bounds."""
    try:
        h, w = smart_resize(
            height, width, factor=RESIZE_FACTOR,
            min_pixels=bounds.min_pixels, max_pixels=bounds.max_pixels,
        )
    except ValueError as e:  # aspect ratio beyond 200:1
        raise ImageError(f"image {width}x{height} cannot be resized for the model: {e}") from None
    return w, h


def resize_for_model(image: Image.Image, bounds: PixelBounds) -> Image.Image:
    """Resize to the ``smart_resize`` target (bicubic, as qwen-vl-utils does)."""
    size = model_size(image.width, image.height, bounds)
    if size == image.size:
        return image
    return image.resize(size, Image.Resampling.BICUBIC)

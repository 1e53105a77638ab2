"""Decoding and the model-side smart resize (factor 32)."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from p2r.core.images import (
    EVAL_BOUNDS,
    TRAIN_BOUNDS,
    ImageError,
    PixelBounds,
    decode_image,
    displayed_size,
    encode_image,
    load_image,
    model_size,
    open_image,
    resize_for_model,
)

RED, BLUE = (255, 0, 0), (0, 0, 255)


def rotated_jpeg() -> bytes:
    """A phone photo: stored 400x200 (left half red, right half blue) with EXIF orientation 6,
    so a viewer shows it 200x400 - rotated 90 degrees clockwise, red on top."""
    image = Image.new("RGB", (400, 200), BLUE)
    image.paste(RED, (0, 0, 200, 200))
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    image.save(buf, format="JPEG", exif=exif, quality=95)
    return buf.getvalue()


def test_smart_resize_hand_computed() -> None:
    # 2048x2048 = 4.19 Mpx > 2,097,152: beta = sqrt(2), floor(2048 / 1.4142 / 32) * 32 = 1440.
    assert model_size(2048, 2048, TRAIN_BOUNDS) == (1440, 1440)
    # Within the budget: rounded to multiples of 32.
    assert model_size(1000, 500, TRAIN_BOUNDS) == (992, 512)
    # Below min_pixels (4 * 32 * 32): scaled up, ceil to 32 -> 64 x 64.
    assert model_size(10, 10, TRAIN_BOUNDS) == (64, 64)
    # Evaluation bounds: min 16 * 32 * 32 = 16384 px.
    assert model_size(50, 50, EVAL_BOUNDS) == (128, 128)


def test_tiny_side_rounds_to_one_factor_before_the_bounds_as_qwen_vl_utils() -> None:
    """Reference (qwen-vl-utils ``smart_resize``): a side is rounded to ``max(factor,
    round(side / factor) * factor)`` before the pixel bounds apply, so (h, w) = (6, 722) gives
    (32, 736) at the training and the evaluation bounds; transformers' function gives (32, 704)
    and (32, 1408)."""
    from p2r.core.images import smart_resize

    assert smart_resize(6, 722, 32, TRAIN_BOUNDS.min_pixels, TRAIN_BOUNDS.max_pixels) == (32, 736)
    assert smart_resize(6, 722, 32, EVAL_BOUNDS.min_pixels, EVAL_BOUNDS.max_pixels) == (32, 736)
    assert model_size(722, 6, TRAIN_BOUNDS) == model_size(722, 6, EVAL_BOUNDS) == (736, 32)
    # Python's round (half to even), as the reference: 80 / 32 = 2.5 -> 2, 112 / 32 = 3.5 -> 4.
    assert smart_resize(80, 112, 32, 1024, 1 << 20) == (64, 128)


def test_resize_for_model_respects_budget() -> None:
    out = resize_for_model(Image.new("RGB", (2560, 1920)), TRAIN_BOUNDS)
    assert out.width % 32 == 0 and out.height % 32 == 0
    assert out.width * out.height <= TRAIN_BOUNDS.max_pixels
    same = Image.new("RGB", (640, 480))
    assert resize_for_model(same, TRAIN_BOUNDS) is same


def test_extreme_aspect_ratio_is_a_clear_error() -> None:
    with pytest.raises(ImageError, match="cannot be resized"):
        model_size(10000, 10, TRAIN_BOUNDS)


def test_bounds_validated() -> None:
    with pytest.raises(ValueError, match="min_pixels <= max_pixels"):
        PixelBounds(100, 10)


def test_decode_round_trip_and_formats() -> None:
    image = Image.new("RGB", (31, 17), (1, 2, 3))
    for fmt in ("PNG", "JPEG", "WEBP"):
        buf = io.BytesIO()
        image.save(buf, format=fmt)
        assert decode_image(buf.getvalue()).size == (31, 17)
    rgba = Image.new("RGBA", (4, 4))
    assert decode_image(encode_image(rgba)).mode == "RGB"


def test_decode_errors_name_the_field() -> None:
    with pytest.raises(ImageError, match=r"^image: image is empty \(0 bytes\)"):
        decode_image(b"")
    with pytest.raises(ImageError, match=r"^photo: cannot decode image"):
        decode_image(b"definitely not an image", field="photo")
    truncated = encode_image(Image.new("RGB", (64, 64)), "JPEG")[:40]
    with pytest.raises(ImageError, match="cannot decode"):
        decode_image(truncated)
    with pytest.raises(ImageError, match="over the limit of 100"):
        decode_image(encode_image(Image.new("RGB", (20, 20))), max_pixels=100)


def _near(pixel: tuple[int, ...], colour: tuple[int, int, int]) -> bool:
    return all(abs(a - b) <= 8 for a, b in zip(pixel, colour, strict=True))  # JPEG


def test_exif_orientation_is_applied_at_decode() -> None:
    """Issue 25 item 12: the pixels every model sees are upright, and the size reported is the
    displayed one, read from the header without decoding."""
    data = rotated_jpeg()
    header = open_image(data)
    assert header.size == (400, 200) and displayed_size(header) == (200, 400)
    for upright in (load_image(open_image(data)), decode_image(data)):
        assert upright.size == (200, 400)
        assert _near(upright.getpixel((100, 50)), RED) and _near(upright.getpixel((100, 350)), BLUE)
    plain = encode_image(Image.new("RGB", (40, 20), RED))  # no EXIF: as stored
    assert displayed_size(open_image(plain)) == (40, 20) and decode_image(plain).size == (40, 20)

"""Highlighting, padded crops and evidence building (p2r-method.md §Visual evidence)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from p2r.core.bbox import Region
from p2r.core.evidence import HIGHLIGHT_COLOURS, build_evidence, crop, crop_box, highlight, line_width

RGB = {
    "red": (255, 0, 0), "green": (0, 128, 0), "blue": (0, 0, 255), "yellow": (255, 255, 0),
    "orange": (255, 165, 0), "purple": (128, 0, 128), "cyan": (0, 255, 255), "magenta": (255, 0, 255),
}


@pytest.mark.parametrize(("width", "expected"), [(100, 3), (1000, 3), (1334, 4), (2048, 6), (4000, 12)])
def test_line_width(width: int, expected: int) -> None:
    assert line_width(width) == expected


def test_highlight_cycles_colours_and_draws_no_labels() -> None:
    image = Image.new("RGB", (2000, 1000), "white")
    regions = [Region(10 + 100 * i, 100, 60 + 100 * i, 200, "label") for i in range(9)]
    annotated = highlight(image, regions)
    assert image.getpixel((10, 100)) == (255, 255, 255), "the input image must not be modified"
    assert tuple(RGB) == HIGHLIGHT_COLOURS
    for i in range(9):
        left = int((10 + 100 * i) / 1000 * 2000)
        expected = RGB[HIGHLIGHT_COLOURS[i % 8]]
        assert annotated.getpixel((left, 150)) == expected  # on the left edge
        assert annotated.getpixel((left + line_width(2000) - 1, 150)) == expected  # full line width
        assert annotated.getpixel((left + line_width(2000) + 2, 150)) == (255, 255, 255)  # hollow
    assert annotated.getpixel((1000, 500)) == (255, 255, 255)


def test_crop_box_hand_computed() -> None:
    # 10% padding per side when 10% of the side is under 600 px.
    assert crop_box(Region(400, 400, 600, 600), 2000, 1000) == (600, 300, 1400, 700)
    # 600 px cap: on a 12000-px-wide image the horizontal pad is 600/12000 = 0.05.
    assert crop_box(Region(500, 500, 510, 510), 12000, 3000) == (5400, 1200, 6720, 1830)
    # Clamped at the image border.
    assert crop_box(Region(0, 0, 50, 50), 2000, 1000) == (0, 0, 300, 150)
    assert crop_box(Region(950, 980, 1000, 1000), 2000, 1000) == (1700, 880, 2000, 1000)


def test_crop_of_box_outside_the_image_is_none() -> None:
    image = Image.new("RGB", (2000, 1000))
    assert crop(image, Region(1200, 100, 1500, 200)) is None
    assert crop(image, Region(-900, -900, -200, -200)) is None
    # Partly outside: clamped, still a crop.
    part = crop(image, Region(900, -100, 1100, 100))
    assert part is not None and part.size == (2000 - 1600, 200)


def test_build_evidence_at_most_three_crops_all_boxes_drawn() -> None:
    image = Image.new("RGB", (3000, 2000), "white")
    regions = [Region(50 + 180 * i, 100, 120 + 180 * i, 160, f"r{i}") for i in range(5)]
    ev = build_evidence(image, regions)
    assert ev.with_evidence and ev.num_crops == 3 and len(ev.images) == 4
    assert ev.images[1].size == crop(image, regions[0]).size  # type: ignore[union-attr]
    for i in range(5):  # every valid bbox is drawn, not only the cropped ones
        x = int((50 + 180 * i) / 1000 * 3000)
        assert ev.images[0].getpixel((x, 250)) == RGB[HIGHLIGHT_COLOURS[i]]


@pytest.mark.parametrize(
    "regions", [[], [Region(1100, 0, 1200, 100, "out"), Region(0, 1500, 100, 1600, "out")]]
)
def test_no_evidence_fallback_is_the_original(regions: list[Region]) -> None:
    image = Image.new("RGB", (640, 480), "navy")
    ev = build_evidence(image, regions)
    assert not ev.with_evidence and ev.num_crops == 0
    assert len(ev.images) == 1 and ev.images[0].tobytes() == image.tobytes()


def test_crops_come_from_the_full_resolution_image() -> None:
    image = Image.new("RGB", (4000, 3000), "white")
    image.paste((255, 0, 0), (2000, 1500, 2010, 1510))  # a 10-px dot
    ev = build_evidence(image, [Region(499, 499, 504, 504, "dot")])
    c = ev.images[1]
    assert c.size == (int(0.604 * 4000) - int(0.399 * 4000), int(0.604 * 3000) - int(0.399 * 3000))
    reds = sum(1 for px in c.getdata() if px == (255, 0, 0))
    assert reds == 100


sides = st.integers(min_value=1, max_value=20000)
coord = st.floats(min_value=-2000, max_value=3000, allow_nan=False)


@given(sides, sides, coord, coord, coord, coord)
def test_crop_never_leaves_the_image(w: int, h: int, a: float, b: float, c: float, d: float) -> None:
    if not (a < c and b < d):
        return
    left, top, right, bottom = crop_box(Region(a, b, c, d), w, h)
    assert 0 <= left <= w and 0 <= right <= w and 0 <= top <= h and 0 <= bottom <= h


@given(
    st.integers(min_value=100, max_value=20000),
    st.integers(min_value=100, max_value=20000),
    st.floats(min_value=300, max_value=600),
    st.floats(min_value=1, max_value=100),
)
def test_padding_follows_the_rule(w: int, h: int, start: float, size: float) -> None:
    # A box well inside the image: padding is min(10 %, 600 px) on every side (+-1 px for int()).
    region = Region(start, start, start + size, start + size)
    left, top, right, bottom = crop_box(region, w, h)
    pad_x, pad_y = min(0.1 * w, 600), min(0.1 * h, 600)
    assert abs((start / 1000 * w - left) - pad_x) <= 1
    assert abs((right - (start + size) / 1000 * w) - pad_x) <= 1
    assert abs((start / 1000 * h - top) - pad_y) <= 1
    assert abs((bottom - (start + size) / 1000 * h) - pad_y) <= 1
    # The crop always contains the box itself.
    assert left <= start / 1000 * w and right >= int((start + size) / 1000 * w)


def test_highlight_copes_with_pixel_coordinates_beyond_2_63() -> None:
    """Pillow raises SystemError / ValueError at 2**63 pixels and beyond; any finite box is valid,
    so the outline is clamped just outside the image, where it leaves no pixel: the picture is the
    one Pillow draws for the same box at a drawable size."""
    from PIL import ImageDraw

    image = Image.new("RGB", (200, 100), "white")
    huge = highlight(image, [Region(100, 100, 1e300, 1.7e308, "a"), Region(-1e308, -1e308, 500, 500, "b")])
    moderate = image.copy()
    draw = ImageDraw.Draw(moderate)
    draw.rectangle((20, 10, 20_000, 50_000), outline="red", width=line_width(200))
    draw.rectangle((-50_000, -50_000, 100, 50), outline="green", width=line_width(200))
    assert huge.tobytes() == moderate.tobytes()
    evidence = build_evidence(image, [Region(0, 0, 1e300, 1e300, "a")])
    assert evidence.with_evidence and evidence.images[1].size == (200, 100)

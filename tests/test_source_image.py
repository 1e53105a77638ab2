"""SourceImage: the strip-wise resize of annotated copies is bit-identical to the plain resize."""

from __future__ import annotations

import random

import numpy as np
import pytest
from PIL import Image

from p2r.core import source_image
from p2r.core.bbox import Region
from p2r.core.evidence import build_evidence, highlight, line_width, outline_boxes
from p2r.core.flow import reasoner_request
from p2r.core.images import PixelBounds, model_size, resize_for_model
from p2r.core.prompts import AnswerForm
from p2r.core.source_image import SourceImage


def noise(width: int, height: int, seed: int) -> Image.Image:
    """Random pixels: every rounding difference between two resize paths shows."""
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def random_regions(rng: random.Random, n: int) -> list[Region]:
    regions = []
    for _ in range(n):
        x1, y1 = rng.randint(0, 990), rng.randint(0, 990)
        if rng.random() < 0.3:  # thinner than the outline: Pillow draws a little outside the box
            x2, y2 = x1 + rng.randint(1, 3), y1 + rng.randint(1, 3)
        else:
            x2, y2 = rng.randint(x1 + 1, 1000), rng.randint(y1 + 1, 1000)
        regions.append(Region(x1, y1, x2, y2, "thing"))
    return regions


def annotated_via_source(source: SourceImage, regions: list[Region]) -> Image.Image:
    annotated = highlight(source.image, regions)
    return source.resized_annotated(annotated, outline_boxes(regions, *annotated.size), line_width(annotated.width))


# (width, height, max_pixels): both pass orders, one-axis resizes, upscaling, and no resize at all.
GEOMETRIES = [
    (1536, 864, 65536),  # wide: Pillow starts with the horizontal pass
    (600, 1900, 65536),  # tall: vertical first
    (1280, 1280, 262144),
    (997, 1361, 100000),  # sizes with no common factor with the target
    (640, 70, 1 << 20),  # within budget: only the height is rounded to a multiple of 32
    (70, 640, 1 << 20),  # only the width
    (256, 256, 1 << 20),  # already a multiple of 32: no resize
    (90, 70, 1 << 20),  # upscaled to the minimum pixels
]


@pytest.fixture(autouse=True)
def fresh_verified_orders(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test starts with no geometry verified (the record is process-wide)."""
    monkeypatch.setattr(source_image, "_verified", {})


@pytest.mark.parametrize(("width", "height", "max_pixels"), GEOMETRIES)
def test_strips_equal_plain_resize(width: int, height: int, max_pixels: int) -> None:
    rng = random.Random(width * 7 + height)
    bounds = PixelBounds(4 * 32 * 32, max_pixels)
    # The first image verifies the pass order (plain path, then the check on its second
    # annotated request); the second image of the same geometry uses the record from the start.
    for seed in (1, 2):
        source = SourceImage(noise(width, height, seed=width + height + seed), bounds)
        assert source.resized().size == model_size(width, height, bounds)
        assert np.array_equal(np.asarray(source.resized()), np.asarray(resize_for_model(source.image, bounds)))
        for trial in range(4):
            regions = random_regions(rng, rng.randint(1, 4))
            expected = resize_for_model(highlight(source.image, regions), bounds)
            got = annotated_via_source(source, regions)
            assert got.size == expected.size
            assert np.array_equal(np.asarray(got), np.asarray(expected)), f"image {seed}, trial {trial}: {regions}"


def test_pass_order_is_checked_and_used() -> None:
    bounds = PixelBounds(4 * 32 * 32, 65536)
    for size, order, single in [((1536, 864), "h", False), ((600, 1900), "v", False),
                                ((640, 70), "v", True), ((70, 640), "h", True)]:
        geometry_bounds = bounds if not single else PixelBounds(4096, 1 << 20)
        source = SourceImage(noise(*size, seed=1), geometry_bounds)
        regions = [Region(100, 100, 200, 200, "a")]
        annotated_via_source(source, regions)
        assert (source._order is None) != single, "only a two-pass check waits for a second request"
        annotated_via_source(source, regions)
        assert source._order == order
        assert (source._first is source.image) == single
        again = SourceImage(noise(*size, seed=2), geometry_bounds)
        annotated_via_source(again, regions)
        assert again._order == order, "a verified geometry needs no second request"


def test_rejects_an_image_of_another_size() -> None:
    source = SourceImage(noise(400, 300, seed=2), PixelBounds(1024, 65536))
    with pytest.raises(ValueError, match="same-size"):
        source.resized_annotated(noise(300, 400, seed=2), [], 3)


def test_reasoner_request_with_source_is_identical() -> None:
    bounds = PixelBounds(4 * 32 * 32, 65536)
    image = noise(1200, 900, seed=3)
    source = SourceImage(image, bounds)
    for regions in ([], [Region(100, 100, 400, 300, "a"), Region(500, 500, 900, 950, "b")],
                    [Region(10, 20, 30, 40, "c")], [Region(100, 100, 400, 300, "a")]):
        evidence = build_evidence(image, regions)
        plain = reasoner_request(evidence, "What?", AnswerForm.MCA, bounds)
        shared = reasoner_request(evidence, "What?", AnswerForm.MCA, bounds, source=source)
        assert plain.messages == shared.messages
        assert [np.asarray(a).tobytes() for a in plain.images] == [np.asarray(b).tobytes() for b in shared.images]
    with pytest.raises(ValueError, match="not the image of this evidence"):
        reasoner_request(build_evidence(noise(500, 500, seed=4), []), "What?", AnswerForm.MCA, bounds, source=source)

"""Visual evidence: highlight the perceiver's regions on the image and cut padded crops.

The rules (p2r-method.md §Visual evidence) decide what the reasoner sees, so they live here
once: drawing, padding, the crop budget and the no-evidence fallback. Model-side resizing is in
``images.py`` because it applies to every image a model receives, evidence or not.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from PIL import Image, ImageDraw

from p2r.core.bbox import COORD_SCALE, MAX_IMAGE_EVIDENCE, Region

HIGHLIGHT_COLOURS = ("red", "green", "blue", "yellow", "orange", "purple", "cyan", "magenta")
CROP_PADDING_FRACTION = 0.1
CROP_PADDING_PIXELS = 600


def line_width(image_width: int) -> int:
    """Outline width: max(3, int(0.003 x width))."""
    return max(3, int(0.003 * image_width))


def _to_pixels(region: Region, width: int, height: int) -> tuple[int, int, int, int]:
    """The region in pixels, each coordinate clamped to a band just outside the image.

    Any finite coordinate is a valid box, but Pillow cannot draw at 2**63 pixels and beyond
    (SystemError / ValueError) and ``int()`` of an overflowing product fails. An outline drawn
    ``line_width + 1`` pixels or more outside the image leaves no pixel on it, so clamping there
    draws exactly what the unclamped rectangle would.
    """
    margin = line_width(width) + 1

    def px(value: float, size: int) -> int:
        return int(min(size + margin, max(-margin, value / COORD_SCALE * size)))

    return (px(region.x1, width), px(region.y1, height), px(region.x2, width), px(region.y2, height))


def outline_boxes(regions: list[Region], width: int, height: int) -> list[tuple[int, int, int, int]]:
    """The pixel rectangles ``highlight`` draws (x1, y1, x2, y2, inclusive), one per region."""
    return [_to_pixels(region, width, height) for region in regions]


def highlight(image: Image.Image, regions: list[Region]) -> Image.Image:
    """A copy of ``image`` with every region outlined, colours cycling, no labels drawn.

    Pixels change only within ``line_width`` of ``outline_boxes`` (Pillow may draw a little
    outside a box thinner than the line), which ``SourceImage`` relies on to resize the copy.
    """
    annotated = image.convert("RGB")  # convert() always returns a new image
    draw = ImageDraw.Draw(annotated)
    width = line_width(annotated.width)
    for i, box in enumerate(outline_boxes(regions, *annotated.size)):
        draw.rectangle(box, outline=HIGHLIGHT_COLOURS[i % len(HIGHLIGHT_COLOURS)], width=width)
    return annotated


def crop_box(region: Region, width: int, height: int) -> tuple[int, int, int, int]:
    """The padded pixel box for ``region``: normalise to 0-1, pad, clamp to [0, 1], int().

    Padding per side is min(0.1, 600 / width) horizontally and min(0.1, 600 / height)
    vertically, in normalised units: 10% of the image, but never more than 600 pixels.
    """
    pad_x = min(CROP_PADDING_FRACTION, CROP_PADDING_PIXELS / width)
    pad_y = min(CROP_PADDING_FRACTION, CROP_PADDING_PIXELS / height)
    x1 = _clamp(region.x1 / COORD_SCALE - pad_x)
    y1 = _clamp(region.y1 / COORD_SCALE - pad_y)
    x2 = _clamp(region.x2 / COORD_SCALE + pad_x)
    y2 = _clamp(region.y2 / COORD_SCALE + pad_y)
    return int(x1 * width), int(y1 * height), int(x2 * width), int(y2 * height)


def _clamp(value: float) -> float:
    """Clamp a normalised coordinate to [0, 1] (both ends: a box may lie wholly outside)."""
    return min(1.0, max(0.0, value))


def crop(image: Image.Image, region: Region) -> Image.Image | None:
    """The padded crop of ``region``, or None when it is empty (box outside or degenerate)."""
    left, top, right, bottom = crop_box(region, image.width, image.height)
    if right <= left or bottom <= top:
        return None
    return _rgb(image).crop((left, top, right, bottom))


def _rgb(image: Image.Image) -> Image.Image:
    """The image in RGB, converting (a full copy) only when it is not RGB already."""
    return image if image.mode == "RGB" else image.convert("RGB")


@dataclass
class Evidence:
    """What the reasoner receives: its images, and whether they carry evidence.

    ``images`` is the annotated original then the crops when ``with_evidence``; otherwise the
    original alone (no valid bbox, or no crop succeeded).
    """

    images: list[Image.Image]
    with_evidence: bool
    regions: list[Region] = field(default_factory=list)

    @property
    def num_crops(self) -> int:
        return len(self.images) - 1 if self.with_evidence else 0


def build_evidence(
    image: Image.Image, regions: list[Region], max_crops: int = MAX_IMAGE_EVIDENCE
) -> Evidence:
    """Annotated image plus up to ``max_crops`` crops, or the no-evidence fallback."""
    image = _rgb(image)
    crops = [c for c in (crop(image, r) for r in regions[:max_crops]) if c is not None]
    if not crops:
        return Evidence(images=[image], with_evidence=False, regions=regions)
    return Evidence(images=[highlight(image, regions), *crops], with_evidence=True, regions=regions)

"""Bounding boxes as the perceiver reports them: parsing, validation and IoU.

Coordinates are normalised to 0-1000 on each axis (p2r-method.md §Visual evidence). A bbox is
valid iff it has four numeric coordinates with x1 < x2 and y1 < y2. Parsing must never raise:
its input is whatever a sampled policy wrote.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any

COORD_SCALE = 1000.0
MAX_IMAGE_EVIDENCE = 3
"""At most this many bboxes become crops; every valid bbox is still drawn."""


@dataclass(frozen=True)
class Region:
    """One valid bbox in 0-1000 coordinates, with the label the perceiver gave (or None)."""

    x1: float
    y1: float
    x2: float
    y2: float
    label: str | None = None

    @property
    def coords(self) -> tuple[float, float, float, float]:
        return (self.x1, self.y1, self.x2, self.y2)

    def to_json(self) -> dict[str, Any]:
        """The perceiver's own output format, so regions round-trip through ``parse_regions``."""
        out: dict[str, Any] = {"bbox_2d": [self.x1, self.y1, self.x2, self.y2]}
        if self.label is not None:
            out["label"] = self.label
        return out


def _number(value: Any) -> float | None:
    # bool is an int subclass in Python; a "true" coordinate is not numeric in JSON terms.
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        value = float(value)
    except OverflowError:  # a JSON integer literal beyond 1e308: no float holds it
        return None
    return value if math.isfinite(value) else None


def region_problem(x1: float, y1: float, x2: float, y2: float) -> str | None:
    """Why four coordinates are not a valid bbox, or None: the one rule for model output
    (``parse_regions``) and for regions a client sends (the reasoner service)."""
    if not all(math.isfinite(c) for c in (x1, y1, x2, y2)):
        return "coordinates must be finite numbers"
    if not (x1 < x2 and y1 < y2):
        return "a region needs x1 < x2 and y1 < y2"
    return None


def region_from_item(item: Any) -> Region | None:
    """A Region from one parsed JSON item, or None if the item is not a valid bbox dict."""
    if not isinstance(item, dict):
        return None
    coords = item.get("bbox_2d")
    if not isinstance(coords, list) or len(coords) != 4:
        return None
    numbers = [_number(c) for c in coords]
    if any(n is None for n in numbers):
        return None
    x1, y1, x2, y2 = numbers  # type: ignore[misc]
    if region_problem(x1, y1, x2, y2) is not None:
        return None
    label = item.get("label")
    return Region(x1, y1, x2, y2, label if isinstance(label, str) else None)


# A flat {...} object (no nested braces) that names bbox_2d with a list value; the list itself
# cannot contain braces, so this finds every candidate in text with prose or fences around it.
_OBJECT_RE = re.compile(r"\{[^{}]*\"bbox_2d\"\s*:\s*\[[^\[\]{}]*\][^{}]*\}")


def parse_regions(text: str) -> list[Region]:
    """Every valid bbox in a perceiver reply, in order. Never raises.

    First the whole text, ``str.strip()``-ed as the reference does (Unicode whitespace such as
    U+3000 or U+00A0 too, which JSON itself does not skip), is tried as JSON (a dict is one bbox,
    a list keeps its valid dict items); if that fails, every ``{...}`` object holding
    ``"bbox_2d": [...]`` is extracted and parsed on its own, keeping the valid ones.
    """
    if not isinstance(text, str):
        return []
    try:
        parsed = json.loads(text.strip())
    except (ValueError, RecursionError):
        parsed = None
    else:
        if isinstance(parsed, dict):
            region = region_from_item(parsed)
            return [region] if region else []
        if isinstance(parsed, list):
            return [r for r in map(region_from_item, parsed) if r is not None]
    regions = []
    for match in _OBJECT_RE.finditer(text):
        try:
            item = json.loads(match.group(0))
        except (ValueError, RecursionError):
            continue
        region = region_from_item(item)
        if region is not None:
            regions.append(region)
    return regions


BBOX_LIST_SCHEMA: dict[str, Any] = {
    "type": "array",
    "items": {
        "type": "object",
        "properties": {
            "bbox_2d": {
                "type": "array",
                "items": {"type": "integer", "minimum": 0, "maximum": int(COORD_SCALE)},
                "minItems": 4,
                "maxItems": 4,
            },
            # Printable text only: grammar backends otherwise admit raw control characters,
            # which strict JSON parsers (and so the reward's parser) reject.
            "label": {"type": "string", "pattern": "^[ -~]{1,64}$"},
        },
        "required": ["bbox_2d", "label"],
        "additionalProperties": False,
    },
    "maxItems": 8,
}
"""JSON schema of a perceiver reply, for structured (constrained) decoding behind a flag."""


def iou(a: Region, b: Region) -> float:
    """Intersection over union of two boxes in the same coordinate system."""
    ix = max(0.0, min(a.x2, b.x2) - max(a.x1, b.x1))
    iy = max(0.0, min(a.y2, b.y2) - max(a.y1, b.y1))
    inter = ix * iy
    union = (a.x2 - a.x1) * (a.y2 - a.y1) + (b.x2 - b.x1) * (b.y2 - b.y1) - inter
    return inter / union if union > 0 else 0.0


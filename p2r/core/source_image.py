"""One decoded image shared by every request on it, resized for the model once.

Why: a perceiver step sends each image with many different bbox sets (8 rollouts per prompt),
and the reasoner resizes a freshly annotated full-resolution copy for every one of them. That
resize (bicubic, e.g. 3072x1728 -> 320x192) is the CPU cost of the reward phase, and on a GPU
node the engine waits on it.

Pillow resizes in two separable passes (one axis, then the other; it picks the order). Each
pass treats rows (or columns) independently, so an annotated copy differs from the original
after the first pass only in the strips that hold an outline. ``SourceImage`` keeps the
original's first pass and, for an annotated copy, recomputes just those strips with single-axis
Pillow resizes before running the second pass: the result is bit-identical to
``resize_for_model(annotated)``. Which order Pillow uses is not part of its API, so it is
checked on the image itself (our two passes must reproduce Pillow's one-shot resize of the
original exactly); where neither order does, annotated copies get the plain resize.

Pillow picks the order from the sizes alone, so a verified order is remembered per geometry
(mode, source size, target size): later images of that geometry build the first pass at once and
get their own resize from it. For a geometry not yet verified, the check costs an extra pass,
which is only worth it when an image is annotated more than once, so it runs on the image's
second annotated request (the first gets the plain resize).
"""

from __future__ import annotations

import threading

import numpy as np
from PIL import Image

from p2r.core.images import PixelBounds, model_size

_BICUBIC = Image.Resampling.BICUBIC
Box = tuple[int, int, int, int]
Geometry = tuple[str, int, int, int, int]

_verified: dict[Geometry, str | None] = {}
"""Pass order that reproduced Pillow's one-shot resize, per geometry (None: neither did)."""
_verified_lock = threading.Lock()


class SourceImage:
    """A decoded RGB image, its model-side resize, and the cached first resize pass."""

    def __init__(self, image: Image.Image, bounds: PixelBounds) -> None:
        self.image = image
        self.size = model_size(image.width, image.height, bounds)
        self._lock = threading.Lock()
        self._resized: Image.Image | None = None
        self._annotated_requests = 0
        self._first: Image.Image | None = None  # the first pass of the original
        self._order: str | None = None  # "v" (columns strips) or "h" (row strips); None: plain
        self._checked = False

    @property
    def geometry(self) -> Geometry:
        return (self.image.mode, *self.image.size, *self.size)

    @property
    def _one_pass(self) -> bool:
        """Only one axis changes size: Pillow runs one pass, and the strips need no check."""
        return self.size[0] == self.image.width or self.size[1] == self.image.height

    def resized(self) -> Image.Image:
        """``resize_for_model(image)``, computed once."""
        with self._lock:
            if self._resized is None:
                if _is_verified(self.geometry):  # the same pixels through the two passes, keeping the first
                    self._prepare_passes()
                else:
                    self._resized = self._resize(self.image)
            assert self._resized is not None
            return self._resized

    def resized_annotated(self, annotated: Image.Image, boxes: list[Box], margin: int) -> Image.Image:
        """``resize_for_model(annotated)``, where ``annotated`` is ``image`` with drawing only
        inside ``boxes`` (x1, y1, x2, y2 inclusive) widened by ``margin`` pixels."""
        if annotated.size != self.image.size or annotated.mode != self.image.mode:
            raise ValueError("the annotated image must be a same-size, same-mode copy of the source")
        if self.size == self.image.size:
            return annotated
        with self._lock:
            self._annotated_requests += 1
            if not self._checked and (self._one_pass or _is_verified(self.geometry) or self._annotated_requests >= 2):
                self._prepare_passes()
            order, first = self._order, self._first
        if order is None or first is None:
            return self._resize(annotated)
        return self._strips(annotated, boxes, margin, order, first)

    # ----------------------------------------------------------------------------- internals

    def _resize(self, image: Image.Image) -> Image.Image:
        return image if image.size == self.size else image.resize(self.size, _BICUBIC)

    def _first_pass(self, order: str) -> Image.Image:
        (w, h), (m, k) = self.image.size, self.size
        return self.image.resize((w, k) if order == "v" else (m, h), _BICUBIC)

    def _prepare_passes(self) -> None:
        """Keep the first pass, in the order verified for this geometry or found now by checking
        both against Pillow's one-shot resize (lock held)."""
        self._checked = True
        (w, h), (m, k) = self.image.size, self.size
        if self._one_pass:  # strips of the output itself
            self._order, self._first = ("h" if k == h else "v"), self.image
        elif _is_verified(self.geometry):
            with _verified_lock:
                self._order = _verified[self.geometry]
            if self._order is not None:
                self._first = self._first_pass(self._order)
                if self._resized is None:
                    self._resized = self._first.resize(self.size, _BICUBIC)
        else:
            if self._resized is None:
                self._resized = self._resize(self.image)
            target = np.asarray(self._resized)
            for candidate in ("v", "h") if h / k > w / m else ("h", "v"):
                first = self._first_pass(candidate)
                if np.array_equal(np.asarray(first.resize(self.size, _BICUBIC)), target):
                    self._order, self._first = candidate, first
                    break
            with _verified_lock:
                _verified[self.geometry] = self._order
        if self._resized is None:
            self._resized = self._resize(self.image)

    def _strips(self, annotated: Image.Image, boxes: list[Box], margin: int, order: str,
                first: Image.Image) -> Image.Image:
        (w, h), (m, k) = self.image.size, self.size
        single_pass = first is self.image
        out = (self._resized if single_pass else first).copy()  # type: ignore[union-attr]
        limit = w if order == "v" else h
        for lo, hi in _merge([(b[0], b[2]) if order == "v" else (b[1], b[3]) for b in boxes], margin, limit):
            if order == "v":  # columns lo..hi-1 through the vertical pass
                out.paste(annotated.crop((lo, 0, hi, h)).resize((hi - lo, k), _BICUBIC), (lo, 0))
            else:  # rows lo..hi-1 through the horizontal pass
                out.paste(annotated.crop((0, lo, w, hi)).resize((m, hi - lo), _BICUBIC), (0, lo))
        return out if single_pass else out.resize(self.size, _BICUBIC)


def _is_verified(geometry: Geometry) -> bool:
    with _verified_lock:
        return geometry in _verified


def _merge(spans: list[tuple[int, int]], margin: int, limit: int) -> list[tuple[int, int]]:
    """Inclusive pixel spans widened by ``margin``, clamped to [0, limit), merged, half-open."""
    widened = sorted((max(0, a - margin), min(limit, b + margin + 1)) for a, b in spans)
    merged: list[tuple[int, int]] = []
    for lo, hi in widened:
        if hi <= lo:
            continue
        if merged and lo <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], hi))
        else:
            merged.append((lo, hi))
    return merged

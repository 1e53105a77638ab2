"""Decoded images by content hash, within a budget of decoded bytes (``cachetools.LRUCache``).

A gateway's perceive and reason calls, and a trainer's rollouts of one prompt, send the same
image: it is decoded and resized once. The budget counts what the pixels cost in memory - not
the encoded size nor the number of images - so a flood of small PNGs that decode to huge
bitmaps cannot grow the server past it: each entry counts its decoded pixels plus the model-side
resize and the intermediate pass ``SourceImage`` keeps, and an image bigger than the whole
budget is simply not cached. Entries are never modified in place (evidence drawing copies), so
sharing one between requests is safe.

The same budget bounds every decoded image alive, not only the cached ones: a request keeps its
full-resolution pixels until it ends (the crops are cut from them), so 32 admitted requests with
10,000 x 10,000 images would hold 13 GB whatever the cache's size. ``reserve`` counts a decode
before it happens (with the original's pixels while a non-RGB image converts) and is released
when the last holder of the ``SourceImage`` drops it; a reasoner request's annotated copy and
crops are reserved while they are built. When the budget is full it first evicts cached
entries, then refuses with ``Overloaded`` (RESOURCE_EXHAUSTED, retried by clients) - except that
a request alone may always run, so an image bigger than the budget is still served, one at a
time. Bytes are counted as Pillow stores them (RGB at 4 bytes a pixel).
"""

from __future__ import annotations

import gc
import hashlib
import threading
import weakref

from cachetools import LRUCache

from p2r.core.bbox import MAX_IMAGE_EVIDENCE, Region
from p2r.core.evidence import crop_box
from p2r.core.images import PixelBounds, model_size
from p2r.core.source_image import SourceImage
from p2r.services.errors import Overloaded


def pixel_bytes(mode: str) -> int:
    """Bytes per pixel in Pillow's own storage: 1 for "1", "L" and "P", 2 for "I;16*", 4 for
    every other mode - RGB included, which Pillow stores as RGBX (a 10,000 x 10,000 RGB image
    holds 400 MB, not 300)."""
    if mode in ("1", "L", "P"):
        return 1
    return 2 if mode.startswith("I;16") else 4


def decoded_bytes(source: SourceImage) -> int:
    """Upper bound of the memory ``source`` holds once used: the decoded pixels, the model-side
    resize, and the first pass of a two-pass resize (one axis resized), at the image's mode."""
    return decode_cost(source.image.size, source.size, source.image.mode)


def decode_cost(size: tuple[int, int], target: tuple[int, int], mode: str = "RGB") -> int:
    """``decoded_bytes`` from the header alone (size and model-side target), before decoding."""
    width, height = size
    target_w, target_h = target
    return pixel_bytes(mode) * (width * height + target_w * target_h + max(target_w * height, width * target_h))


def conversion_cost(mode: str, size: tuple[int, int]) -> int:
    """Bytes the decoded original holds beside its RGB conversion while ``convert`` runs (0 when
    it decodes to RGB: ``load_image`` does not copy it)."""
    return 0 if mode == "RGB" else pixel_bytes(mode) * size[0] * size[1]


def evidence_cost(size: tuple[int, int], regions: list[Region], bounds: PixelBounds) -> int:
    """Bytes a reasoner request's evidence holds while it is built: the annotated full-resolution
    copy and the padded crops (as many as ``build_evidence`` cuts), each with its resize."""
    width, height = size
    cost = decode_cost(size, model_size(width, height, bounds))
    for region in regions[:MAX_IMAGE_EVIDENCE]:
        left, top, right, bottom = crop_box(region, width, height)
        if right > left and bottom > top:
            crop = (right - left, bottom - top)
            cost += decode_cost(crop, model_size(*crop, bounds))
    return cost


class DecodedImages:
    """Thread-safe LRU of ``SourceImage`` by the blake2b digest of the encoded bytes."""

    def __init__(self, budget_bytes: int) -> None:
        self.budget_bytes = budget_bytes
        self._cache: LRUCache[bytes, SourceImage] = LRUCache(maxsize=budget_bytes, getsizeof=decoded_bytes)
        # Re-entrant: evicting the last reference to an entry runs its release under this lock.
        self._lock = threading.RLock()
        self._live = 0
        """Decoded bytes reserved by images alive now: cached, held by a request, or decoding."""

    @staticmethod
    def key(data: bytes) -> bytes:
        return hashlib.blake2b(data, digest_size=16).digest()

    def get(self, key: bytes) -> SourceImage | None:
        with self._lock:
            return self._cache.get(key)

    def put(self, key: bytes, source: SourceImage) -> None:
        """Cache ``source``, evicting the least recently used; one over the budget is not kept."""
        if decoded_bytes(source) > self.budget_bytes:
            return
        with self._lock:
            self._cache[key] = source

    def reserve(self, cost: int, own: int = 0) -> None:
        """Count ``cost`` bytes about to be allocated (a decode, an annotated copy and its crops)
        against the budget (0: no budget), evicting cached entries if needed; ``Overloaded`` if
        it still does not fit beside the images alive. ``own``: bytes already reserved by this
        same request (its source image), so that a request alone is never refused."""
        if self.budget_bytes <= 0:
            return
        with self._lock:
            while self._live + cost > self.budget_bytes and len(self._cache):
                self._cache.popitem()  # the least recent; released now unless a request holds it
            if self._live > own and self._live + cost > self.budget_bytes:
                # A finished request's image can still sit in a reference cycle (an exception's
                # traceback, a done future) until the cyclic GC runs: collect before refusing.
                gc.collect()
            if self._live > own and self._live + cost > self.budget_bytes:
                raise Overloaded(
                    f"decoded images: {self._live} bytes alive + {cost} for this image is over "
                    f"decoded_image_cache_bytes={self.budget_bytes}; retry later"
                )
            self._live += cost

    def hold(self, source: SourceImage, cost: int) -> None:
        """Release ``cost`` when ``source`` is freed (the cache and every request dropped it)."""
        if self.budget_bytes > 0:
            weakref.finalize(source, self.release, cost)

    def release(self, cost: int) -> None:
        with self._lock:
            self._live -= cost

    @property
    def live_bytes(self) -> int:
        """Decoded bytes of the images alive now (bounded by the budget, or one image)."""
        with self._lock:
            return self._live

    @property
    def size_bytes(self) -> int:
        """Decoded bytes held now (never above the budget)."""
        with self._lock:
            return int(self._cache.currsize)

    def __len__(self) -> int:
        with self._lock:
            return len(self._cache)

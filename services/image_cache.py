"""Decoded images by content hash, within a budget of decoded bytes (``cachetools.LRUCache``).

A gateway's perceive and reason calls, and a trainer's rollouts of one prompt, send the same
image: it is decoded and resized once. The budget counts what the pixels cost in memory - not
the encoded size nor the number of images - so a flood of small PNGs that decode to huge
bitmaps cannot grow the server past it: each entry counts its decoded pixels plus the model-side
resize and the intermediate pass ``SourceImage`` keeps, and an image bigger than the whole
budget is simply not cached. Entries are never modified in place (evidence drawing copies), so
sharing one between requests is safe.
"""

from __future__ import annotations

import hashlib
import threading

from cachetools import LRUCache

from p2r.core.source_image import SourceImage


def decoded_bytes(source: SourceImage) -> int:
    """Upper bound of the memory ``source`` holds once used: the decoded pixels, the model-side
    resize, and the first pass of a two-pass resize (one axis resized), at the image's bands."""
    bands = len(source.image.getbands())
    width, height = source.image.size
    target_w, target_h = source.size
    return bands * (width * height + target_w * target_h + max(target_w * height, width * target_h))


class DecodedImages:
    """Thread-safe LRU of ``SourceImage`` by the blake2b digest of the encoded bytes."""

    def __init__(self, budget_bytes: int) -> None:
        self.budget_bytes = budget_bytes
        self._cache: LRUCache[bytes, SourceImage] = LRUCache(maxsize=budget_bytes, getsizeof=decoded_bytes)
        self._lock = threading.Lock()

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

    @property
    def size_bytes(self) -> int:
        """Decoded bytes held now (never above the budget)."""
        with self._lock:
            return int(self._cache.currsize)

    def __len__(self) -> int:
        with self._lock:
            return len(self._cache)

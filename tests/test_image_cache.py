"""The decoded-image cache (``services/image_cache.py``): sized by decoded bytes, LRU, an image
over the budget not kept; and the role handlers decoding each distinct image once through it."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from p2r.core.images import PixelBounds
from p2r.core.source_image import SourceImage
from p2r.services.errors import Overloaded
from p2r.services.image_cache import DecodedImages, decoded_bytes

BOUNDS = PixelBounds(4 * 32 * 32, 2_097_152)


def _source(width: int, height: int, colour: str = "white") -> SourceImage:
    return SourceImage(Image.new("RGB", (width, height), colour), BOUNDS)


def test_decoded_bytes_by_hand() -> None:
    # 100x50 resizes to 96x64 (multiples of 32); the first pass keeps one side: 100x64 or 96x50.
    source = _source(100, 50)
    assert source.size == (96, 64)
    assert decoded_bytes(source) == 3 * (100 * 50 + 96 * 64 + 100 * 64)
    gray = SourceImage(Image.new("L", (64, 64)), BOUNDS)  # one band; no resize: 64x64 three times
    assert decoded_bytes(gray) == 64 * 64 * 3


def test_budget_is_in_decoded_bytes_with_lru_eviction() -> None:
    one = decoded_bytes(_source(640, 480))
    cache = DecodedImages(budget_bytes=2 * one + one // 2)  # room for two, not three
    a, b, c = _source(640, 480, "red"), _source(640, 480, "green"), _source(640, 480, "blue")
    cache.put(b"a", a)
    cache.put(b"b", b)
    assert cache.get(b"a") is a  # a is now the most recently used
    cache.put(b"c", c)
    assert cache.get(b"b") is None and cache.get(b"a") is a and cache.get(b"c") is c
    assert len(cache) == 2 and cache.size_bytes == 2 * one <= cache.budget_bytes


def test_an_image_over_the_budget_is_not_cached_and_evicts_nothing() -> None:
    small = _source(64, 64)
    cache = DecodedImages(budget_bytes=decoded_bytes(small) * 4)
    cache.put(b"small", small)
    huge = _source(2048, 1024)
    assert decoded_bytes(huge) > cache.budget_bytes
    cache.put(b"huge", huge)
    assert cache.get(b"huge") is None and cache.get(b"small") is small
    off = DecodedImages(budget_bytes=0)
    off.put(b"small", small)
    assert len(off) == 0 and off.size_bytes == 0


def test_handlers_decode_each_distinct_image_once_within_the_budget() -> None:
    from p2r.services.config import ServeConfig
    from p2r.services.handlers import Handlers

    def png(size: tuple[int, int]) -> bytes:
        buf = io.BytesIO()
        Image.new("RGB", size, "white").save(buf, format="PNG")
        return buf.getvalue()

    small, big = png((64, 64)), png((1024, 1024))
    budget = decoded_bytes(_source(64, 64)) * 8
    config = ServeConfig(roles=["gateway"], perceiver_endpoint="127.0.0.1:1", reasoner_endpoint="127.0.0.1:1",
                         decoded_image_cache_bytes=budget)
    handlers = Handlers(config, None)
    first = handlers.source(handlers.image(small, "image"), small, "image")
    assert handlers.source(handlers.image(small, "image"), small, "image") is first  # decoded once
    del first  # that request ended; the image stays cached (and counted) until evicted
    # 1024x1024 decodes to ~9 MiB with its resize: over this budget, so it is never cached; alone
    # it is still served, and a second one while it is alive is refused (the live bound below).
    big_first = handlers.source(handlers.image(big, "image"), big, "image")
    assert len(handlers._decoded) == 0  # the small one was evicted to make room; the big one is not kept
    with pytest.raises(Overloaded, match="decoded_image_cache_bytes"):
        handlers.source(handlers.image(big, "image"), big, "image")
    del big_first  # the request ended: its pixels are released, and the next decode runs alone
    assert handlers._decoded.live_bytes <= budget
    assert handlers.source(handlers.image(big, "image"), big, "image").image.size == (1024, 1024)


def test_every_decoded_image_alive_counts_against_the_budget() -> None:
    """Issue 14 item 6: a request keeps its full-resolution pixels until it ends, so the budget
    bounds the images alive (cached or held), not only the cache: cached entries are evicted to make
    room, then a decode that still does not fit is Overloaded (RESOURCE_EXHAUSTED) at once."""
    one = decoded_bytes(_source(640, 480))
    cache = DecodedImages(budget_bytes=2 * one + one // 2)
    held = []
    for i in range(2):
        cache.reserve(one)
        source = _source(640, 480, "white" if i else "black")
        cache.hold(source, one)
        cache.put(bytes([i]), source)
        held.append(source)
    del source
    assert cache.live_bytes == 2 * one
    with pytest.raises(Overloaded):  # both held by requests: evicting them frees nothing
        cache.reserve(one)
    assert len(cache) == 0 and cache.live_bytes == 2 * one
    held.pop()  # one request ends; nothing else holds its image
    assert cache.live_bytes == one
    cache.reserve(one)  # fits now
    assert cache.live_bytes == 2 * one
    cache.release(one)
    held.clear()
    assert cache.live_bytes == 0
    # One decode alone may exceed the budget (a huge image is served, one at a time).
    cache.reserve(10 * one)
    with pytest.raises(Overloaded):
        cache.reserve(1)
    cache.release(10 * one)
    DecodedImages(budget_bytes=0).reserve(10**12)  # 0: no budget at all

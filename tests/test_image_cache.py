"""The decoded-image cache (``services/image_cache.py``): sized by decoded bytes, LRU, an image
over the budget not kept; and the role handlers decoding each distinct image once through it."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from p2r.core.images import PixelBounds
from p2r.core.source_image import SourceImage
from p2r.services.errors import Overloaded
from p2r.services.image_cache import (
    DecodedImages,
    conversion_cost,
    decode_cost,
    decoded_bytes,
    evidence_cost,
    pixel_bytes,
)

BOUNDS = PixelBounds(4 * 32 * 32, 2_097_152)


def _source(width: int, height: int, colour: str = "white") -> SourceImage:
    return SourceImage(Image.new("RGB", (width, height), colour), BOUNDS)


def test_decoded_bytes_by_hand() -> None:
    # 100x50 resizes to 96x64 (multiples of 32); the first pass keeps one side: 100x64 or 96x50.
    source = _source(100, 50)
    assert source.size == (96, 64)
    assert decoded_bytes(source) == 4 * (100 * 50 + 96 * 64 + 100 * 64)  # RGB: 4 bytes a pixel (RGBX)
    gray = SourceImage(Image.new("L", (64, 64)), BOUNDS)  # one byte a pixel; no resize: 64x64 three times
    assert decoded_bytes(gray) == 64 * 64 * 3


def _measured(script: str) -> list[str]:
    """Run ``script`` in a fresh interpreter and return its printed lines. RSS is measured there:
    in a long-lived process malloc reuses free heap chunks of earlier work, and an allocation
    would not show."""
    prelude = ("import io, os\nfrom PIL import Image\nfrom p2r.services.allocator import return_large_frees_to_os\n"
               "assert return_large_frees_to_os()\n"
               "rss = lambda: int(open('/proc/self/statm').read().split()[1]) * os.sysconf('SC_PAGE_SIZE')\n")
    out = subprocess.run([sys.executable, "-c", prelude + script], capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).resolve().parent.parent)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.split()


def test_pixel_bytes_is_what_pillow_allocates() -> None:
    """The budget counts bytes as Pillow stores them: measured, RGB takes 4 bytes a pixel."""
    modes = ["L", "P", "I;16", "RGB", "RGBA", "CMYK"]
    side = 3000
    grown = _measured(f"""
for mode in {modes!r}:
    before = rss()
    image = Image.new(mode, ({side}, {side}), 7)  # filled: every page is touched
    print(rss() - before)
    del image
""")
    for mode, measured in zip(modes, map(int, grown), strict=True):
        expected = pixel_bytes(mode) * side * side
        assert 0.9 * expected <= measured <= 1.1 * expected, (mode, measured, expected)


def test_a_decode_holds_no_more_than_its_reservation() -> None:
    """The server decodes from a fresh open of the bytes and does not copy an RGB decode: the
    request's header image never holds pixels, so the memory a decode adds stays within what it
    reserved (it was 2.7 times that: the header loaded, plus a copy from ``convert``)."""
    grown, reserved, cost, loaded = _measured("""
from p2r.services.config import ServeConfig
from p2r.services.handlers import Handlers
from p2r.services.image_cache import decoded_bytes
buf = io.BytesIO()
Image.new("RGB", (5000, 4000), (10, 200, 30)).save(buf, format="PNG", compress_level=1)
data = buf.getvalue()
config = ServeConfig(roles=["gateway"], perceiver_endpoint="127.0.0.1:1", reasoner_endpoint="127.0.0.1:1",
                     decoded_image_cache_bytes=1 << 30)
handlers = Handlers(config, None)
header = handlers.image(data, "image")
before = rss()
source = handlers.source(header, data, "image")
source.resized()
print(rss() - before, handlers._decoded.live_bytes, decoded_bytes(source), getattr(header, "_im", None) is not None)
""")
    assert reserved == cost and int(grown) <= int(reserved), (grown, reserved)
    assert int(grown) >= 0.9 * 4 * 5000 * 4000  # the pixels themselves were measured
    assert loaded == "False"  # the header never loaded its own pixels (Pillow sets _im on load)


def test_a_non_rgb_decode_reserves_its_original_until_converted() -> None:
    assert conversion_cost("RGB", (100, 100)) == 0
    assert conversion_cost("P", (100, 100)) == 100 * 100
    assert conversion_cost("RGBA", (100, 100)) == 4 * 100 * 100


def test_evidence_is_reserved_while_built_and_a_request_alone_always_runs() -> None:
    """A reasoner request's annotated copy and crops count against the budget while built; with
    another request's image alive they may be refused, but a request alone is never refused
    by its own source image."""
    from p2r.core.bbox import Region

    source = _source(2000, 1000)
    own = decoded_bytes(source)
    regions = [Region(100, 100, 400, 400, "a"), Region(500, 500, 900, 900, "b")]
    cost = evidence_cost(source.image.size, regions, BOUNDS)
    assert cost > decode_cost(source.image.size, source.size)  # the annotated copy, plus two crops
    cache = DecodedImages(budget_bytes=own + cost // 2)
    cache.reserve(own)
    cache.reserve(cost, own=own)  # alone: over the budget, still allowed
    cache.release(cost)
    cache.reserve(own // 4)  # another request's small image is alive now
    with pytest.raises(Overloaded):
        cache.reserve(cost, own=own)


def test_freed_image_blocks_go_back_to_the_os() -> None:
    """With the allocator setting, a burst of large images on four threads leaves no resident
    heap behind (glibc's dynamic threshold kept up to tens of MiB here, gigabytes in the soak)."""
    script = """
import sys, threading
from PIL import Image
from p2r.services.allocator import return_large_frees_to_os
assert return_large_frees_to_os()
rss = lambda: int(open("/proc/self/statm").read().split()[1]) * 4096
base = rss()
def work(i):
    for k in range(8):
        image = Image.new("RGB", (3000 + 300 * k + i, 3000 + 97 * i), (i, k, 3))
        image.resize((512, 512))
threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
[t.start() for t in threads]; [t.join() for t in threads]
print(rss() - base)
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True)
    assert int(out.stdout) <= 16 * 1024 * 1024, int(out.stdout) >> 20


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

"""What the benchmark tables share: repeats, "median (min–max)", the load-average header, and
the cache policy (fresh image variants), so every table is measured and reported the same way.

Cache policy: no measurement may reuse an image its engine has already seen. vLLM keeps the
KV blocks of earlier prompts (prefix cache, keyed by the image content since images come first
in the prompt) and their processed pixels (multimodal cache), and our servers keep decoded
images by content hash; a path that runs after another path on the same engine would otherwise
get most of its prefill for free - which is how one path once read 4.7x a "limit" measured
cold. Variant ``v`` of a sample is its image with the low three bits of every pixel's R, G, B
flipped by ``v`` (at most 7 levels in each channel): the same size, boxes, question and answer,
so the same work, but new content for every cache. Variant 0 is the original, used for warm-up.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
from collections.abc import Sequence
from typing import Any

MIN_REPEATS = 3
MAX_VARIANTS = 512  # 3 bits in each of 3 channels


def repeats(value: str) -> int:
    """argparse type for ``--repeats``: a median and a range need at least 3 repeats."""
    n = int(value)
    if n < MIN_REPEATS:
        raise argparse.ArgumentTypeError(f"at least {MIN_REPEATS} repeats, got {n}")
    return n


def summary(values: Sequence[float], digits: int = 3) -> dict[str, Any]:
    """Median, min, max and every value, rounded for the JSON."""
    return {"median": round(statistics.median(values), digits), "min": round(min(values), digits),
            "max": round(max(values), digits), "values": [round(v, digits) for v in values]}


def spread(s: dict[str, Any] | None, digits: int = 2) -> str:
    """``median (min–max)`` of a ``summary``; ``-`` for none."""
    if s is None:
        return "-"
    return f"{s['median']:.{digits}f} ({s['min']:.{digits}f}–{s['max']:.{digits}f})"


def load_average() -> list[float]:
    """1, 5 and 15 minute load averages: how busy the machine was, to judge the noise."""
    return [round(x, 2) for x in os.getloadavg()]


def header(title: str, repeats: int, load: list[float]) -> str:
    """The table's first lines: what was measured, how often, and the load at its start."""
    return (f"\n{title}\n{repeats} repeats per path, interleaved (every path once, then again); "
            f"median (min–max) over repeats; {os.cpu_count()} CPU cores; load average at start "
            f"{load[0]} / {load[1]} / {load[2]} (1 / 5 / 15 min)\n")


def image_variants(samples: Sequence[Any], count: int) -> list[list[Any]]:
    """``count`` copies of ``samples`` (``p2r.data.dataset.Sample``), copy ``v`` with variant
    ``v`` of each image as inline PNG bytes and index ``v * len(samples) + i`` (so per-sample
    caches keyed by index, like the trainer's image bytes, see a new sample too)."""
    import numpy as np
    from PIL import Image

    from p2r.core.images import encode_image
    from p2r.data.dataset import ImageRef

    if not 1 <= count <= MAX_VARIANTS:
        raise ValueError(f"between 1 and {MAX_VARIANTS} image variants, asked for {count}")
    out: list[list[Any]] = [[] for _ in range(count)]
    for i, sample in enumerate(samples):
        pixels = np.asarray(sample.load_image().convert("RGB"))
        for v in range(count):
            mask = np.array([v & 7, (v >> 3) & 7, v >> 6], dtype=np.uint8)
            ref = ImageRef(data=encode_image(Image.fromarray(pixels ^ mask)))
            out[v].append(dataclasses.replace(sample, index=v * len(samples) + i, images=[ref]))
    return out

"""Reward plugins used by the trainer tests (imported by path, as users' plugins are)."""

from __future__ import annotations

from p2r.data.dataset import Sample


def starts_with_digit(sample: Sample, response: str) -> float:
    """1 when the response begins with a digit: common enough under a random policy to give
    GRPO a signal from the first step, so a rising mean reward shows learning quickly."""
    text = response.lstrip()
    return 1.0 if text[:1].isdigit() else 0.0

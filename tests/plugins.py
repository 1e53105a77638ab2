"""Reward plugins used by the trainer tests (imported by path, as users' plugins are)."""

from __future__ import annotations

from p2r.data.dataset import Sample


def starts_with_digit(sample: Sample, response: str) -> float:
    """1 when the response begins with a digit: common enough under a random policy to give
    GRPO a signal from the first step, so a rising mean reward shows learning quickly."""
    text = response.lstrip()
    return 1.0 if text[:1].isdigit() else 0.0


def fails_on_rank_1_at_step_2(sample: Sample, response: str) -> float:
    """``starts_with_digit``, except that rank 1 raises once it has scored one step's rollouts
    (``P2R_TEST_CALLS_PER_STEP`` calls): a rank failing in the middle of a run, while the other
    ranks go on into the update's collectives."""
    import os

    global _calls
    _calls += 1
    if os.environ.get("RANK") == "1" and _calls > int(os.environ["P2R_TEST_CALLS_PER_STEP"]):
        raise RuntimeError("injected failure on rank 1 at step 2")
    return starts_with_digit(sample, response)


_calls = 0

"""Answer extraction from a reasoner reply (``<think>...</think><answer>...</answer>``)."""

from __future__ import annotations

import re

_ANSWER_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_THINK_RE = re.compile(r"<think>(.*?)</think>", re.DOTALL)


def extract_answer(text: str) -> str:
    """Text inside the first ``<answer>...</answer>``, else the whole text; stripped."""
    match = _ANSWER_RE.search(text)
    return (match.group(1) if match else text).strip()


def extract_closed_answer(text: str) -> str | None:
    """The evaluation's rule for ``thinking`` and ``p2r`` replies: the text inside the first
    closed ``<answer>...</answer>``, stripped; None (no answer, scored wrong) when there is no
    closed tag or the answer is empty. Unlike training, the whole reply is never graded."""
    match = _ANSWER_RE.search(text)
    answer = match.group(1).strip() if match else ""
    return answer or None


def extract_reasoning(text: str) -> str:
    """Text inside the first ``<think>...</think>``, stripped; empty when there is none."""
    match = _THINK_RE.search(text)
    return match.group(1).strip() if match else ""


def strip_think(text: str) -> str:
    """``text`` without any ``<think>...</think>`` block (the verifier's reply is read so)."""
    return _THINK_RE.sub("", text).strip()

"""The P2R flow: perceive -> evidence -> reason, batched, on the real engine and with a scripted
perceiver that returns known boxes (so the with-evidence path is exercised deterministically)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import pytest

from p2r.core import prompts
from p2r.core.flow import P2RConfig, Question, run_p2r
from p2r.core.generation import ChatRequest, Sampling
from p2r.core.images import PixelBounds
from p2r.data.dataset import load_samples

SMALL = PixelBounds(4 * 32 * 32, 256 * 32 * 32)


class ScriptedPerceiver:
    """Answers every perceiver request with the boxes given for that question, and records
    what it was sent."""

    def __init__(self, replies: list[str]) -> None:
        self.replies = replies
        self.seen: list[ChatRequest] = []

    def generate(self, requests: Sequence[ChatRequest], sampling: Sampling) -> list[list[str]]:
        self.seen.extend(requests)
        return [[self.replies[i]] for i in range(len(requests))]


class RecordingGenerator:
    """Wraps a generator and records the requests, to check what the reasoner was given."""

    def __init__(self, inner: object) -> None:
        self.inner = inner
        self.seen: list[ChatRequest] = []

    def generate(self, requests: Sequence[ChatRequest], sampling: Sampling) -> list[list[str]]:
        self.seen.extend(requests)
        return self.inner.generate(requests, sampling)  # type: ignore[attr-defined]


def _questions(synthetic_dir: Path) -> list[Question]:
    return [Question(s.load_image(), s.question, s.form) for s in load_samples(synthetic_dir / "train.parquet")[:3]]


def _boxes_reply(boxes: list[list[float]]) -> str:
    return json.dumps([{"bbox_2d": b, "label": f"object {i}"} for i, b in enumerate(boxes)])


@pytest.mark.engine
def test_p2r_with_evidence_through_vllm(engine, synthetic_dir: Path) -> None:  # type: ignore[no-untyped-def]
    samples = load_samples(synthetic_dir / "train.parquet")[:3]
    questions = _questions(synthetic_dir)
    replies = [_boxes_reply(s.gt_bboxes) for s in samples]
    replies[2] = "I cannot find anything."  # no valid bbox -> no-evidence fallback
    perceiver, reasoner = ScriptedPerceiver(replies), RecordingGenerator(engine)
    config = P2RConfig(bounds=SMALL, reason=Sampling(max_tokens=8))
    results = run_p2r(questions, perceiver, reasoner, config)

    assert len(results) == 3
    # Sample 1 (na) has up to 4 boxes: all drawn, at most 3 cropped.
    for s, r, req in zip(samples, results, reasoner.seen, strict=True):
        assert r.perceiver_output in replies
        text = req.messages[1]["content"][-1]["text"]
        if r.evidence.with_evidence:
            assert len(r.regions) == len(s.gt_bboxes)
            assert r.evidence.num_crops == min(3, len(s.gt_bboxes))
            assert text == prompts.reasoner_text(s.question, s.form, with_evidence=True)
            assert len(req.images) == 1 + r.evidence.num_crops
        else:
            assert text == prompts.reasoner_text(s.question, s.form, with_evidence=False)
            assert len(req.images) == 1
        for image in req.images:  # every image is smart-resized within the bounds
            assert image.width % 32 == 0 and image.height % 32 == 0
            assert image.width * image.height <= SMALL.max_pixels
        assert isinstance(r.reasoner_output, str)
    assert results[2].evidence.with_evidence is False and results[2].regions == []
    # The perceiver saw the perceiver prompt and one resized image per question.
    assert perceiver.seen[0].messages[1]["content"][-1]["text"] == prompts.perceiver_text(samples[0].question)


@pytest.mark.engine
def test_p2r_end_to_end_on_one_engine(engine, synthetic_dir: Path) -> None:  # type: ignore[no-untyped-def]
    """The production shape: the same engine serves both roles."""
    config = P2RConfig(bounds=SMALL, perceive=Sampling(max_tokens=16), reason=Sampling(max_tokens=8))
    results = run_p2r(_questions(synthetic_dir), engine, engine, config)
    assert len(results) == 3
    for r in results:
        # Whatever the random model wrote, the flow is consistent with the parse rules.
        assert r.evidence.with_evidence == bool(r.evidence.num_crops)
        assert r.answer == r.reasoner_output.strip() or "<answer>" in r.reasoner_output


def test_empty_batch_calls_nothing() -> None:
    perceiver = ScriptedPerceiver([])
    assert run_p2r([], perceiver, perceiver) == []
    assert perceiver.seen == []

"""The P2R inference flow: perceive -> visual evidence -> reason (p2r-method.md).

Batched end to end: all perceiver requests go out in one ``generate`` call, evidence is built
per sample from the full-resolution image (crops are cut before any resizing, which is the
point of cropping), and all reasoner requests go out in a second call. The perceiver and the
reasoner may be the same generator (one engine called twice) or two services.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from p2r.core import prompts
from p2r.core.answers import extract_answer
from p2r.core.bbox import MAX_IMAGE_EVIDENCE, Region, parse_regions
from p2r.core.evidence import Evidence, build_evidence, line_width, outline_boxes
from p2r.core.generation import ChatRequest, Generator, Sampling
from p2r.core.images import TRAIN_BOUNDS, PixelBounds, model_size, resize_for_model
from p2r.core.prompts import AnswerForm, Variant
from p2r.core.source_image import SourceImage

FROZEN_ROLE_MAX_TOKENS = 2048
"""Frozen perceiver/reasoner services in training: temperature 0, max 2048 new tokens."""


@dataclass(frozen=True)
class P2RConfig:
    """Settings of one P2R pass; the defaults are the training-time frozen-role settings."""

    bounds: PixelBounds = TRAIN_BOUNDS
    variant: Variant = "train"
    perceive: Sampling = field(default_factory=lambda: Sampling(max_tokens=FROZEN_ROLE_MAX_TOKENS))
    reason: Sampling = field(default_factory=lambda: Sampling(max_tokens=FROZEN_ROLE_MAX_TOKENS))
    max_crops: int = MAX_IMAGE_EVIDENCE


@dataclass(frozen=True)
class Question:
    """One P2R input."""

    image: Image.Image
    question: str
    form: AnswerForm


@dataclass
class P2RResult:
    """Everything a P2R pass produced for one question, kept for logs, rewards and reports."""

    perceiver_output: str
    regions: list[Region]
    evidence: Evidence
    reasoner_output: str

    @property
    def answer(self) -> str:
        return extract_answer(self.reasoner_output)


def _messages(text: str, num_images: int, policy: bool) -> list[dict[str, Any]]:
    """The trained policy's layout (``policy``: newline text items after the images) or the
    frozen services' and the evaluation's (images, then the text)."""
    return (prompts.policy_messages if policy else prompts.chat_messages)(text, num_images)


def perceiver_request(
    image: Image.Image, question: str, bounds: PixelBounds, variant: Variant = "train", *, policy: bool = False
) -> ChatRequest:
    """The perceiver sees the resized original and the perceiver prompt (``policy``: as the
    trained perceiver's own prompt, laid out by ``prompts.policy_messages``)."""
    text = prompts.perceiver_text(question, variant)
    return ChatRequest(_messages(text, 1, policy), [resize_for_model(image, bounds)])


def reasoner_request(
    evidence: Evidence,
    question: str,
    form: AnswerForm,
    bounds: PixelBounds,
    variant: Variant = "train",
    source: SourceImage | None = None,
    *,
    policy: bool = False,
) -> ChatRequest:
    """The reasoner sees the evidence images (each resized with the same bounds) and its prompt.

    ``source`` (the image the evidence was built from, resized with these ``bounds``) lets the
    first image - the original or its annotated copy - reuse work shared by every request on
    that image; the pixels are the same either way. ``policy``: the trained reasoner's (or
    baseline's) own prompt layout, ``prompts.policy_messages``.
    """
    text = prompts.reasoner_text(question, form, with_evidence=evidence.with_evidence, variant=variant)
    if source is None:
        images = [resize_for_model(im, bounds) for im in evidence.images]
    else:
        first = evidence.images[0]
        if first.size != source.image.size or source.size != model_size(*first.size, bounds):
            raise ValueError("source is not the image of this evidence, resized with these bounds")
        images = [source.resized_annotated(first, outline_boxes(evidence.regions, *first.size), line_width(first.width))
                  if evidence.with_evidence else source.resized(),
                  *(resize_for_model(im, bounds) for im in evidence.images[1:])]
    return ChatRequest(_messages(text, len(images), policy), images)


def verifier_request(question: str, ground_truth: str, answer: str) -> ChatRequest:
    """The verifier's chat: its own system prompt, no image, thinking switched off."""
    text = prompts.verifier_text(question, ground_truth, answer)
    return ChatRequest(prompts.chat_messages(text, 0, system=prompts.VERIFIER_SYSTEM_PROMPT),
                       template_kwargs={"enable_thinking": False})


def evidence_for(image: Image.Image, perceiver_output: str, max_crops: int) -> Evidence:
    """Parse a perceiver reply and build the evidence it points at (or the fallback)."""
    return build_evidence(image, parse_regions(perceiver_output), max_crops)


def run_p2r(
    questions: Sequence[Question],
    perceiver: Generator,
    reasoner: Generator,
    config: P2RConfig | None = None,
) -> list[P2RResult]:
    """Answer ``questions`` in P2R mode: one batched perceive call, one batched reason call."""
    config = config or P2RConfig()
    if not questions:
        return []
    perceived = perceiver.generate(
        [perceiver_request(q.image, q.question, config.bounds, config.variant) for q in questions],
        config.perceive,
    )
    evidences = [
        evidence_for(q.image, out[0], config.max_crops) for q, out in zip(questions, perceived, strict=True)
    ]
    reasoned = reasoner.generate(
        [
            reasoner_request(ev, q.question, q.form, config.bounds, config.variant)
            for q, ev in zip(questions, evidences, strict=True)
        ],
        config.reason,
    )
    return [
        P2RResult(p[0], ev.regions, ev, r[0])
        for p, ev, r in zip(perceived, evidences, reasoned, strict=True)
    ]

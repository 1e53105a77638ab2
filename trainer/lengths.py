"""Prompt lengths as the engine counts them, and the over-long prompt filter (veRL's
``filter_overlong_prompts``): a prompt over the role's ``max_prompt_tokens`` is dropped when the
data is loaded, counted and logged, instead of reaching vLLM, which would reject it and end the
run.

The count is the engine's own: its tokenizer over its chat template's rendering, with each
image placeholder expanded to the image's visual tokens, ``(w / factor) * (h / factor)`` at the
size the model sees (factor = patch size x spatial merge, 32 for Qwen3-VL). Only the image
headers are read: a P2R-10k pass costs seconds, not a decode of every image.

The reasoner's prompt depends on the perceiver's regions, unknown at load. There the load-time
check is the no-evidence prompt (the original image alone: if even that is over, the sample can
never fit), and each step checks the evidence prompt it built; one over the limit falls back to
the no-evidence prompt (the reference's fallback when the perceiver fails), counted.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from p2r.core import prompts
from p2r.core.generation import ChatRequest
from p2r.core.images import PixelBounds, model_size
from p2r.data.dataset import DataError, Sample

log = logging.getLogger("p2r.train")


@dataclass(frozen=True)
class PromptCounter:
    """Counts prompt tokens the way the engine will."""

    tokenizer: Any
    factor: int  # pixels per visual token side (patch size x spatial merge)
    image_token: str = "<|image_pad|>"

    def text_tokens(self, messages: list[dict[str, Any]]) -> int:
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return len(self.tokenizer.encode(text, add_special_tokens=False))

    def visual_tokens(self, width: int, height: int) -> int:
        return (width // self.factor) * (height // self.factor)

    def request_tokens(self, request: ChatRequest) -> int:
        """Tokens of a built request (its images already at the model's size)."""
        text = self.text_tokens(request.messages)
        return text + sum(self.visual_tokens(*im.size) - 1 for im in request.images)

    def sample_tokens(self, sample: Sample, role: str, bounds: PixelBounds) -> int:
        """Tokens of a sample's perceiver prompt, or of its reasoner (and baseline) prompt
        without evidence, in the trained policy's layout (``prompts.policy_messages``)."""
        w, h = model_size(*sample.images[0].size(), bounds)
        if role == "perceiver":
            text = prompts.perceiver_text(sample.question)
        else:
            text = prompts.reasoner_text(sample.question, sample.form, with_evidence=False)
        return self.text_tokens(prompts.policy_messages(text, 1)) + self.visual_tokens(w, h) - 1


def counter_for(tokenizer: Any, processor: Any) -> PromptCounter:
    image = processor.image_processor
    return PromptCounter(tokenizer, int(image.patch_size) * int(image.merge_size))


@dataclass(frozen=True)
class LengthFilter:
    kept: list[Sample]
    dropped: int
    unreadable: int
    longest_kept: int


def filter_overlong(samples: Sequence[Sample], counter: PromptCounter, role: str, bounds: PixelBounds,
                    max_prompt_tokens: int) -> LengthFilter:
    """Drop samples whose prompt is over ``max_prompt_tokens`` (or whose image cannot be read
    or resized: they would fail at their step instead); the counts are logged."""
    kept: list[Sample] = []
    dropped = unreadable = longest = 0
    for s in samples:
        try:
            n = counter.sample_tokens(s, role, bounds)
        except (DataError, OSError, ValueError) as e:
            unreadable += 1
            log.warning("row %d dropped: %s", s.row, e)
            continue
        if n > max_prompt_tokens:
            dropped += 1
            continue
        kept.append(s)
        longest = max(longest, n)
    if dropped or unreadable:
        log.warning("over-long prompt filter: %d of %d samples dropped (over %d prompt tokens), %d unreadable",
                    dropped, len(samples), max_prompt_tokens, unreadable)
    else:
        log.info("over-long prompt filter: all %d samples fit %d prompt tokens (longest %d)", len(samples),
                 max_prompt_tokens, longest)
    return LengthFilter(kept, dropped, unreadable, longest)

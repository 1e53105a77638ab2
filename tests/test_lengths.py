"""Prompt lengths as the engine counts them (trainer/lengths.py): exact against vLLM's own
prompt at the reference scale (an image at 2,097,152 pixels and 3 crops), the over-long filter,
and the per-role defaults."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from p2r.core.bbox import Region
from p2r.core.evidence import build_evidence
from p2r.core.flow import perceiver_request, reasoner_request
from p2r.core.images import MIN_PIXELS, TRAIN_BOUNDS, PixelBounds
from p2r.data.dataset import load_samples
from p2r.trainer.config import ROLE_LENGTHS, TrainConfig
from p2r.trainer.lengths import PromptCounter, filter_overlong


def counter(model: Path) -> PromptCounter:
    from transformers import AutoTokenizer

    return PromptCounter(AutoTokenizer.from_pretrained(model), 32)


@pytest.mark.engine
def test_stage2_prompt_at_reference_scale_is_counted_exactly_and_fits(engine: Any, synthetic_dir: Path) -> None:
    """Annotated image at 2,097,152 pixels + 3 crops: vLLM's prompt has exactly the counted
    tokens, under the reasoner's max_prompt_tokens, and generates within max_model_len 12,288
    (the shared engine runs at that length)."""
    from vllm import SamplingParams

    sample = next(s for s in load_samples(synthetic_dir / "train.parquet") if len(s.gt_bboxes) >= 1)
    image = sample.load_image()
    boxes = (sample.gt_bboxes * 3)[:3]
    regions = [Region(*b, label=f"r{i}") for i, b in enumerate(boxes)]
    request = reasoner_request(build_evidence(image, regions), sample.question, sample.form, TRAIN_BOUNDS)
    perceive = perceiver_request(image, sample.question, TRAIN_BOUNDS, policy=True)  # the load filter's layout
    assert len(request.images) == 4 and request.images[0].width * request.images[0].height > 1_900_000
    limits = ROLE_LENGTHS["reasoner"]
    assert engine.limits.max_model_len == limits["max_model_len"]
    c = PromptCounter(engine.llm.get_tokenizer(), 32)
    outs = engine.llm.generate([engine.renderer.render(request), engine.renderer.render(perceive)],
                               SamplingParams(max_tokens=2, temperature=0.0), use_tqdm=False)
    reason_ids, perceive_ids = (list(o.prompt_token_ids) for o in outs)
    assert len(reason_ids) == c.request_tokens(request)
    assert len(perceive_ids) == c.request_tokens(perceive) == c.sample_tokens(sample, "perceiver", TRAIN_BOUNDS)
    assert 2048 + 3 < len(reason_ids) <= limits["max_prompt_tokens"]
    assert len(reason_ids) + limits["max_response_tokens"] <= limits["max_model_len"]


def test_overlong_filter_drops_and_counts(tiny_model_dir: Path, synthetic_dir: Path) -> None:
    samples = load_samples(synthetic_dir / "train.parquet")
    c = counter(tiny_model_dir)
    bounds = PixelBounds(MIN_PIXELS, 65536)
    counts = sorted(c.sample_tokens(s, "perceiver", bounds) for s in samples)
    assert counts[0] < counts[-1]  # image shapes differ, so do their prompts
    limit = counts[len(counts) // 2]
    out = filter_overlong(samples, c, "perceiver", bounds, limit)
    assert out.dropped == sum(n > limit for n in counts) > 0
    assert len(out.kept) + out.dropped == len(samples) and out.longest_kept <= limit
    assert filter_overlong(samples, c, "perceiver", bounds, counts[-1]).dropped == 0


def test_role_length_defaults_and_their_check() -> None:
    common = {"model": "m", "data": "d.parquet", "output": "o", "reward_plugin": "x:y"}
    reasoner = TrainConfig(role="reasoner", **common)
    assert (reasoner.max_prompt_tokens, reasoner.max_response_tokens, reasoner.max_model_len) == (8704, 2048, 12288)
    perceiver = TrainConfig(role="perceiver", **common)
    assert (perceiver.max_prompt_tokens, perceiver.max_response_tokens, perceiver.max_model_len) == (2560, 1024, 4096)
    small = TrainConfig(role="perceiver", max_model_len=2048, max_response_tokens=16, **common)
    assert small.max_prompt_tokens == 2032  # what the context leaves after the response
    with pytest.raises(ValueError, match="exceed max_model_len"):
        TrainConfig(role="perceiver", max_model_len=2048, max_prompt_tokens=2048, **common)

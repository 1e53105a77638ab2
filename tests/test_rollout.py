"""Colocated rollout engine: after an optimiser step the weights are pushed in place, and the
engine's log-probs then match the trained model's (and did not before the push)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from p2r.core import prompts
from p2r.core.generation import ChatRequest, Sampling
from p2r.services.engine import EngineLimits
from p2r.trainer.rollout import RolloutEngine, RolloutTopology, named_weights

pytestmark = pytest.mark.engine


def hf_logprobs(model, processor, request: ChatRequest, prompt_ids: list[int], response: list[int],  # type: ignore[no-untyped-def]
                bias: dict[int, float] | None = None) -> torch.Tensor:
    """Log-probs of ``response`` under the transformers model (teacher forcing); ``bias`` is a
    logit bias applied first, as the engine applies its ban on vision tokens before it reports
    log-probs (``processed_logprobs``)."""
    text = processor.apply_chat_template(request.messages, tokenize=False, add_generation_prompt=True)
    inputs = processor(text=[text], images=request.images, return_tensors="pt")
    assert inputs["input_ids"][0].tolist() == prompt_ids, "engine and processor disagree on the prompt"
    ids = torch.cat([inputs["input_ids"], torch.tensor([response])], dim=1)
    extra = {}
    if "mm_token_type_ids" in inputs:
        extra["mm_token_type_ids"] = torch.cat(
            [inputs["mm_token_type_ids"], torch.zeros(1, len(response), dtype=inputs["mm_token_type_ids"].dtype)], 1)
    logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=inputs["pixel_values"],
                   image_grid_thw=inputs["image_grid_thw"], **extra).logits
    start = len(prompt_ids)
    logits = logits[0, start - 1:-1].float()
    for token, value in (bias or {}).items():
        logits[:, token] += value
    lp = torch.log_softmax(logits, dim=-1)
    return lp.gather(-1, torch.tensor(response).unsqueeze(-1)).squeeze(-1)


def test_weight_push_makes_engine_match_the_trained_model(tiny_model_dir: Path) -> None:
    from transformers import AutoProcessor, Qwen3VLForConditionalGeneration

    processor = AutoProcessor.from_pretrained(tiny_model_dir)
    model = Qwen3VLForConditionalGeneration.from_pretrained(tiny_model_dir, dtype=torch.float32)
    from p2r.trainer.actor import init_distributed

    engine = RolloutEngine(str(tiny_model_dir), RolloutTopology(*init_distributed(), tp=1),
                           EngineLimits(max_model_len=4096, max_num_seqs=4, dtype="float32"))
    request = ChatRequest(prompts.chat_messages("Where is the red square?", 1), [Image.new("RGB", (128, 96), "red")])
    greedy = Sampling(max_tokens=12)

    [[before]] = engine.sample([request], greedy)
    with torch.no_grad():
        ref = hf_logprobs(model, processor, request, before.prompt_token_ids, before.token_ids, engine.banned)
    assert torch.allclose(ref, torch.tensor(before.logprobs), atol=2e-3), (ref, before.logprobs)

    # One optimiser step that makes the sampled response more likely.
    optimiser = torch.optim.AdamW(model.parameters(), lr=1e-2)
    loss = -hf_logprobs(model, processor, request, before.prompt_token_ids, before.token_ids).mean()
    loss.backward()
    optimiser.step()
    model.eval()

    with torch.no_grad():
        trained = hf_logprobs(model, processor, request, before.prompt_token_ids, before.token_ids, engine.banned)
    [[stale]] = engine.sample([request], greedy)
    assert stale.token_ids == before.token_ids and stale.logprobs == before.logprobs  # engine not yet updated
    assert (trained - torch.tensor(before.logprobs)).abs().max() > 0.05

    engine.push_weights(named_weights(model))
    [[after]] = engine.sample([request], greedy)
    with torch.no_grad():
        expected = hf_logprobs(model, processor, request, after.prompt_token_ids, after.token_ids, engine.banned)
    assert engine.weight_version == 1
    assert torch.allclose(expected, torch.tensor(after.logprobs), atol=2e-3), (expected, after.logprobs)
    del engine

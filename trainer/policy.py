"""Log-probabilities of sampled responses under the ``transformers`` model (policy or reference).

The engine samples; the loss needs log-probs with gradients, so they come from the trained
model itself. Prompt token ids are the engine's own (image placeholders already expanded), so
both sides see exactly the same sequence; the processor supplies only the pixel tensors.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from p2r.core.generation import ChatRequest
from p2r.trainer.grpo import entropy_from_logits


@dataclass
class SequenceBatch:
    """Responses of one step, right-padded: ``[B, T]`` response tokens and mask."""

    tokens: torch.Tensor
    mask: torch.Tensor


def pad_responses(responses: Sequence[Sequence[int]], pad_id: int = 0) -> SequenceBatch:
    length = max(1, max((len(r) for r in responses), default=1))
    tokens = torch.full((len(responses), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(responses), length), dtype=torch.float32)
    for i, r in enumerate(responses):
        tokens[i, : len(r)] = torch.tensor(list(r), dtype=torch.long)
        mask[i, : len(r)] = 1.0
    return SequenceBatch(tokens, mask)


def vision_inputs(processor: Any, request: ChatRequest) -> dict[str, torch.Tensor]:
    """Pixel tensors of a request's images, as the processor computes them for the model."""
    if not request.images:
        return {}
    out = processor.image_processor(images=list(request.images), return_tensors="pt")
    return {"pixel_values": out["pixel_values"], "image_grid_thw": out["image_grid_thw"]}


def response_logprobs(
    model: torch.nn.Module,
    processor: Any,
    request: ChatRequest,
    prompt_ids: Sequence[int],
    responses: SequenceBatch,
    with_entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs ``[n, T]`` of ``n`` responses to one prompt (one forward pass for the group),
    and optionally the per-token entropy."""
    n, t = responses.tokens.shape
    prompt = torch.tensor(list(prompt_ids), dtype=torch.long).unsqueeze(0).expand(n, -1)
    ids = torch.cat([prompt, responses.tokens], dim=1)
    attention = torch.cat([torch.ones_like(prompt, dtype=torch.float32), responses.mask], dim=1).long()
    kwargs: dict[str, Any] = {}
    vision = vision_inputs(processor, request)
    if vision:
        kwargs["pixel_values"] = vision["pixel_values"].repeat(n, 1)
        kwargs["image_grid_thw"] = vision["image_grid_thw"].repeat(n, 1)
        image_token = model.config.image_token_id
        kwargs["mm_token_type_ids"] = (ids == image_token).long()
    logits = model(input_ids=ids, attention_mask=attention, **kwargs).logits
    start = len(prompt_ids)
    response_logits = logits[:, start - 1 : start - 1 + t].float()
    logp = torch.log_softmax(response_logits, dim=-1).gather(-1, responses.tokens.unsqueeze(-1)).squeeze(-1)
    entropy = entropy_from_logits(response_logits) if with_entropy else None
    return logp, entropy

"""Log-probabilities of sampled responses under the ``transformers`` model (policy or reference).

The engine samples; the loss needs log-probs with gradients, so they come from the trained
model itself. Prompt token ids are the engine's own (image placeholders already expanded), so
both sides see exactly the same sequence; the processor supplies only the pixel tensors.

Memory: logits are computed only at response positions (``logits_to_keep``; a 2,048-visual-token
prompt would otherwise cost prompt x vocabulary logits per sequence), and the fp32 log-softmax
runs in token chunks under activation checkpointing, so only one chunk's fp32 copy of the
vocabulary-wide logits exists at a time, in the forward and in the backward.

Temperature: the engine samples from softmax(logits / T), so the policy's log-probs (and the
reference's, and the entropy) are computed from ``logits / temperature`` too, as veRL's and
TRL's actors do; at T = 1 nothing changes, at any other T the ratio and the KL would otherwise
be of a different distribution from the one that was sampled.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.checkpoint import checkpoint

from p2r.core.generation import ChatRequest
from p2r.trainer.grpo import entropy_from_logits

LOGPROB_CHUNK_TOKENS = 512  # response positions per fp32 log-softmax chunk


@dataclass
class SequenceBatch:
    """Responses of one forward pass, right-padded: ``[B, T]`` response tokens and mask."""

    tokens: torch.Tensor
    mask: torch.Tensor


def pad_responses(responses: Sequence[Sequence[int]], pad_id: int = 0, length: int | None = None) -> SequenceBatch:
    length = length or max(1, max((len(r) for r in responses), default=1))
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


def _scaled(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """fp32 ``logits / temperature`` (the division skipped at T = 1: bit-identical to before)."""
    logits = logits.float()
    return logits if temperature == 1.0 else logits / temperature


def _chunk_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    return torch.log_softmax(_scaled(logits, temperature), dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def _chunk_logprobs_entropy(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    return _chunk_logprobs(logits, tokens, temperature), entropy_from_logits(_scaled(logits, temperature))


def logprobs_from_logits(
    logits: torch.Tensor, tokens: torch.Tensor, with_entropy: bool = False, entropy_grad: bool = False,
    chunk: int = LOGPROB_CHUNK_TOKENS, temperature: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``[B, T]`` log p(token) (and entropy) from ``[B, T, V]`` logits divided by
    ``temperature``, in chunks of ``chunk`` positions. Each chunk is recomputed in the backward
    instead of keeping its fp32 copy; an entropy without ``entropy_grad`` is computed under
    ``no_grad`` (reported, not trained)."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    track = torch.is_grad_enabled() and logits.requires_grad
    logps, ents = [], []
    for start in range(0, logits.shape[1], chunk):
        lg, tok = logits[:, start : start + chunk], tokens[:, start : start + chunk]
        if with_entropy and entropy_grad:
            lp, ent = checkpoint(_chunk_logprobs_entropy, lg, tok, temperature, use_reentrant=False) if track \
                else _chunk_logprobs_entropy(lg, tok, temperature)
            ents.append(ent)
        else:
            lp = checkpoint(_chunk_logprobs, lg, tok, temperature, use_reentrant=False) if track \
                else _chunk_logprobs(lg, tok, temperature)
            if with_entropy:
                with torch.no_grad():
                    ents.append(entropy_from_logits(_scaled(lg, temperature)))
        logps.append(lp)
    return torch.cat(logps, dim=1), (torch.cat(ents, dim=1) if with_entropy else None)


def response_logprobs(
    model: torch.nn.Module,
    processor: Any,
    request: ChatRequest,
    prompt_ids: Sequence[int],
    responses: SequenceBatch,
    with_entropy: bool = False,
    entropy_grad: bool = False,
    vision: dict[str, torch.Tensor] | None = None,
    temperature: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs ``[n, T]`` of ``n`` responses to one prompt (one forward pass for them) under
    the sampling distribution ``softmax(logits / temperature)``, and optionally the per-token
    entropy. ``vision`` is the request's ``vision_inputs`` when the caller already has them (one
    preprocessing per prompt, shared by its micro-batches)."""
    n, t = responses.tokens.shape
    prompt = torch.tensor(list(prompt_ids), dtype=torch.long).unsqueeze(0).expand(n, -1)
    ids = torch.cat([prompt, responses.tokens], dim=1)
    attention = torch.cat([torch.ones_like(prompt, dtype=torch.float32), responses.mask], dim=1).long()
    kwargs: dict[str, Any] = {}
    vision = vision_inputs(processor, request) if vision is None else vision
    if vision:
        kwargs["pixel_values"] = vision["pixel_values"].repeat(n, 1)
        kwargs["image_grid_thw"] = vision["image_grid_thw"].repeat(n, 1)
        kwargs["mm_token_type_ids"] = (ids == model.config.image_token_id).long()
    device = _device(model)
    if device.type != "cpu":
        ids, attention = ids.to(device), attention.to(device)
        kwargs = {k: v.to(device) for k, v in kwargs.items()}
    # Positions start-1 .. start+t-1 predict the t response tokens; the last position predicts
    # nothing we need, so t + 1 are kept and the final one dropped.
    logits = model(input_ids=ids, attention_mask=attention, use_cache=False, logits_to_keep=t + 1, **kwargs).logits
    tokens = responses.tokens.to(logits.device)
    return logprobs_from_logits(logits[:, :t], tokens, with_entropy, entropy_grad, temperature=temperature)


def _device(model: torch.nn.Module) -> torch.device:
    param = next(model.parameters())
    local = param.to_local() if hasattr(param, "to_local") else param
    return local.device

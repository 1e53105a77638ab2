"""GRPO maths in plain, commented torch (the PRA-GRPO update of both stages).

Shapes: ``rewards`` and ``group_ids`` are per response ``[B]``; log-probabilities, masks and the
per-token terms are ``[B, T]`` with ``mask`` 1 on response tokens and 0 on padding. The
formulas follow veRL's ``core_algos`` (GRPO outcome advantage, dual-clip-free PPO loss with
separate low/high clip ratios, ``low_var_kl``), which produced the reference checkpoints.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

Aggregation = Literal["token-mean", "seq-mean-token-mean"]
KL_CLAMP = 10.0


def group_advantages(
    rewards: torch.Tensor, group_ids: torch.Tensor, eps: float = 1e-6, norm_by_std: bool = True
) -> torch.Tensor:
    """Per-response advantage: (reward - group mean) / (group std + eps).

    A group is the n responses sampled for one prompt. The std is the unbiased one (as
    ``torch.std``); a group of one has nothing to compare with, so its advantage is 0 (mean is
    its own reward) and its std is taken as 1. ``norm_by_std=False`` skips the division (Dr.GRPO).
    """
    advantages = torch.empty_like(rewards, dtype=torch.float32)
    for gid in torch.unique(group_ids):
        members = group_ids == gid
        group = rewards[members].float()
        if group.numel() == 1:
            mean, std = group.mean(), torch.tensor(1.0)
        else:
            mean, std = group.mean(), group.std()
        centred = group - mean
        advantages[members] = centred / (std + eps) if norm_by_std else centred
    return advantages


def aggregate(values: torch.Tensor, mask: torch.Tensor, mode: Aggregation = "token-mean") -> torch.Tensor:
    """Reduce per-token values to a scalar.

    ``token-mean``: every response token weighs the same (long responses weigh more).
    ``seq-mean-token-mean``: average within each response first, then across responses.
    """
    mask = mask.to(values.dtype)
    if mode == "token-mean":
        return (values * mask).sum() / mask.sum().clamp(min=1.0)
    if mode == "seq-mean-token-mean":
        per_seq = (values * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)
        return per_seq.mean()
    raise ValueError(f"unknown aggregation {mode!r}")


@dataclass(frozen=True)
class PolicyLoss:
    loss: torch.Tensor
    clip_fraction: torch.Tensor
    approx_kl: torch.Tensor


def policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    aggregation: Aggregation = "token-mean",
) -> PolicyLoss:
    """PPO clipped surrogate with separate low/high clip ratios.

    ratio = exp(logp - old_logp); loss per token = max(-A * ratio, -A * clip(ratio, 1 - low,
    1 + high)). With one optimiser step per batch the old policy is the current one, so the
    caller passes ``old_logp = logp.detach()`` and the ratio is exactly 1 (its gradient is not).
    """
    log_ratio = logp - old_logp
    ratio = torch.exp(log_ratio)
    adv = advantages.unsqueeze(-1) if advantages.dim() == 1 else advantages
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
    per_token = torch.maximum(unclipped, clipped)
    clip_fraction = aggregate((clipped > unclipped).float(), mask, "token-mean")
    approx_kl = aggregate(-log_ratio, mask, "token-mean")
    return PolicyLoss(aggregate(per_token, mask, aggregation), clip_fraction.detach(), approx_kl.detach())


def low_var_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimator of KL(policy || reference), clamped to [-10, 10].

    kl = exp(ref - logp) - (ref - logp) - 1: unbiased, always >= 0, and of low variance
    (Schulman's "k3"); the clamp keeps one outlier token from dominating the loss.
    """
    delta = ref_logp - logp
    return torch.clamp(torch.exp(delta) - delta - 1.0, min=-KL_CLAMP, max=KL_CLAMP)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Per-token entropy of the softmax over the vocabulary: logsumexp(z) - sum(p * z)."""
    probs = torch.softmax(logits.float(), dim=-1)
    return torch.logsumexp(logits.float(), dim=-1) - (probs * logits.float()).sum(-1)


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log p(token) under ``logits`` ([B, T, V] and [B, T] -> [B, T])."""
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


@dataclass(frozen=True)
class GRPOLoss:
    total: torch.Tensor
    policy: PolicyLoss
    kl: torch.Tensor
    entropy: torch.Tensor


def grpo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    ref_logp: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    entropy: torch.Tensor | None = None,
    kl_coef: float = 0.01,
    entropy_coef: float = 0.0,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    aggregation: Aggregation = "token-mean",
) -> GRPOLoss:
    """Policy loss + kl_coef * low_var_kl(policy, reference) - entropy_coef * entropy.

    The reference runs: kl_coef 0.01 (KL as a loss term, none in the reward), entropy_coef 0.
    """
    policy = policy_loss(logp, old_logp, advantages, mask, clip_low, clip_high, aggregation)
    zero = torch.zeros((), dtype=logp.dtype, device=logp.device)
    kl = aggregate(low_var_kl(logp, ref_logp), mask, aggregation) if ref_logp is not None else zero
    ent = aggregate(entropy, mask, aggregation) if entropy is not None else zero
    total = policy.loss + kl_coef * kl - entropy_coef * ent
    return GRPOLoss(total, policy, kl.detach(), ent.detach())

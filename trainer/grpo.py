"""GRPO maths in plain, commented torch (the PRA-GRPO update of both stages).

Shapes: ``rewards`` and ``group_ids`` are per response ``[B]``; log-probabilities, masks and the
per-token terms are ``[B, T]`` with ``mask`` 1 on response tokens and 0 on padding. The
formulas follow veRL's ``core_algos`` (GRPO outcome advantage, the PPO loss with separate
low/high clip ratios and the dual clip, ``low_var_kl``, the loss aggregation modes), which
produced the reference checkpoints, with veRL's numerical guards: log-ratios clamped before
``exp``, padding removed with ``where`` so a non-finite value there never reaches the loss.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

Aggregation = Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]
KL_CLAMP = 10.0  # |low_var_kl| per token, after the exp (veRL)
LOG_RATIO_CLAMP = 20.0  # |log ratio| and |ref - logp| before exp: exp(20) is finite in bf16 and fp32
CLIP_RATIO_C = 3.0  # dual-clip bound for negative advantages (veRL's clip_ratio_c)


@dataclass(frozen=True)
class LossNorm:
    """The denominators of a whole step, so that a loss summed over micro-batches and ranks is the
    loss of the step as one batch: the update then does not depend on world size or micro-batch
    size (veRL's global token-mean). ``tokens``: response tokens of the step; ``sequences``:
    responses of the step; ``horizon``: the constant divisor of ``seq-mean-token-sum-norm``
    (the configured maximum response length, as Dr.GRPO's constant)."""

    tokens: float
    sequences: float
    horizon: float

    @staticmethod
    def local(mask: torch.Tensor) -> LossNorm:
        """The denominators of one batch on its own."""
        return LossNorm(float(mask.sum().clamp(min=1.0)), float(max(1, mask.shape[0])), float(mask.shape[-1]))


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


def _masked(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``values`` with padding set to 0 by ``where`` (not a product: NaN * 0 is NaN)."""
    return torch.where(mask.bool(), values, torch.zeros((), dtype=values.dtype, device=values.device))


def aggregate(values: torch.Tensor, mask: torch.Tensor, mode: Aggregation = "token-mean",
              norm: LossNorm | None = None) -> torch.Tensor:
    """Reduce per-token values to a scalar; with ``norm``, this batch's share of the step's value
    (the shares of every micro-batch on every rank sum to the value of the whole step).

    ``token-mean``: every response token weighs the same (long responses weigh more).
    ``seq-mean-token-mean``: average within each response first, then across responses.
    ``seq-mean-token-sum``: sum within each response, average across responses.
    ``seq-mean-token-sum-norm``: sum within each response, summed and divided by a constant
    horizon (Dr.GRPO: no length bias from a per-response mean).
    """
    norm = norm or LossNorm.local(mask)
    values = _masked(values, mask)
    mask = mask.to(values.dtype)
    if mode == "token-mean":
        return values.sum() / norm.tokens
    per_seq_sum = values.sum(-1)
    if mode == "seq-mean-token-mean":
        return (per_seq_sum / mask.sum(-1).clamp(min=1.0)).sum() / norm.sequences
    if mode == "seq-mean-token-sum":
        return per_seq_sum.sum() / norm.sequences
    if mode == "seq-mean-token-sum-norm":
        return per_seq_sum.sum() / norm.horizon
    raise ValueError(f"unknown aggregation {mode!r}")


@dataclass(frozen=True)
class PolicyLoss:
    loss: torch.Tensor
    clip_fraction: torch.Tensor  # share of tokens whose ratio was clipped (this batch)
    clip_fraction_lower: torch.Tensor  # share bounded by the dual clip (negative advantages)
    approx_kl: torch.Tensor


def policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    aggregation: Aggregation = "token-mean",
    clip_ratio_c: float = CLIP_RATIO_C,
    norm: LossNorm | None = None,
) -> PolicyLoss:
    """PPO clipped surrogate with separate low/high clip ratios and veRL's dual clip.

    ratio = exp(clamp(logp - old_logp, ±20)); loss per token = max(-A * ratio, -A * clip(ratio,
    1 - low, 1 + high)); for A < 0 it is further bounded by -A * clip_ratio_c, so one token whose
    ratio exploded cannot dominate the step (the dual clip; ``clip_ratio_c`` > 1). With one
    optimiser step per batch the old policy is the current one, so the caller passes ``old_logp =
    logp.detach()`` and the ratio is exactly 1 (its gradient is not). Padding is replaced before
    the exp, so a non-finite value there never reaches the loss or its gradient.
    """
    if clip_ratio_c <= 1.0:
        raise ValueError(f"clip_ratio_c must be > 1, got {clip_ratio_c}")
    log_ratio = _masked(logp - old_logp, mask).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    ratio = torch.exp(log_ratio)
    adv = advantages.unsqueeze(-1) if advantages.dim() == 1 else advantages
    adv = adv.to(ratio.dtype).expand_as(ratio)
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
    per_token = torch.maximum(unclipped, clipped)
    bound = -adv * clip_ratio_c
    dual = torch.minimum(per_token, bound)
    lower = (per_token > bound) & (adv < 0)
    per_token = torch.where(adv < 0, dual, per_token)
    clip_fraction = aggregate((clipped > unclipped).float(), mask, "token-mean")
    clip_fraction_lower = aggregate(lower.float(), mask, "token-mean")
    approx_kl = aggregate(-log_ratio, mask, "token-mean")
    return PolicyLoss(aggregate(per_token, mask, aggregation, norm), clip_fraction.detach(),
                      clip_fraction_lower.detach(), approx_kl.detach())


def low_var_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimator of KL(policy || reference), as veRL computes it.

    kl = exp(ref - logp) - (ref - logp) - 1: unbiased, always >= 0, and of low variance
    (Schulman's "k3"). The difference is clamped to ±20 before the exp (beyond ~88 it would
    overflow and turn the gradient into NaN) and the result to [-10, 10], so one outlier token
    cannot dominate the loss.
    """
    delta = (ref_logp - logp).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
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
    clip_ratio_c: float = CLIP_RATIO_C,
    norm: LossNorm | None = None,
) -> GRPOLoss:
    """Policy loss + kl_coef * low_var_kl(policy, reference) - entropy_coef * entropy.

    The reference runs: kl_coef 0.01 (KL as a loss term, none in the reward), entropy_coef 0.
    An entropy given with ``entropy_coef`` 0 is only reported (it carries no gradient then).
    """
    policy = policy_loss(logp, old_logp, advantages, mask, clip_low, clip_high, aggregation, clip_ratio_c, norm)
    zero = torch.zeros((), dtype=logp.dtype, device=logp.device)
    if ref_logp is not None:
        ref_logp = _masked(ref_logp, mask)
        kl = aggregate(low_var_kl(_masked(logp, mask), ref_logp), mask, aggregation, norm)
    else:
        kl = zero
    ent = aggregate(entropy, mask, aggregation, norm) if entropy is not None else zero
    total = policy.loss + kl_coef * kl - (entropy_coef * ent if entropy_coef else zero)
    return GRPOLoss(total, policy, kl.detach(), ent.detach())

"""GRPO maths against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from p2r.trainer.grpo import (
    LossNorm,
    aggregate,
    entropy_from_logits,
    group_advantages,
    grpo_loss,
    low_var_kl,
    policy_loss,
    token_logprobs,
)


def test_group_advantages() -> None:
    rewards = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 1.0, 5.0])
    groups = torch.tensor([0, 0, 0, 0, 1, 1, 2])
    adv = group_advantages(rewards, groups, eps=0.0)
    # group 0: mean 0.75, unbiased std sqrt((3 * 0.25^2 + 0.75^2) / 3) = 0.5
    # group 1: mean 0.5, unbiased std sqrt(0.5) ; group 2 alone -> 0
    s = math.sqrt(0.5)
    assert adv.tolist() == pytest.approx([0.5, -1.5, 0.5, 0.5, -0.5 / s, 0.5 / s, 0.0])
    assert group_advantages(rewards, groups, norm_by_std=False).tolist() == pytest.approx(
        [0.25, -0.75, 0.25, 0.25, -0.5, 0.5, 0.0])
    same = group_advantages(torch.ones(4), torch.zeros(4, dtype=torch.long))
    assert same.tolist() == [0.0, 0.0, 0.0, 0.0]  # no signal, no NaN


def test_aggregate() -> None:
    values = torch.tensor([[1.0, 2.0, 3.0], [4.0, 9.0, 9.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    assert aggregate(values, mask, "token-mean").item() == pytest.approx(2.5)
    assert aggregate(values, mask, "seq-mean-token-mean").item() == pytest.approx(3.0)
    with pytest.raises(ValueError, match="unknown aggregation"):
        aggregate(values, mask, "sum")  # type: ignore[arg-type]


def test_policy_loss_clips_low_and_high_separately() -> None:
    old = torch.zeros(1, 3)
    logp = torch.log(torch.tensor([[1.5, 0.5, 1.1]]))
    mask = torch.ones(1, 3)
    # A = +1: ratio 1.5 clipped at 1 + 0.28 -> -1.28; ratio 0.5 -> max(-0.5, -0.8) = -0.5; 1.1 -> -1.1
    out = policy_loss(logp, old, torch.tensor([1.0]), mask, clip_low=0.2, clip_high=0.28)
    assert out.loss.item() == pytest.approx((-1.28 - 0.5 - 1.1) / 3)
    assert out.clip_fraction.item() == pytest.approx(1 / 3)
    # A = -1: ratio 0.5 clipped at 1 - 0.2 -> 0.8; ratio 1.5 -> max(1.5, 1.28) = 1.5; 1.1 -> 1.1
    out = policy_loss(logp, old, torch.tensor([-1.0]), mask, clip_low=0.2, clip_high=0.28)
    assert out.loss.item() == pytest.approx((1.5 + 0.8 + 1.1) / 3)
    assert out.clip_fraction.item() == pytest.approx(1 / 3)


def test_on_policy_ratio_is_one_but_gradient_is_not_zero() -> None:
    logp = torch.tensor([[-1.0, -2.0], [-0.5, -0.1]], requires_grad=True)
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    out = policy_loss(logp, logp.detach(), torch.tensor([2.0, -1.0]), mask)
    assert out.loss.item() == pytest.approx((-2 - 2 + 1) / 3)
    out.loss.backward()
    # d/dlogp of -A * exp(logp - old) at ratio 1 is -A, averaged over the 3 response tokens
    assert logp.grad.flatten().tolist() == pytest.approx([-2 / 3, -2 / 3, 1 / 3, 0.0])


def test_low_var_kl() -> None:
    logp = torch.log(torch.tensor([0.5, 0.3]))
    ref = torch.log(torch.tensor([0.25, 0.3]))
    # delta = ln(0.25 / 0.5) = -ln 2: exp(delta) - delta - 1 = 0.5 + ln 2 - 1
    assert low_var_kl(logp, ref).tolist() == pytest.approx([0.5 + math.log(2) - 1, 0.0])
    assert low_var_kl(torch.tensor([-30.0]), torch.tensor([0.0])).item() == 10.0  # clamped


def test_entropy_and_token_logprobs() -> None:
    logits = torch.zeros(1, 2, 4)
    logits[0, 1] = torch.tensor([10.0, 0.0, 0.0, 0.0])
    ent = entropy_from_logits(logits)
    assert ent[0, 0].item() == pytest.approx(math.log(4))
    assert ent[0, 1].item() < 0.01
    lp = token_logprobs(logits, torch.tensor([[2, 0]]))
    assert lp[0, 0].item() == pytest.approx(math.log(0.25))
    assert lp[0, 1].item() == pytest.approx(-math.log1p(3 * math.exp(-10)), rel=1e-3)  # float32


def test_grpo_loss_combines_terms() -> None:
    logp = torch.log(torch.tensor([[0.5, 0.5]]))
    ref = torch.log(torch.tensor([[0.25, 0.5]]))
    mask = torch.ones(1, 2)
    ent = torch.tensor([[1.0, 3.0]])
    out = grpo_loss(logp, logp, ref, torch.tensor([1.0]), mask, ent, kl_coef=0.1, entropy_coef=0.01)
    kl = (0.5 + math.log(2) - 1) / 2
    assert out.kl.item() == pytest.approx(kl) and out.entropy.item() == pytest.approx(2.0)
    assert out.total.item() == pytest.approx(-1.0 + 0.1 * kl - 0.01 * 2.0)
    no_ref = grpo_loss(logp, logp, None, torch.tensor([1.0]), mask)
    assert no_ref.total.item() == pytest.approx(-1.0) and no_ref.kl.item() == 0.0


def test_dual_clip_bounds_negative_advantages() -> None:
    """A = -1, clip 0.2, clip_ratio_c 3: ratio 5 -> max(5, 1.2) = 5, dual-clipped to 3; ratio 2 ->
    2 (under the bound); ratio 0.5 -> max(0.5, 0.8) = 0.8. For A = +1 the dual clip does nothing:
    ratio 5 -> max(-5, -1.2) = -1.2."""
    logp = torch.log(torch.tensor([[5.0, 2.0, 0.5]]))
    old, mask = torch.zeros(1, 3), torch.ones(1, 3)
    out = policy_loss(logp, old, torch.tensor([-1.0]), mask, clip_ratio_c=3.0)
    assert out.loss.item() == pytest.approx((3.0 + 2.0 + 0.8) / 3)
    assert out.clip_fraction_lower.item() == pytest.approx(1 / 3)
    out = policy_loss(logp, old, torch.tensor([1.0]), mask, clip_ratio_c=3.0)
    assert out.loss.item() == pytest.approx((-1.2 - 1.2 - 0.5) / 3)
    assert out.clip_fraction_lower.item() == 0.0
    # The dual-clipped token carries no gradient; the others do.
    lp = logp.clone().requires_grad_(True)
    policy_loss(lp, old, torch.tensor([-1.0]), mask).loss.backward()
    assert lp.grad.flatten().tolist() == pytest.approx([0.0, 2.0 / 3, 0.0])
    with pytest.raises(ValueError, match="clip_ratio_c"):
        policy_loss(logp, old, torch.tensor([-1.0]), mask, clip_ratio_c=1.0)


def test_log_ratio_clamped_before_exp() -> None:
    """A log-ratio of 100 would be exp(100) ~ 2.7e43 (inf in bf16); it is clamped to 20."""
    logp = torch.tensor([[100.0, 0.0]], requires_grad=True)
    out = policy_loss(logp, torch.zeros(1, 2), torch.tensor([-1.0]), torch.ones(1, 2), clip_ratio_c=1e30)
    assert out.loss.item() == pytest.approx((math.exp(20.0) + 1.0) / 2, rel=1e-5)
    out.loss.backward()
    assert torch.isfinite(logp.grad).all() and logp.grad[0, 0].item() == 0.0  # clamped: no gradient


def test_non_finite_padding_never_reaches_loss_or_gradient() -> None:
    logp = torch.tensor([[-1.0, float("nan")], [-0.5, float("inf")]], requires_grad=True)
    ref = torch.tensor([[-1.5, float("-inf")], [-0.5, float("nan")]])
    mask = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    for mode in ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"):
        out = grpo_loss(logp, logp.detach(), ref, torch.tensor([1.0, -1.0]), mask, kl_coef=0.1, aggregation=mode)
        assert torch.isfinite(out.total), mode
        logp.grad = None
        out.total.backward()
        assert torch.isfinite(logp.grad).all(), mode
        assert logp.grad[:, 1].tolist() == [0.0, 0.0]


def test_low_var_kl_gradient_finite_for_huge_differences() -> None:
    """|ref - logp| > 88 overflows exp in fp32; the ±20 clamp keeps value and gradient finite."""
    logp = torch.tensor([-100.0, 0.0], requires_grad=True)
    kl = low_var_kl(logp, torch.tensor([0.0, -100.0]))
    assert kl.tolist() == [10.0, 10.0]  # delta clamped to +20 / -20, then the result to 10
    kl.sum().backward()
    assert torch.isfinite(logp.grad).all()


def test_aggregation_modes_by_hand() -> None:
    values = torch.tensor([[1.0, 2.0, 3.0], [4.0, 9.0, 9.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    assert aggregate(values, mask, "seq-mean-token-sum").item() == pytest.approx((6 + 4) / 2)
    assert aggregate(values, mask, "seq-mean-token-sum-norm").item() == pytest.approx((6 + 4) / 3)
    norm = LossNorm(tokens=8, sequences=4, horizon=16)
    assert aggregate(values, mask, "token-mean", norm).item() == pytest.approx(10 / 8)
    assert aggregate(values, mask, "seq-mean-token-mean", norm).item() == pytest.approx((2 + 4) / 4)
    assert aggregate(values, mask, "seq-mean-token-sum", norm).item() == pytest.approx(10 / 4)
    assert aggregate(values, mask, "seq-mean-token-sum-norm", norm).item() == pytest.approx(10 / 16)


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"])
def test_micro_batch_shares_sum_to_the_whole_batch(mode: str) -> None:
    """With the step's LossNorm, any split into micro-batches gives the loss and gradient of
    the whole batch (what makes the update independent of micro-batch size and world size)."""
    g = torch.Generator().manual_seed(0)
    logp = (-torch.rand(6, 5, generator=g) * 3).requires_grad_(True)
    ref = -torch.rand(6, 5, generator=g) * 3
    adv = torch.randn(6, generator=g)
    mask = (torch.rand(6, 5, generator=g) > 0.3).float()
    mask[:, 0] = 1.0
    norm = LossNorm(float(mask.sum()), 6.0, 5.0)
    whole = grpo_loss(logp, logp.detach() + 0.1, ref, adv, mask, aggregation=mode)
    whole.total.backward()
    expected = logp.grad.clone()
    logp.grad = None
    parts = sum(grpo_loss(logp[i:j], logp[i:j].detach() + 0.1, ref[i:j], adv[i:j], mask[i:j], aggregation=mode,
                          norm=norm).total for i, j in ((0, 1), (1, 4), (4, 6)))
    parts.backward()  # type: ignore[union-attr]
    assert parts.item() == pytest.approx(whole.total.item(), rel=1e-6)  # type: ignore[union-attr]
    assert torch.allclose(logp.grad, expected, rtol=1e-6, atol=1e-9)

"""The FSDP2 actor's update (trainer/actor.py) on fixed rollouts, each run in its own processes
(``tests/actor_worker.py``): the same parameters at world size 1 and 2 (and different micro-batch
sizes and token budgets), the same parameters as the previous per-micro-batch collective schedule,
gradients reduce-scattered and each model gathered once per step (collectives counted), the push
and the export gathered in the cast dtype, temperature-scaled log-probs, the rollout / policy
log-prob parity metric, non-finite steps skipped, fp32 master weights under bf16 compute."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(model: Path, data: Path, out: Path, world: int = 1, *args: str) -> list[dict[str, Any]]:
    port = str(_free_port())
    procs = [subprocess.Popen([sys.executable, "-m", "tests.actor_worker", str(model), str(data), str(out), *args],
                              cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "WORLD_SIZE": str(world), "RANK": str(rank),
                                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "OMP_NUM_THREADS": "1"})
             for rank in range(world)]
    for p in procs:
        _, err = p.communicate(timeout=900)
        assert p.returncode == 0, err[-3000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]


def base_weights(model: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {k: v.float() for k, v in load_file(model / "model.safetensors").items()}


def moved_fraction(params: dict[str, torch.Tensor], base: dict[str, torch.Tensor]) -> float:
    changed = sum(int((params[k] != base[k]).sum()) for k in base)
    return changed / sum(base[k].numel() for k in base)


def test_two_ranks_give_the_parameters_of_one_rank(tmp_path: Path, tiny_model_dir: Path,
                                                   synthetic_dir: Path) -> None:
    """Same global batch, 2 steps, fp32: world 1 with micro-batches of 3 and world 2 with
    micro-batches of 2 reach the same parameters; both ranks hold the same model. The 2-rank
    train state resumes at world size 1 and continues exactly as a 1-rank run of 3 steps. The
    weights streamed from the shards into each rank's engine give the log-probs of a full push.
    The previous schedule (a gather of each model and a reduce-scatter per micro-batch) reaches
    the same parameters at world 2 and world 1, with the collectives counted: now one
    reduce-scatter of the gradients and one gather of the policy and of the reference per FSDP unit
    per step, none in the backward; then one per micro-batch each, and the policy twice."""
    data = synthetic_dir / "train.parquet"
    one = run(tiny_model_dir, data, tmp_path / "one", 1, "--micro", "3", "--lr", "1e-5", "--steps", "3")
    two = run(tiny_model_dir, data, tmp_path / "two", 2, "--micro", "2", "--lr", "1e-5",
              "--save-state", str(tmp_path / "state"), "--engine", "--count")
    old = run(tiny_model_dir, data, tmp_path / "old", 2, "--micro", "2", "--lr", "1e-5", "--count",
              "--schedule", "micro-batch")
    torch.testing.assert_close(torch.load(tmp_path / "old" / "params.pt"), torch.load(tmp_path / "two" / "params.pt"),
                               rtol=1e-5, atol=1e-8)
    for new_rank, old_rank in zip(two, old, strict=True):
        for new_step, old_step in zip(new_rank["steps"], old_rank["steps"], strict=True):
            assert new_step["loss"] == pytest.approx(old_step["loss"], rel=1e-6)
            micro, new, was = new_step["micro_batches"], new_step["collectives"], old_step["collectives"]
            units = new["update:backward"]["reduce_scatter"][0]
            assert micro == old_step["micro_batches"] > 1 and units >= 3  # 2 layers, 2 vision blocks, root
            assert new["update"]["all_gather"][0] == new["ref"]["all_gather"][0] == units
            assert "all_gather" not in new["update:backward"]
            assert was["update:backward"]["reduce_scatter"][0] == micro * units
            assert was["ref"]["all_gather"][0] == micro * units
            assert was["update"]["all_gather"][0] == was["update:backward"]["all_gather"][0] == micro * units
            sent = lambda c: sum(v[1] for phase in c.values() for v in phase.values())  # noqa: E731
            assert sent(was) > 3.5 * sent(new)
    for rank in two:
        collectives = rank["collectives"]
        assert collectives["push_bf16"]["all_gather"][1] == collectives["push_fp32"]["all_gather"][1] / 2
        assert collectives["export"]["all_gather"][1] == collectives["push_fp32"]["all_gather"][1]  # fp32 compute
    assert two[0]["export"] == {"keys_equal": True, "dtype": "torch.float32", "values_equal": True}
    assert two[1]["export"] == {"empty": True}
    for rank in two:
        push = rank["push"]
        assert push["streamed"] == push["full"] and push["tokens"][0] == push["tokens"][1]
        assert push["streamed"] != push["before"]  # the push did change the engine
        assert push["push_bytes"] > 0
    resumed = run(tiny_model_dir, data, tmp_path / "resumed", 1, "--micro", "4", "--lr", "1e-5",
                  "--load-state", str(tmp_path / "state"), "--first-step", "2", "--steps", "1")
    assert resumed[0]["steps"][0]["loss"] == pytest.approx(one[0]["steps"][2]["loss"], rel=1e-4)
    torch.testing.assert_close(torch.load(tmp_path / "resumed" / "params.pt"),
                               torch.load(tmp_path / "one" / "params.pt"), rtol=1e-5, atol=1e-8)
    one = [{**one[0], "steps": one[0]["steps"][:2]}]
    one_two_steps = run(tiny_model_dir, data, tmp_path / "one2", 1, "--micro", "3", "--lr", "1e-5")
    run(tiny_model_dir, data, tmp_path / "old1", 1, "--micro", "3", "--lr", "1e-5", "--schedule", "micro-batch")
    torch.testing.assert_close(torch.load(tmp_path / "old1" / "params.pt"),
                               torch.load(tmp_path / "one2" / "params.pt"), rtol=1e-5, atol=1e-8)
    assert two[0]["digest"] == two[1]["digest"]
    for a, b in zip(one[0]["steps"], two[0]["steps"], strict=True):
        assert a["tokens"] == b["tokens"] and a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
    assert one_two_steps[0]["steps"] == one[0]["steps"]
    p1, p2 = torch.load(tmp_path / "one2" / "params.pt"), torch.load(tmp_path / "two" / "params.pt")
    torch.testing.assert_close(p1, p2, rtol=1e-5, atol=1e-8)
    base = base_weights(tiny_model_dir)
    assert moved_fraction(p1, base) > 0.99  # the comparison is between models that really moved
    assert max(float((p1[k] - base[k]).abs().max()) for k in base) > 1e3 * 1e-8


def test_poisoned_log_probs_leave_every_weight_finite(tmp_path: Path, tiny_model_dir: Path,
                                                      synthetic_dir: Path) -> None:
    """Step 1: NaN in one rollout's behaviour log-probs: the loss is NaN, the step is skipped
    and counted. Step 2: an inf there (a log-ratio of -inf) and step 3: a log-ratio of 100
    everywhere are clamped to ±20 before the exp: those steps go through, finite. Step 4 is
    clean. Every weight stays finite."""
    [out] = run(tiny_model_dir, synthetic_dir / "train.parquet", tmp_path, 1, "--inject", "nan,inf,ratio100",
                "--lr", "1e-4", "--steps", "4")
    assert out["finite"]
    assert [s["skipped"] for s in out["steps"]] == [True, False, False, False]
    assert out["skipped_steps"] == 1
    assert all(s["grad_norm"] is not None for s in out["steps"][1:])


def test_bf16_compute_keeps_fp32_master_weights(tmp_path: Path, tiny_model_dir: Path, synthetic_dir: Path) -> None:
    """bf16 forward/backward at the reference lr 1e-6: one step moves > 99 % of the fp32 master
    weights, where the same update applied to bf16 weights would mostly round away (a bf16 weight
    of size ~0.02 has a step of ~1e-4). Excluded: the vision position table, whose rows beyond
    the test images' small grid get no gradient in any precision."""
    run(tiny_model_dir, synthetic_dir / "train.parquet", tmp_path, 1, "--dtype", "bfloat16", "--lr", "1e-6",
        "--steps", "1")
    params = torch.load(tmp_path / "params.pt")
    base = {k: v for k, v in base_weights(tiny_model_dir).items() if not k.endswith("visual.pos_embed.weight")}
    assert all(params[k].dtype == torch.float32 for k in base)
    assert moved_fraction(params, base) > 0.99
    as_bf16 = {k: (base[k] + (params[k] - base[k])).bfloat16().float() for k in base}
    assert moved_fraction(as_bf16, {k: v.bfloat16().float() for k, v in base.items()}) < 0.2


def test_token_budget_temperature_and_rollout_parity(tmp_path: Path, tiny_model_dir: Path,
                                                     synthetic_dir: Path) -> None:
    """At temperature 0.5, one step: world 1 with micro-batches of 3 responses and no token budget,
    and world 2 with a budget of one token (every response alone: 6 micro-batches per rank) reach
    the same parameters. The temperature reaches the update (its entropy and KL are not T = 1's),
    and the engine log-probs (-1.0 for every token here) give the parity metric, reduced over the
    ranks: equal at world 1 and 2, the max at least the mean."""
    data = synthetic_dir / "train.parquet"
    args = ("--lr", "1e-5", "--steps", "1", "--temperature", "0.5", "--rollout-logprobs", "--kl", "0.5")
    [whole] = run(tiny_model_dir, data, tmp_path / "whole", 1, "--micro", "3", *args)
    cut = run(tiny_model_dir, data, tmp_path / "cut", 2, "--micro", "3", "--max-tokens", "1", *args)
    [t1] = run(tiny_model_dir, data, tmp_path / "t1", 1, "--micro", "3", "--lr", "1e-5", "--steps", "1",
               "--kl", "0.5")
    a, b = whole["steps"][0], cut[0]["steps"][0]
    assert a["micro_batches"] == 4 and b["micro_batches"] == 6  # 4 prompts x 3 responses
    assert a["loss"] == pytest.approx(b["loss"], rel=1e-5) and a["kl"] == pytest.approx(b["kl"], rel=1e-5)
    # AdamW's first step is lr * g / (|g| + eps): where |g| is near eps (1e-8), summing the same
    # gradient in another order moves a weight by a small fraction of lr (1e-5), hence atol 1e-7.
    torch.testing.assert_close(torch.load(tmp_path / "whole" / "params.pt"), torch.load(tmp_path / "cut" / "params.pt"),
                               rtol=1e-5, atol=1e-7)
    assert a["diff_mean"] is not None and a["diff_max"] >= a["diff_mean"] > 0
    assert b["diff_mean"] == pytest.approx(a["diff_mean"], rel=1e-6) and b["diff_max"] == pytest.approx(a["diff_max"])
    assert cut[1]["steps"][0]["diff_mean"] == b["diff_mean"]
    assert t1["steps"][0]["diff_mean"] is None  # no engine log-probs given
    assert abs(t1["steps"][0]["entropy"] - a["entropy"]) > 1e-3 * abs(a["entropy"])


# --------------------------------------------------------------------- in-process, no FSDP


def test_micro_batches_pack_responses_of_one_prompt_within_the_token_budget() -> None:
    from p2r.core.generation import ChatRequest
    from p2r.trainer.actor import PromptGroup, micro_batches

    request = ChatRequest(messages=[])
    groups = [PromptGroup(request, [1] * 10, [[5] * n for n in (2, 4, 1, 9, 3)], [0.0] * 5),
              PromptGroup(request, [1] * 100, [], []),
              PromptGroup(request, [1] * 20, [[5] * 30, [5]], [0.0, 0.0])]
    cuts = micro_batches(groups, 4, 40)
    # group 0: 3 x (10 + 4) = 42 > 40 -> [0, 2); 2 x 14 = 28, then 3 x 19 = 57 -> [2, 4); [4, 5)
    # group 2: 50 on its own (over the budget, alone), then 21
    assert cuts == [(0, slice(0, 2)), (0, slice(2, 4)), (0, slice(4, 5)), (2, slice(0, 1)), (2, slice(1, 2))]
    for g, part in cuts:
        rows = groups[g].responses[part]
        assert len(rows) == 1 or len(rows) * (len(groups[g].prompt_ids) + max(map(len, rows))) <= 40
    assert micro_batches(groups, 2, None) == [(0, slice(0, 2)), (0, slice(2, 4)), (0, slice(4, 5)), (2, slice(0, 2))]
    assert micro_batches(groups, 8, 10**6) == [(0, slice(0, 5)), (2, slice(0, 2))]


def test_log_probs_are_those_of_the_tempered_distribution(tiny_model_dir: Path, synthetic_dir: Path) -> None:
    """logits / T before the log-softmax (and the entropy), exactly; T = 1 is bit-identical to no
    scaling; through the real model the response log-probs are those of its full-sequence logits / T."""
    from transformers import AutoProcessor, Qwen3VLForConditionalGeneration

    from p2r.trainer.grpo import entropy_from_logits
    from p2r.trainer.policy import logprobs_from_logits, pad_responses, response_logprobs
    from tests.actor_worker import global_batch

    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 7, 50, generator=gen) * 3
    tokens = torch.randint(0, 50, (2, 7), generator=gen)
    for t in (0.6, 1.7):
        lp, ent = logprobs_from_logits(logits, tokens, with_entropy=True, temperature=t, chunk=3)
        expected = torch.log_softmax(logits / t, -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
        torch.testing.assert_close(lp, expected, rtol=0, atol=1e-6)
        torch.testing.assert_close(ent, entropy_from_logits(logits / t), rtol=0, atol=1e-5)
        assert not torch.allclose(lp, logprobs_from_logits(logits, tokens)[0])
    assert torch.equal(logprobs_from_logits(logits, tokens, temperature=1.0)[0],
                       torch.log_softmax(logits, -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1))
    with pytest.raises(ValueError, match="temperature"):
        logprobs_from_logits(logits, tokens, temperature=0.0)

    processor = AutoProcessor.from_pretrained(tiny_model_dir)
    model = Qwen3VLForConditionalGeneration.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    group = global_batch(processor, synthetic_dir / "train.parquet", 0, prompts=1)[0]
    batch = pad_responses(group.responses)
    with torch.no_grad():
        lp, _ = response_logprobs(model, processor, group.request, group.prompt_ids, batch, temperature=0.7)
        ids = torch.cat([torch.tensor(group.prompt_ids).expand(len(group.responses), -1), batch.tokens], 1)
        from p2r.trainer.policy import vision_inputs

        v = vision_inputs(processor, group.request)
        full = model(input_ids=ids, attention_mask=torch.cat([torch.ones(len(group.responses), len(group.prompt_ids)),
                                                              batch.mask], 1).long(),
                     pixel_values=v["pixel_values"].repeat(len(group.responses), 1),
                     image_grid_thw=v["image_grid_thw"].repeat(len(group.responses), 1),
                     mm_token_type_ids=(ids == model.config.image_token_id).long()).logits
    p = len(group.prompt_ids)
    expected = torch.log_softmax(full[:, p - 1 : -1] / 0.7, -1).gather(-1, batch.tokens.unsqueeze(-1)).squeeze(-1)
    mask = batch.mask.bool()
    torch.testing.assert_close(lp[mask], expected[mask], rtol=1e-4, atol=1e-4)


def test_rollout_diff_counts_only_tokens_both_sides_have() -> None:
    from p2r.trainer.actor import _rollout_diff

    policy = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -9.0, -9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    total, count, largest = _rollout_diff(policy, [[-1.5, -2.0], [-0.25, -7.0, -7.0]], mask)
    assert (total, count, largest) == (0.75, 3.0, 0.5)  # row 0: 0.5 + 0 (third token unknown); row 1: 0.25
    assert _rollout_diff(policy, [[], []], mask) == (0.0, 0.0, -1.0)

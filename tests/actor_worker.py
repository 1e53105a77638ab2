"""One rank of an ``Actor`` update run on fixed rollouts (no engine, no services), for the
FSDP tests: ``python -m tests.actor_worker MODEL DATA OUT [--steps N] [--micro M] [--dtype D]``
under ``WORLD_SIZE`` / ``RANK`` / ``MASTER_*``. Every rank builds the same global batch (seeded)
and takes its strided share, as the trainer's data shards do; rank 0 writes the full parameters
after the last step (fp32 masters) and every rank its parameter digest. ``--count`` counts the
collectives of each step, of a weight push in fp32 and in bf16 and of the HF export
(``bench.trainer_memory.CollectiveCounter``)."""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path
from typing import Any

import torch


def global_batch(processor: Any, data: Path, step: int, prompts: int = 4, rollouts: int = 3,
                 vocab: int = 200) -> list[Any]:
    """``prompts`` prompt groups of ``rollouts`` random responses (lengths 1-6) with random
    advantages; the prompt ids are the processor's (what the engine would send)."""
    from p2r.core.flow import perceiver_request
    from p2r.core.images import MIN_PIXELS, PixelBounds
    from p2r.data.dataset import load_samples
    from p2r.trainer.actor import PromptGroup

    rng = random.Random(1000 + step)
    samples = load_samples(data)
    groups = []
    for k in range(prompts):
        s = samples[(step * prompts + k) % len(samples)]
        request = perceiver_request(s.load_image(), s.question, PixelBounds(MIN_PIXELS, 16384))
        text = processor.apply_chat_template(request.messages, tokenize=False, add_generation_prompt=True)
        ids = processor(text=[text], images=list(request.images), return_tensors="pt")["input_ids"][0].tolist()
        responses = [[rng.randrange(10, vocab) for _ in range(rng.randint(1, 6))] for _ in range(rollouts)]
        groups.append(PromptGroup(request, ids, responses, [rng.uniform(-1.5, 1.5) for _ in range(rollouts)]))
    return groups


def inject(groups: list[Any], kind: str) -> None:
    if kind not in ("nan", "inf", "ratio100"):
        raise SystemExit(f"unknown injection {kind!r}")
    """Behaviour log-probs for every rollout: the true ones are unknown here, so 0 (a log-ratio
    of logp itself, within the clip range's reach); then one poisoned rollout, or all shifted."""
    for g in groups:
        g.old_logprobs = [[-100.0 if kind == "ratio100" else 0.0] * len(r) for r in g.responses]
    if kind in ("nan", "inf"):
        groups[0].old_logprobs[0][0] = float(kind)


def engine_check(actor: Any, model: Path, data: Path) -> tuple[dict[str, Any], Any]:
    """Greedy log-probs of one request from this rank's engine: before any push, after the
    streamed push (one tensor gathered at a time), after a push of the full gathered model.
    The engine is returned to be kept alive: vLLM's shutdown tears down the process group."""
    from p2r.core.generation import Sampling
    from p2r.services.engine import EngineLimits, with_tied_head
    from p2r.trainer.rollout import RolloutEngine, RolloutTopology

    engine = RolloutEngine(str(model), RolloutTopology(actor.rank, actor.world, 1),
                           EngineLimits(max_model_len=2048, max_num_seqs=2, dtype="float32"))
    request = global_batch(actor.processor, data, 0)[0].request
    greedy = Sampling(max_tokens=6)
    [[before]] = engine.sample([request], greedy)
    stats: dict[str, float] = {}
    engine.push_weights(actor.stream_weights(torch.float32, stats))
    [[streamed]] = engine.sample([request], greedy)
    full = {name: t.full_tensor() if hasattr(t, "full_tensor") else t for name, t in actor.model.state_dict().items()}
    engine.push_weights(with_tied_head(full, actor.tied))
    [[whole]] = engine.sample([request], greedy)
    return {"before": before.logprobs, "streamed": streamed.logprobs, "full": whole.logprobs,
            "tokens": [streamed.token_ids, whole.token_ids], "push_bytes": stats["push_bytes"]}, engine


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model", type=Path)
    parser.add_argument("data", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--micro", type=int, default=2)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--first-step", type=int, default=0, help="global batch index of the first step")
    parser.add_argument("--save-state", type=Path, help="after the steps, write the DCP train state here")
    parser.add_argument("--load-state", type=Path, help="before the steps, load a DCP train state from here")
    parser.add_argument("--engine", action="store_true",
                        help="after the steps: streamed push vs full push into a rollout engine, log-probs")
    parser.add_argument("--inject", default="", help="comma-separated, one per step from the first: none, nan, "
                        "inf (in one rollout's behaviour log-probs) or ratio100 (a log-ratio of 100 everywhere)")
    parser.add_argument("--schedule", default="step", help="the actor's collective schedule (step | micro-batch)")
    parser.add_argument("--max-tokens", type=int, default=None, help="max_tokens_per_micro_batch (default none)")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--kl", type=float, default=0.01)
    parser.add_argument("--count", action="store_true", help="count each step's collectives, a push's, the export's")
    parser.add_argument("--rollout-logprobs", action="store_true",
                        help="give every response engine log-probs of -1.0 (the parity metric's input)")
    args = parser.parse_args()

    from p2r.trainer.actor import Actor
    from p2r.trainer.config import TrainConfig

    torch.manual_seed(0)
    cfg = TrainConfig(role="perceiver", model=str(args.model), data=args.data, output="unused",
                      reward_plugin="tests.plugins:starts_with_digit", learning_rate=args.lr, kl_coef=args.kl,
                      micro_batch_size=args.micro, compute_dtype=args.dtype, max_response_tokens=8,
                      max_tokens_per_micro_batch=args.max_tokens, temperature=args.temperature)
    actor = Actor(cfg, args.model, args.model, schedule=args.schedule)
    counter = None
    if args.count:
        from bench.trainer_memory import CollectiveCounter

        counter = CollectiveCounter().__enter__()
        counter.phase = "idle"
        counter.attribute_reference(actor)
    if args.load_state:
        actor.load_train_state(args.load_state)
    stats = []
    for step in range(args.first_step, args.first_step + args.steps):
        groups = global_batch(actor.processor, args.data, step)
        kinds = [k for k in args.inject.split(",") if k]
        kind = kinds[step - args.first_step] if step - args.first_step < len(kinds) else "none"
        if kind != "none":
            inject(groups, kind)
        if args.rollout_logprobs:
            for g in groups:
                g.rollout_logprobs = [[-1.0] * len(r) for r in g.responses]
        if counter is not None:
            counter.reset()
            counter.phase = "update"
        out = actor.update(groups[actor.rank :: actor.world])
        stats.append({"loss": out.loss, "grad_norm": out.grad_norm if out.grad_norm == out.grad_norm else None,
                      "tokens": out.tokens, "micro_batches": out.micro_batches, "skipped": out.skipped,
                      "kl": out.kl, "entropy": out.entropy, "diff_mean": out.rollout_logprob_diff_mean,
                      "diff_max": out.rollout_logprob_diff_max,
                      "collectives": counter.summary() if counter is not None else None})
    extra: dict[str, Any] = {}
    if counter is not None:
        counter.reset()
        for name, dtype in (("push_fp32", torch.float32), ("push_bf16", torch.bfloat16)):
            counter.phase = name
            for _ in actor.stream_weights(dtype):
                pass
        counter.phase = "export"
        export = actor.full_state_dict()
        extra["collectives"] = counter.summary()
        counter.__exit__()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        reference = get_model_state_dict(actor.model, options=StateDictOptions(full_state_dict=True,
                                                                                 cpu_offload=True))
        if actor.rank == 0:
            extra["export"] = {"keys_equal": sorted(export) == sorted(reference),
                               "dtype": str(next(iter(export.values())).dtype),
                               "values_equal": all(torch.equal(export[k], v.to(actor.dtype))
                                                   for k, v in reference.items())}
        else:
            extra["export"] = {"empty": not export}
    if args.save_state:
        actor.save_train_state(args.save_state)
    push, _engine = engine_check(actor, args.model, args.data) if args.engine else (None, None)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    # The fp32 master weights themselves (the served checkpoint is in the compute dtype).
    full = get_model_state_dict(actor.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    digest = actor.param_digest()
    args.out.mkdir(parents=True, exist_ok=True)
    if actor.rank == 0:
        torch.save(full, args.out / "params.pt")
    finite = all(bool(torch.isfinite(t).all()) for t in full.values())
    (args.out / f"rank{actor.rank}.json").write_text(json.dumps({
        "digest": digest, "steps": stats, "skipped_steps": actor.skipped_steps, "finite": finite,
        "push": push, **extra}))


if __name__ == "__main__":
    main()

"""One rank of an ``Actor`` update run on fixed rollouts (no engine, no services), for the
FSDP tests: ``python -m tests.actor_worker MODEL DATA OUT [--steps N] [--micro M] [--dtype D]``
under ``WORLD_SIZE`` / ``RANK`` / ``MASTER_*``. Every rank builds the same global batch (seeded)
and takes its strided share, as the trainer's data shards do; rank 0 writes the full parameters
after the last step (fp32 masters) and every rank its parameter digest."""

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
    from p2r.trainer.rollout import RolloutEngine

    engine = RolloutEngine(str(model), EngineLimits(max_model_len=2048, max_num_seqs=2, dtype="float32"))
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
    args = parser.parse_args()

    from p2r.trainer.actor import Actor
    from p2r.trainer.config import TrainConfig

    torch.manual_seed(0)
    cfg = TrainConfig(role="perceiver", model=str(args.model), data=args.data, output="unused",
                      reward_plugin="tests.plugins:starts_with_digit", learning_rate=args.lr, kl_coef=0.01,
                      micro_batch_size=args.micro, compute_dtype=args.dtype, max_response_tokens=8)
    actor = Actor(cfg, args.model, args.model)
    if args.load_state:
        actor.load_train_state(args.load_state)
    stats = []
    for step in range(args.first_step, args.first_step + args.steps):
        groups = global_batch(actor.processor, args.data, step)
        kinds = [k for k in args.inject.split(",") if k]
        kind = kinds[step - args.first_step] if step - args.first_step < len(kinds) else "none"
        if kind != "none":
            inject(groups, kind)
        out = actor.update(groups[actor.rank :: actor.world])
        stats.append({"loss": out.loss, "grad_norm": out.grad_norm if out.grad_norm == out.grad_norm else None,
                      "tokens": out.tokens, "micro_batches": out.micro_batches, "skipped": out.skipped})
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
        "push": push}))


if __name__ == "__main__":
    main()

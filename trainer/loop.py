"""One PRA-GRPO stage: rollouts on a colocated vLLM engine, role rewards from live services,
group-normalised advantages, the clipped policy loss with low_var_kl, an optimiser step, and the
new weights pushed into the engine in place. Resumable from the newest complete checkpoint.

Distributed: ``torch.distributed`` from the standard env (``MASTER_ADDR``, ``MASTER_PORT``,
``WORLD_SIZE``, ``RANK`` - what the PyTorchJob operator sets); each rank owns a strided shard of
the data and its own rollout engine; gradients are averaged across ranks before each step
(gloo on CPU, NCCL on GPU). One optimiser step per batch (the reference configuration), so the
behaviour policy is the current one: old log-probs are the detached current ones.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from p2r.core.evidence import build_evidence
from p2r.core.flow import perceiver_request, reasoner_request
from p2r.core.generation import ChatRequest, Sampling
from p2r.core.images import MIN_PIXELS, PixelBounds
from p2r.data.dataset import Sample, load_samples
from p2r.services.checkpoints import latest_checkpoint, resolve_checkpoint, upload_checkpoint, write_manifest
from p2r.services.engine import EngineLimits
from p2r.trainer.config import TrainConfig
from p2r.trainer.grpo import group_advantages, grpo_loss
from p2r.trainer.policy import pad_responses, response_logprobs
from p2r.trainer.rewards import PerceiverCache, PerceiverReward, PluginReward, ReasonerReward, RewardStats
from p2r.trainer.rollout import RolloutEngine, named_weights

log = logging.getLogger("p2r.train")
STATE_FILE = "trainer_state.pt"


@dataclass
class Position:
    """Where the data iterator is: epoch, and offset into that epoch's shuffled shard."""

    step: int = 0
    epoch: int = 0
    offset: int = 0


def init_distributed() -> tuple[int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend=backend, rank=rank, world_size=world)
    return rank, world


def next_batch(shard: list[Sample], per_rank: int, seed: int, pos: Position, epochs: int) -> list[Sample] | None:
    """The next ``per_rank`` prompts; the shard is reshuffled each epoch with a seeded RNG."""
    batch: list[Sample] = []
    while len(batch) < per_rank:
        if pos.epoch >= epochs:
            return None
        order = np.random.default_rng(seed + pos.epoch).permutation(len(shard))
        take = order[pos.offset : pos.offset + per_rank - len(batch)]
        batch += [shard[i] for i in take]
        pos.offset += len(take)
        if pos.offset >= len(shard):
            pos.epoch, pos.offset = pos.epoch + 1, 0
    return batch


class Trainer:
    def __init__(self, cfg: TrainConfig, resume: str | None = None) -> None:
        from transformers import AutoProcessor, Qwen3VLForConditionalGeneration

        self.cfg = cfg
        self.rank, self.world = init_distributed()
        self.bounds = PixelBounds(MIN_PIXELS, cfg.max_pixels)
        cfg.workdir.mkdir(parents=True, exist_ok=True)
        self.cache_dir = cfg.workdir / "cache"
        resume_uri = latest_checkpoint(cfg.output) if resume == "auto" else resume
        start = resolve_checkpoint(resume_uri or cfg.model, self.cache_dir / f"rank{self.rank}")
        base = resolve_checkpoint(cfg.model, self.cache_dir / f"rank{self.rank}")
        dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
        self.processor = AutoProcessor.from_pretrained(base)
        attention = {}
        if torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None:
            attention = {"attn_implementation": "flash_attention_2"}
        self.model = Qwen3VLForConditionalGeneration.from_pretrained(start, dtype=dtype, **attention)
        self.model.train()
        self.ref = None
        if cfg.kl_coef > 0:
            self.ref = Qwen3VLForConditionalGeneration.from_pretrained(base, dtype=dtype, **attention).eval()
            self.ref.requires_grad_(False)
        self.optimiser = torch.optim.AdamW(self.model.parameters(), lr=cfg.learning_rate,
                                           weight_decay=cfg.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimiser, lambda _: 1.0)
        self.pos = Position()
        torch.manual_seed(cfg.seed + self.rank)
        random.seed(cfg.seed + self.rank)
        if resume_uri:
            self._load_state(start / STATE_FILE)
            log.info("resumed from %s at step %d", resume_uri, self.pos.step)
        self.engine = RolloutEngine(
            str(start), EngineLimits(max_model_len=cfg.max_model_len, max_num_seqs=64, dtype=str(dtype).split(".")[-1],
                                     kv_cache_gib=cfg.kv_cache_gib), seed=cfg.seed + self.rank + 1000 * self.pos.step)
        samples = load_samples(cfg.data, cfg.image_prefix)
        self.shard = samples[self.rank :: self.world]
        self.per_rank = max(1, cfg.prompts_per_step // self.world)
        if cfg.reward_plugin:
            self.reward: Any = PluginReward(cfg.reward_plugin)
        elif cfg.role == "perceiver":
            self.reward = PerceiverReward(cfg)
        else:
            self.reward = ReasonerReward(cfg)
        self.perceiver = PerceiverCache(cfg) if cfg.role == "reasoner" and cfg.perceiver_endpoint else None
        self.metrics_path = cfg.workdir / "metrics.jsonl"
        self.gauges: dict[str, Any] = {}
        if cfg.metrics_port is not None and self.rank == 0:
            from p2r.services.metrics import serve_metrics

            self.metrics_port = serve_metrics(cfg.metrics_port, cfg.metrics_host)

    # ------------------------------------------------------------------------------ prompts

    def requests(self, batch: list[Sample], stats: RewardStats) -> list[ChatRequest]:
        images = [s.load_image() for s in batch]
        if self.cfg.role == "perceiver":
            return [perceiver_request(im, s.question, self.bounds) for s, im in zip(batch, images, strict=True)]
        regions = self.perceiver.get(batch, stats) if self.perceiver else [[] for _ in batch]
        return [reasoner_request(build_evidence(im, r or []), s.question, s.form, self.bounds)
                for s, im, r in zip(batch, images, regions, strict=True)]

    # --------------------------------------------------------------------------------- step

    def step(self, batch: list[Sample]) -> dict[str, Any]:
        cfg = self.cfg
        times: dict[str, float] = {}
        t0 = time.perf_counter()
        prompt_stats = RewardStats()
        requests = self.requests(batch, prompt_stats)
        sampling = Sampling(n=cfg.rollouts_per_prompt, temperature=cfg.temperature, top_p=cfg.top_p,
                            max_tokens=cfg.max_response_tokens)
        rollouts = self.engine.sample(requests, sampling)
        times["rollout_s"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        rewards, stats = self.reward(batch, [[r.text for r in group] for group in rollouts])
        times["reward_s"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        keep = [(g, j) for g, group in enumerate(rewards) for j, r in enumerate(group) if r is not None]
        flat_rewards = torch.tensor([rewards[g][j] for g, j in keep], dtype=torch.float32)
        groups = torch.tensor([g for g, _ in keep], dtype=torch.long)
        advantages = group_advantages(flat_rewards, groups, norm_by_std=cfg.norm_adv_by_std) if keep else flat_rewards
        logps, refs, ents, masks, advs = [], [], [], [], []
        length = max((len(rollouts[g][j].token_ids) for g, j in keep), default=1)
        for g in sorted({g for g, _ in keep}):
            idx = [k for k, (gg, _) in enumerate(keep) if gg == g]
            responses = pad_responses([rollouts[g][keep[k][1]].token_ids for k in idx])
            prompt_ids = rollouts[g][0].prompt_token_ids
            lp, ent = response_logprobs(self.model, self.processor, requests[g], prompt_ids, responses,
                                        with_entropy=True)
            if self.ref is not None:
                with torch.no_grad():
                    ref, _ = response_logprobs(self.ref, self.processor, requests[g], prompt_ids, responses)
                refs.append(_pad(ref, length))
            logps.append(_pad(lp, length))
            ents.append(_pad(ent, length))  # type: ignore[arg-type]
            masks.append(_pad(responses.mask, length))
            advs.append(advantages[idx])
        if logps:
            logp = torch.cat(logps)
            loss = grpo_loss(logp, logp.detach(), torch.cat(refs) if refs else None, torch.cat(advs),
                             torch.cat(masks), torch.cat(ents), kl_coef=cfg.kl_coef, entropy_coef=cfg.entropy_coef,
                             clip_low=cfg.clip_low, clip_high=cfg.clip_high, aggregation=cfg.aggregation)
            total = loss.total
        else:  # every reward dropped: still take part in the gradient all-reduce
            loss, total = None, sum(p.sum() for p in self.model.parameters()) * 0.0
        self.optimiser.zero_grad(set_to_none=False)
        total.backward()
        if self.world > 1:
            for p in self.model.parameters():
                if p.grad is not None:
                    dist.all_reduce(p.grad)
                    p.grad /= self.world
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.max_grad_norm)
        self.optimiser.step()
        self.scheduler.step()
        times["update_s"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        self.engine.push_weights(named_weights(self.model))
        times["sync_s"] = time.perf_counter() - t0
        self.pos.step += 1

        all_rewards = [r for group in rewards for r in group if r is not None]
        lengths = [len(r.token_ids) for group in rollouts for r in group]
        row: dict[str, Any] = {
            "step": self.pos.step, "epoch": self.pos.epoch, "prompts": len(batch),
            "rollouts": sum(len(g) for g in rollouts), "kept": len(keep),
            "dropped": stats.dropped + prompt_stats.dropped, "penalised": stats.penalised,
            "deduplicated": stats.deduplicated, "service_calls": stats.service_calls + prompt_stats.service_calls,
            "reward_mean": float(np.mean(all_rewards)) if all_rewards else None,
            "reward_std": float(np.std(all_rewards)) if all_rewards else None,
            "response_len": float(np.mean(lengths)) if lengths else 0.0,
            "kl": float(loss.kl) if loss else 0.0, "entropy": float(loss.entropy) if loss else 0.0,
            "clip_fraction": float(loss.policy.clip_fraction) if loss else 0.0,
            "loss": float(total.detach()), "grad_norm": float(grad_norm), "lr": self.scheduler.get_last_lr()[0],
            **{k: round(v, 4) for k, v in times.items()},
        }
        for form in {s.form.value for s in batch}:
            vals = [r for s, group in zip(batch, rewards, strict=True) if s.form.value == form
                    for r in group if r is not None]
            row[f"reward_mean_{form}"] = float(np.mean(vals)) if vals else None
        if self.cfg.role == "perceiver":
            from p2r.core.bbox import parse_regions

            row["bbox_count"] = float(np.mean([len(parse_regions(r.text)) for g in rollouts for r in g]))
        if self.perceiver is not None:
            row["perceiver_calls"] = self.perceiver.calls
        row["samples_per_s"] = row["rollouts"] / max(1e-9, sum(times.values()))
        return row

    # --------------------------------------------------------------------------- checkpoints

    def save(self) -> str:
        """Write the checkpoint locally (HF layout + trainer state + manifest) and upload it."""
        name = f"step-{self.pos.step}"
        uri = f"{self.cfg.output.rstrip('/')}/{name}"
        if self.rank == 0:
            local = self.cfg.workdir / "staging" / name
            shutil.rmtree(local, ignore_errors=True)
            self.model.save_pretrained(local)
            self.processor.save_pretrained(local)
            torch.save({
                "optimiser": self.optimiser.state_dict(), "scheduler": self.scheduler.state_dict(),
                "position": vars(self.pos), "torch_rng": torch.get_rng_state(), "python_rng": random.getstate(),
                "numpy_rng": np.random.get_state(), "world_size": self.world,
            }, local / STATE_FILE)
            write_manifest(local, step=self.pos.step, role=self.cfg.role)
            upload_checkpoint(local, uri)
            shutil.rmtree(local, ignore_errors=True)
        if self.world > 1:
            dist.barrier()
        return uri

    def _load_state(self, path: Path) -> None:
        state = torch.load(path, weights_only=False)
        self.optimiser.load_state_dict(state["optimiser"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.pos = Position(**state["position"])
        torch.set_rng_state(state["torch_rng"])
        random.setstate(state["python_rng"])
        np.random.set_state(state["numpy_rng"])

    # ---------------------------------------------------------------------------------- run

    def run(self) -> dict[str, Any]:
        last: dict[str, Any] = {}
        saved = None
        while self.cfg.max_steps is None or self.pos.step < self.cfg.max_steps:
            before = Position(**vars(self.pos))
            batch = next_batch(self.shard, self.per_rank, self.cfg.seed, self.pos, self.cfg.epochs)
            if batch is None:
                self.pos = before
                break
            last = self.step(batch)
            if self.rank == 0:
                with self.metrics_path.open("a") as f:
                    f.write(json.dumps(last) + "\n")
                self.export(last)
                log.info("step %d reward %.3f", last["step"], last["reward_mean"] or 0.0)
            if self.pos.step % self.cfg.save_every == 0:
                saved = self.save()
        if not saved or not saved.endswith(f"step-{self.pos.step}"):
            saved = self.save()
        return {"checkpoint": saved, "steps": self.pos.step, "last": last, "param_digest": self.param_digest()}

    def export(self, row: dict[str, Any]) -> None:
        """Mirror a step's numbers as Prometheus gauges ``p2r_train_<name>`` (rank 0)."""
        from prometheus_client import Gauge

        for key, value in row.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                if key not in self.gauges:
                    self.gauges[key] = Gauge(f"p2r_train_{key}", f"PRA-GRPO step metric {key}")
                self.gauges[key].set(value)

    def param_digest(self) -> str:
        """sha256 over every parameter: equal on all ranks when gradients were reduced right."""
        digest = hashlib.sha256()
        for name, p in sorted(self.model.named_parameters()):
            digest.update(name.encode())
            digest.update(p.detach().float().cpu().numpy().tobytes())
        return digest.hexdigest()


def _pad(t: torch.Tensor, length: int) -> torch.Tensor:
    return torch.nn.functional.pad(t, (0, length - t.shape[1]))

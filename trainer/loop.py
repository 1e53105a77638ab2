"""One PRA-GRPO stage: rollouts on a colocated vLLM engine, role rewards from live services,
group-normalised advantages, the clipped policy loss with low_var_kl, an optimiser step, and the
new weights pushed into the engine in place. Resumable from the newest complete checkpoint.

Distributed: ``torch.distributed`` from the standard env (``MASTER_ADDR``, ``MASTER_PORT``,
``WORLD_SIZE``, ``RANK`` - what the PyTorchJob operator sets); each rank owns a strided shard of
the data and its own rollout engine; the policy is an FSDP2-sharded ``Actor`` (trainer/actor.py:
micro-batched update, step-global loss normalisation, gloo on CPU, NCCL on GPU). One optimiser
step per batch (the reference configuration), so the behaviour policy is the current one: old
log-probs are the detached current ones.

A checkpoint is the full Hugging Face model (gathered to rank 0, in the compute dtype: what the
services load), ``train_state/`` (fp32 model and AdamW shards through torch.distributed.checkpoint,
each rank uploading its own files, so ``--resume auto`` works on another world size too; read
back through trainer/dcp_reader.py),
``trainer_state.json`` (position, scheduler, RNG: JSON, never a pickle - trainer/state.py) and
the manifest over all of them, written last. A resume drops ``metrics.jsonl`` rows past its step.
"""

from __future__ import annotations

import json
import logging
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
from p2r.data.dataset import DataError, Sample, load_samples
from p2r.services.checkpoints import (
    MANIFEST,
    TRAIN_STATE_DIR,
    latest_checkpoint,
    put_files,
    resolve_checkpoint,
    resolve_latest,
    sha256_file,
    write_manifest,
)
from p2r.services.engine import EngineLimits
from p2r.trainer.actor import Actor, PromptGroup, compute_dtype, init_distributed
from p2r.trainer.config import TrainConfig
from p2r.trainer.dcp_reader import check_train_state
from p2r.trainer.failures import JobWatch
from p2r.trainer.grpo import group_advantages
from p2r.trainer.lengths import counter_for, filter_overlong
from p2r.trainer.rewards import PerceiverCache, PerceiverReward, PluginReward, ReasonerReward, RewardStats
from p2r.trainer.rollout import RolloutEngine, RolloutTopology
from p2r.trainer.state import (
    METRICS,
    PositionState,
    TrainerState,
    append_metrics,
    capture_rng,
    read_state,
    restore_rng,
    trim_metrics,
    write_state,
)
from p2r.trainer.validation import dump_rollouts, validate

log = logging.getLogger("p2r.train")


@dataclass
class Position:
    """Where the data iterator is: epoch, and offset into that epoch's shuffled shard."""

    step: int = 0
    epoch: int = 0
    offset: int = 0


def rollout_limits(cfg: TrainConfig, dtype: torch.dtype) -> EngineLimits:
    """The colocated engine's arguments from the training config (GPU-only ones are dropped by
    ``engine_kwargs`` on CPU; sleep mode only where CUDA is)."""
    return EngineLimits(max_model_len=cfg.max_model_len, max_num_seqs=cfg.max_num_seqs,
                        dtype=str(dtype).split(".")[-1], kv_cache_gib=cfg.kv_cache_gib,
                        gpu_memory_utilization=cfg.gpu_memory_utilization,
                        tensor_parallel_size=cfg.rollout_tensor_parallel_size, enforce_eager=cfg.enforce_eager,
                        enable_sleep_mode=cfg.enable_sleep_mode and torch.cuda.is_available())


def even_shard(samples: list[Sample], rank: int, world: int) -> list[Sample]:
    """Rank ``rank``'s strided share of ``samples``, every share the same length: the list is
    padded by wrapping around (as ``DistributedSampler`` does), so every rank runs out at the same
    step. With shares one sample apart, one rank would take an extra step and enter the
    update's collectives while the others enter the checkpoint's, and hang until the timeout."""
    if not samples:
        return []
    total = -(-len(samples) // world) * world
    padded = [samples[i % len(samples)] for i in range(total)]
    return padded[rank::world]


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


def _collective_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def agree(value: int, what: str) -> None:
    """Every rank must hold the same ``value`` (a collective); a difference is an error on every
    rank now, instead of ranks taking different numbers of steps and hanging in a collective."""
    t = torch.tensor([value, -value], dtype=torch.int64)
    t = t.to(_collective_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    high, low = int(t[0]), -int(t[1])
    if high != low:
        raise RuntimeError(f"ranks disagree on {what}: from {low} to {high} (this rank: {value})")


class Trainer:
    def __init__(self, cfg: TrainConfig, resume: str | None = None) -> None:
        self.cfg = cfg
        self.rank, self.world = init_distributed()
        self.watch = JobWatch(self.rank, self.world, cfg.step_timeout_s, cfg.checkpoint_timeout_s)
        try:
            with self.watch.phase("checkpoint"):  # start-up: downloads, engine start, data filter
                self._start(resume)
        except BaseException as e:
            self.watch.fail(e)
            raise

    def _start(self, resume: str | None) -> None:
        cfg = self.cfg
        self.topology = RolloutTopology(self.rank, self.world, cfg.rollout_tensor_parallel_size)
        self.bounds = PixelBounds(MIN_PIXELS, cfg.max_pixels)
        cfg.workdir.mkdir(parents=True, exist_ok=True)
        self.cache_dir = cfg.workdir / "cache"
        resume_uri = latest_checkpoint(cfg.output) if resume == "auto" else resume
        model_uri = resolve_latest(cfg.model)  # stage 2 names the stage-1 root as latest:ROOT
        if model_uri != cfg.model:
            log.info("model %s is %s", cfg.model, model_uri)
        # The base model is read as a model only: a stage-1 checkpoint's train_state/ (the fp32
        # model and AdamW shards, ~12x the model) is neither downloaded nor hashed; a resume
        # reads its own.
        base = resolve_checkpoint(model_uri, self.cache_dir / f"rank{self.rank}")
        start = resolve_checkpoint(resume_uri, self.cache_dir / f"rank{self.rank}", with_train_state=True) \
            if resume_uri else base
        # The engine starts before the actor takes GPU memory (vLLM sizes its share from what
        # is free), then sleeps until the first rollout.
        self.engine_dtype = compute_dtype(cfg.compute_dtype)
        # Read (and refuse, if tampered) the resume state before any engine starts.
        state = read_state(start) if resume_uri else None
        if state is not None:
            check_train_state(start / TRAIN_STATE_DIR)
        resumed_step = state.position.step if state else 0
        # One seed per engine: the ranks of a TP group sample together, the groups differ.
        seed = cfg.seed + self.topology.dp_rank + 1000 * resumed_step
        self.engine = RolloutEngine(str(start), self.topology, rollout_limits(cfg, self.engine_dtype), seed=seed,
                                    sleep_level=cfg.sleep_level)
        self.engine.sleep()
        self.actor = Actor(cfg, start, base)
        self.pos = Position()
        if state is not None:
            self._load_state(start, state)
            log.info("resumed from %s at step %d", resume_uri, self.pos.step)
        # The engine samples from the process's torch generator: it must be the same on the
        # ranks of a TP group (else they sample different tokens into one sharded forward) and
        # differ between engines - also after a resume, which restored rank 0's saved state on
        # every rank.
        torch.manual_seed(seed)
        random.seed(seed)
        self.actor.offload()
        self.engine.wake_weights()
        self.engine.wake_kv_cache()
        self.counter = counter_for(self.engine.llm.get_tokenizer(), self.actor.processor)
        lengths = filter_overlong(load_samples(cfg.data, cfg.image_prefix), self.counter, cfg.role, self.bounds,
                                  cfg.max_prompt_tokens)
        if not lengths.kept:
            raise DataError(f"{cfg.data}: no sample fits max_prompt_tokens {cfg.max_prompt_tokens} "
                             f"({lengths.dropped} over it, {lengths.unreadable} unreadable)")
        self.overlong_dropped, self.unreadable_dropped = lengths.dropped, lengths.unreadable
        self.overlong_fallbacks = 0
        samples = lengths.kept
        # Every rank filtered the same file the same way; if not (a file unreadable on one node
        # only), the shards would differ in length, so that is an error on every rank now.
        agree(len(samples), "the number of usable training samples")
        # Data is sharded over the engines (TP groups); every shard has the same length, so
        # every rank takes the same number of steps (even_shard).
        self.shard = even_shard(samples, self.topology.dp_rank, self.topology.dp)
        self.per_rank = max(1, cfg.prompts_per_step // self.world)
        self.per_engine = self.per_rank * self.topology.tp
        if cfg.reward_plugin:
            self.reward: Any = PluginReward(cfg.reward_plugin)
        elif cfg.role == "perceiver":
            self.reward = PerceiverReward(cfg)
        else:
            self.reward = ReasonerReward(cfg)
        self.perceiver = PerceiverCache(cfg) if cfg.role == "reasoner" and cfg.perceiver_endpoint else None
        self.val_perceiver = PerceiverCache(cfg) if self.perceiver is not None else None
        self.val_samples: list[Sample] = []
        if cfg.val_data is not None:
            self.val_samples = filter_overlong(load_samples(cfg.val_data, cfg.image_prefix), self.counter, cfg.role,
                                               self.bounds, cfg.max_prompt_tokens).kept
        self.metrics_path = cfg.workdir / METRICS
        if state is not None and self.rank == 0:
            dropped = trim_metrics(self.metrics_path, self.pos.step)
            if dropped:
                log.info("metrics.jsonl: %d rows past step %d dropped (written again now)", dropped, self.pos.step)
        self.gauges: dict[str, Any] = {}
        if cfg.metrics_port is not None and self.rank == 0:
            from p2r.services.metrics import serve_metrics

            self.metrics_port = serve_metrics(cfg.metrics_port, cfg.metrics_host)

    # ------------------------------------------------------------------------------ prompts

    def requests(self, batch: list[Sample], stats: RewardStats) -> list[ChatRequest]:
        """The policy's prompts, in its own layout (``policy=True``): the perceiver prompt; the
        reasoner prompt on the frozen perceiver's evidence; for the ``baseline`` role (plain
        GRPO) the original image with the no-evidence reasoner prompt."""
        images = [s.load_image() for s in batch]
        if self.cfg.role == "perceiver":
            return [perceiver_request(im, s.question, self.bounds, policy=True)
                    for s, im in zip(batch, images, strict=True)]
        regions = self.perceiver.get(batch, stats) if self.perceiver else [[] for _ in batch]
        out = []
        for s, im, r in zip(batch, images, regions, strict=True):
            request = reasoner_request(build_evidence(im, r or []), s.question, s.form, self.bounds, policy=True)
            if r and self.counter.request_tokens(request) > self.cfg.max_prompt_tokens:
                # Evidence made it too long: the no-evidence prompt, which the load filter checked.
                self.overlong_fallbacks += 1
                request = reasoner_request(build_evidence(im, []), s.question, s.form, self.bounds, policy=True)
            out.append(request)
        return out

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
        # The ranks of a TP group sampled the same prompts on their shared engine; each keeps
        # its own share for the reward and the update.
        tp, tp_rank = self.topology.tp, self.topology.tp_rank
        if tp > 1:
            batch, requests, rollouts = batch[tp_rank::tp], requests[tp_rank::tp], rollouts[tp_rank::tp]

        t0 = time.perf_counter()
        rewards, stats = self.reward(batch, [[r.text for r in group] for group in rollouts])
        times["reward_s"] = time.perf_counter() - t0
        if cfg.dump_rollouts_every and (self.pos.step + 1) % cfg.dump_rollouts_every == 0:
            dump_rollouts(cfg.workdir / "rollouts" / f"step-{self.pos.step + 1}.rank{self.rank}.jsonl",
                          self.pos.step + 1, batch, rollouts, rewards, cfg.role)

        t0 = time.perf_counter()
        self.engine.sleep()
        self.actor.onload()
        keep = [(g, j) for g, group in enumerate(rewards) for j, r in enumerate(group) if r is not None]
        flat_rewards = torch.tensor([rewards[g][j] for g, j in keep], dtype=torch.float32)
        group_ids = torch.tensor([g for g, _ in keep], dtype=torch.long)
        advantages = group_advantages(flat_rewards, group_ids, norm_by_std=cfg.norm_adv_by_std) if keep \
            else flat_rewards
        groups = [PromptGroup(requests[g], list(rollouts[g][0].prompt_token_ids), [], [], rollout_logprobs=[])
                  for g in range(len(rollouts))]
        for k, (g, j) in enumerate(keep):
            groups[g].responses.append(list(rollouts[g][j].token_ids))
            groups[g].advantages.append(float(advantages[k]))
            groups[g].rollout_logprobs.append(list(rollouts[g][j].logprobs))  # type: ignore[union-attr]
        update = self.actor.update(groups)
        times["update_s"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        push: dict[str, float] = {}
        self.engine.wake_weights()
        self.engine.push_weights(self.actor.stream_weights(self.engine_dtype, push))
        self.actor.offload()
        self.engine.wake_kv_cache()
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
            "kl": update.kl, "entropy": update.entropy, "clip_fraction": update.clip_fraction,
            "clip_fraction_lower": update.clip_fraction_lower, "loss": update.loss,
            "grad_norm": update.grad_norm if update.grad_norm == update.grad_norm else None,
            "skipped_steps": self.actor.skipped_steps, "overlong_dropped": self.overlong_dropped,
            "unreadable_dropped": self.unreadable_dropped, "overlong_fallbacks": self.overlong_fallbacks,
            "micro_batches": update.micro_batches,
            # The engine's log-probs against the policy's on the same tokens (veRL's parity check):
            # near 0 when the engine holds the pushed weights and samples what the update assumes.
            "rollout_logprob_diff_mean": update.rollout_logprob_diff_mean,
            "rollout_logprob_diff_max": update.rollout_logprob_diff_max,
            "lr": self.actor.scheduler.get_last_lr()[0], "push_bytes": push.get("push_bytes", 0.0),
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
        """Write the checkpoint (module docstring) and upload it; a collective.

        Each rank stages and uploads its own ``train_state/`` shards; rank 0 gathers every file's
        digest, uploads the HF model and the trainer state, and writes the manifest last."""
        with self.watch.phase("checkpoint"):
            return self._save()

    def _save(self) -> str:
        name = f"step-{self.pos.step}"
        uri = f"{self.cfg.output.rstrip('/')}/{name}"
        local = self.cfg.workdir / "staging" / f"rank{self.rank}" / name
        shutil.rmtree(local, ignore_errors=True)
        local.mkdir(parents=True)
        full = self.actor.full_state_dict()
        self.actor.save_train_state(local / TRAIN_STATE_DIR)
        shards = sorted(str(p.relative_to(local)) for p in (local / TRAIN_STATE_DIR).iterdir() if p.is_file())
        put_files(local, shards, uri)
        digests = {n: sha256_file(local / n) for n in shards}
        gathered: list[dict[str, str] | None] = [None] * self.world
        dist.all_gather_object(gathered, digests)
        if self.rank == 0:
            self.actor.model.save_pretrained(local, state_dict=full)
            self.actor.processor.save_pretrained(local)
            write_state(local, TrainerState(
                scheduler=self.actor.scheduler.state_dict(), position=PositionState(**vars(self.pos)),
                rng=capture_rng(), world_size=self.world, skipped_steps=self.actor.skipped_steps,
                overlong_dropped=self.overlong_dropped, unreadable_dropped=self.unreadable_dropped,
                overlong_fallbacks=self.overlong_fallbacks))
            remote = {k: v for d in gathered if d for k, v in d.items()}  # rank 0's own included
            write_manifest(local, extra_files=remote, step=self.pos.step, role=self.cfg.role)
            listed = json.loads((local / MANIFEST).read_text())["files"]
            put_files(local, [n for n in listed if n not in remote] + [MANIFEST], uri)
        shutil.rmtree(local, ignore_errors=True)
        dist.barrier()
        return uri

    def _load_state(self, checkpoint: Path, state: TrainerState) -> None:
        """Continue from ``checkpoint``: its train-state shards and its ``trainer_state.json``."""
        self.actor.load_train_state(checkpoint / TRAIN_STATE_DIR)
        self.actor.scheduler.load_state_dict(state.scheduler.state_dict())
        self.actor.skipped_steps = state.skipped_steps
        self.pos = Position(**state.position.model_dump())
        restore_rng(state.rng)

    # ---------------------------------------------------------------------------------- run

    def run(self) -> dict[str, Any]:
        """Train to ``max_steps`` or the end of the last epoch, validating and saving on the way
        and at the end. An exception on any rank stops every rank (trainer/failures.py)."""
        try:
            result = self._run()
        except BaseException as e:
            self.watch.fail(e)
            raise
        self.watch.stop()
        return result

    def _run(self) -> dict[str, Any]:
        last: dict[str, Any] = {}
        saved = None
        validated = None
        if self.val_samples and self.cfg.val_before_train and self.pos.step == 0:
            validated = self.validate()
        while self.cfg.max_steps is None or self.pos.step < self.cfg.max_steps:
            before = Position(**vars(self.pos))
            batch = next_batch(self.shard, self.per_engine, self.cfg.seed, self.pos, self.cfg.epochs)
            agree(int(batch is not None), "whether the data has another batch")
            if batch is None:
                self.pos = before
                break
            with self.watch.phase("step"):
                last = self.step(batch)
            if self.rank == 0:
                append_metrics(self.metrics_path, last)
                self.export(last)
                log.info("step %d reward %.3f", last["step"], last["reward_mean"] or 0.0)
            if self.val_samples and self.pos.step % self.cfg.val_every == 0:
                validated = self.validate()
            if self.pos.step % self.cfg.save_every == 0:
                saved = self.save()
        # The last step is validated too (as veRL does), once.
        if self.val_samples and (validated is None or validated["step"] != self.pos.step):
            self.validate()
        if not saved or not saved.endswith(f"step-{self.pos.step}"):
            saved = self.save()
        # The last collective: from here ranks leave one by one (a silent store is no failure).
        self.watch.finish()
        return {"checkpoint": saved, "steps": self.pos.step, "last": last, "param_digest": self.param_digest()}

    def validate(self) -> dict[str, Any]:
        """Validation at the current step (module trainer/validation.py); rank 0 records it."""
        started = time.perf_counter()
        with self.watch.phase("checkpoint"):  # a whole validation set: long, like a checkpoint
            result = validate(self.val_samples, self.val_requests, self.engine, self.reward,
                              self.cfg.max_response_tokens, self.topology, self.cfg.val_batch_size)
        row = {"step": self.pos.step, **result, "val/seconds": round(time.perf_counter() - started, 3)}
        if self.rank == 0:
            append_metrics(self.metrics_path, row)
            self.export_validation(row)
            log.info("validation at step %d: accuracy %s over %s samples", self.pos.step, row["val/accuracy"],
                     row["val/samples"])
        return row

    def val_requests(self, batch: list[Sample], stats: RewardStats) -> list[ChatRequest]:
        """Validation prompts: as training's, with the validation set's own perceiver cache."""
        cache, self.perceiver = self.perceiver, self.val_perceiver
        try:
            return self.requests(batch, stats)
        finally:
            self.perceiver = cache

    def export_validation(self, row: dict[str, Any]) -> None:
        from prometheus_client import Gauge

        if "val" not in self.gauges:
            self.gauges["val"] = Gauge("p2r_train_val_accuracy", "Validation accuracy (greedy, the role's reward)",
                                       ["group", "name"])
        for key, value in row.items():
            if key.startswith("val/accuracy") and value is not None:
                parts = key.split("/")
                group, name = (parts[2], parts[3]) if len(parts) == 4 else ("all", "all")
                self.gauges["val"].labels(group, name).set(value)

    def export(self, row: dict[str, Any]) -> None:
        """Mirror a step's numbers as Prometheus gauges ``p2r_train_<name>`` (rank 0)."""
        from prometheus_client import Gauge

        for key, value in row.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                if key not in self.gauges:
                    self.gauges[key] = Gauge(f"p2r_train_{key}", f"PRA-GRPO step metric {key}")
                self.gauges[key].set(value)

    def param_digest(self) -> str:
        return self.actor.param_digest()

"""The trained policy of a PRA-GRPO stage, sharded with FSDP2: the update, the weights it streams
into the rollout engine, and its checkpoint.

Why this shape (veRL's FSDP actor, PyTorch's FSDP2):
- ``fully_shard`` one unit per decoder layer and per vision block, root last. Parameters and the
  AdamW state are fp32 shards (master weights: at lr 1e-6 a bf16 weight would mostly not move),
  computed in ``compute_dtype`` (bf16 on GPU; ``MixedPrecisionPolicy(param_dtype=bf16,
  reduce_dtype=fp32)``). FSDP reduce-scatters the gradients; nothing here all-reduces by hand.
- The same code runs at world size 1 (a one-process group over an in-process store), so one
  rank and four ranks differ only in how the shards are cut.
- The update is a loop over micro-batches: responses of one prompt, at most ``micro_batch_size``
  of them and at most ``max_tokens_per_micro_batch`` tokens (responses x (prompt + longest
  response): veRL's dynamic batch size), so memory does not grow with the step's batch. Each
  micro-batch's loss is its share of the step's loss under the step's global denominators
  (``LossNorm``: tokens and responses summed over every micro-batch of every rank), so the update
  is the same for any world size and any micro-batching. Every rank runs the same number of
  forward / backward passes (FSDP's collectives must pair up); a rank with fewer micro-batches
  runs zero-weight repeats.
- A step whose loss or gradient norm is not finite is skipped (counted), never applied: NaN
  weights would otherwise go into the engine and every later step.
- The reference model is sharded the same way, forward only, optionally offloaded to CPU.

Collectives of a step (``SCHEDULE_STEP``, the default; ``trainer/plan.py`` counts their bytes):
- The reference model is gathered once per step: all its log-probs are computed first, in one
  pass over the step's micro-batches (``reshard_after_forward=False``, then an explicit reshard),
  before the policy's pass, so the full reference and the full policy are never on the device
  at the same time. Its log-probs (a float per response token) are what is kept.
- Gradients are reduce-scattered once per step: ``set_requires_gradient_sync(False)`` for every
  micro-batch but the last (FSDP2 then accumulates unsharded fp32 gradients, the price of not
  communicating), True for the last.
- The policy is gathered once per step: ``reshard_after_forward=False`` (the backward reuses
  what the forward gathered instead of gathering every unit again) and
  ``set_reshard_after_backward(False)`` until the last micro-batch (the next forward reuses it
  too, FSDP2's documented trade for gradient accumulation). Peak memory is the same as gathering
  per micro-batch without reshard-after-forward: the whole compute-dtype model is held at the end
  of every forward anyway, next to the unsharded gradients that skipping the sync already keeps.
  Resharding after the forward would gather every unit twice per micro-batch to save that one
  model copy; at the reference shapes that is ~0.85 TB per rank per step over NVLink.
- The weight push and the HF export gather one tensor at a time in the engine's / compute dtype
  (the local shard cast before the gather: half the bytes of an fp32 gather), ``gathered()``.
``SCHEDULE_MICRO_BATCH`` is the previous schedule (reshard after forward, a reduce-scatter and a
reference gather per micro-batch), kept for the benchmark and the equivalence tests.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist

from p2r.core.generation import ChatRequest
from p2r.services.engine import tied_embedding_key
from p2r.trainer.config import TrainConfig
from p2r.trainer.grpo import LossNorm, grpo_loss
from p2r.trainer.policy import pad_responses, response_logprobs, vision_inputs

log = logging.getLogger("p2r.train")
Schedule = Literal["step", "micro-batch"]
SCHEDULE_STEP: Schedule = "step"  # one gather of each model and one reduce-scatter per step
SCHEDULE_MICRO_BATCH: Schedule = "micro-batch"  # the old schedule: all of them per micro-batch


@dataclass
class PromptGroup:
    """One prompt of the step and the responses kept for the update (possibly none)."""

    request: ChatRequest
    prompt_ids: list[int]
    responses: list[list[int]]
    advantages: list[float]
    # The behaviour policy's per-token log-probs (e.g. the engine's); None: the current policy's,
    # detached (one optimiser step per batch: ratio 1, as the reference runs).
    old_logprobs: list[list[float]] | None = None
    # The engine's per-token log-probs of each response (``Rollout.logprobs``), for the
    # rollout / policy parity metric only (``UpdateStats.rollout_logprob_diff_*``); None: not known.
    rollout_logprobs: list[list[float]] | None = None


@dataclass
class UpdateStats:
    """One update's numbers, already reduced over every rank (equal on all of them)."""

    loss: float = 0.0
    kl: float = 0.0
    entropy: float = 0.0
    clip_fraction: float = 0.0
    clip_fraction_lower: float = 0.0
    grad_norm: float = 0.0
    skipped: bool = False
    micro_batches: int = 0
    tokens: int = 0
    # |engine log-prob - training policy log-prob| over the response tokens of every rank whose
    # groups carry ``rollout_logprobs`` (veRL's rollout_probs_diff): mean and max. None: no group had them.
    rollout_logprob_diff_mean: float | None = None
    rollout_logprob_diff_max: float | None = None


def init_distributed() -> tuple[int, int]:
    """The process group from the standard env (what the PyTorchJob operator and torchrun set);
    a one-process group over an in-process store when there is none, so FSDP runs the same way."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if world == 1:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
        else:
            dist.init_process_group(backend=backend, rank=rank, world_size=world, timeout=timedelta(minutes=60))
    return rank, world


def compute_dtype(name: str) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return {"bfloat16": torch.bfloat16, "float32": torch.float32}[name]


def _decoder_units(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The decoder layers and vision blocks: one FSDP unit each (HF's ``_no_split_modules``)."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    units = [m for m in model.modules() if type(m).__name__ in names]
    if not units:
        raise ValueError(f"{type(model).__name__}: no decoder layers found to shard ({sorted(names)})")
    return units


def shard(model: torch.nn.Module, param_dtype: torch.dtype | None, reshard: bool = True,
          offload: bool = False) -> torch.nn.Module:
    """``fully_shard`` each decoder layer / vision block, then the root."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    device = "cuda" if torch.cuda.is_available() else "cpu"
    mesh = init_device_mesh(device, (dist.get_world_size(),))
    kwargs: dict[str, Any] = {"mesh": mesh, "reshard_after_forward": reshard}
    if param_dtype is not None and param_dtype != torch.float32:
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    if offload:
        kwargs["offload_policy"] = CPUOffloadPolicy()
    for unit in _decoder_units(model):
        fully_shard(unit, **kwargs)
    fully_shard(model, **kwargs)
    return model


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """A shard's full value (a collective: every rank calls it in the same order)."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def gathered(model: torch.nn.Module, dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    """Every entry of ``model``'s state dict, full, in ``dtype``, one tensor at a time: each rank's
    shard is cast first and the cast shards are gathered (a bf16 gather moves half the bytes of
    an fp32 one). A collective: every rank iterates it to the end, in the same order."""
    state = model.state_dict()
    # A tied head listed under its own name is the embedding again: gathered once, its full copy
    # kept until the head's turn. Decided from the names alone, so every rank skips the same gather.
    embed = head = None
    if getattr(getattr(model, "config", None), "tie_word_embeddings", False) and "lm_head.weight" in state:
        embed, head = tied_embedding_key(state), "lm_head.weight"
    kept: torch.Tensor | None = None
    for name, t in state.items():
        if name == head and kept is not None:
            full, kept = kept, None
        else:
            full = full_tensor(t.detach().to(dtype))
            if name == embed:
                kept = full
        yield name, full
        del full


def _reshard(model: torch.nn.Module) -> None:
    """Free every gathered FSDP unit of ``model`` (``FSDPModule.reshard`` is not recursive)."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def micro_batches(groups: list[PromptGroup], max_responses: int, max_tokens: int | None) -> list[tuple[int, slice]]:
    """The micro-batches of ``groups``: consecutive responses of one prompt, at most
    ``max_responses`` of them, packed while responses x (prompt + longest response) - the tokens
    the forward pass really runs, padding included - stays within ``max_tokens`` (veRL's dynamic
    batch size); a response over the budget on its own still goes, alone."""
    out: list[tuple[int, slice]] = []
    for g, group in enumerate(groups):
        prompt, n, start = len(group.prompt_ids), len(group.responses), 0
        while start < n:
            stop, longest = start + 1, max(1, len(group.responses[start]))
            while stop < n and stop - start < max_responses:
                wider = max(longest, len(group.responses[stop]))
                if max_tokens is not None and (stop - start + 1) * (prompt + wider) > max_tokens:
                    break
                stop, longest = stop + 1, wider
            out.append((g, slice(start, stop)))
            start = stop
    return out


@dataclass
class _Micro:
    """One forward / backward of the update: a slice of one group's responses, or a zero-weight
    stand-in on a rank that has run out of micro-batches."""

    group: int
    responses: list[list[int]]
    advantages: list[float]
    old: list[list[float]] | None
    rollout: list[list[float]] | None
    weight: float


class Actor:
    """The policy (and reference) of one rank, sharded over the process group."""

    def __init__(self, cfg: TrainConfig, start: Path, base: Path, schedule: Schedule = SCHEDULE_STEP) -> None:
        from transformers import AutoProcessor, Qwen3VLForConditionalGeneration

        if schedule not in (SCHEDULE_STEP, SCHEDULE_MICRO_BATCH):
            raise ValueError(f"unknown update schedule {schedule!r}")
        self.cfg = cfg
        self.schedule = schedule
        per_micro_batch = schedule == SCHEDULE_MICRO_BATCH
        self.rank, self.world = init_distributed()
        self.dtype = compute_dtype(cfg.compute_dtype)
        self.processor = AutoProcessor.from_pretrained(base)
        attention: dict[str, Any] = {}
        if torch.cuda.is_available():
            import importlib.util

            if importlib.util.find_spec("flash_attn") is not None:
                attention = {"attn_implementation": "flash_attention_2"}
        # fp32 master weights whatever the compute dtype.
        self.model = Qwen3VLForConditionalGeneration.from_pretrained(start, dtype=torch.float32, **attention)
        self.tied = bool(getattr(self.model.config, "tie_word_embeddings", False))
        if cfg.gradient_checkpointing:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.model.config.use_cache = False
        self.model.train()
        shard(self.model, self.dtype, reshard=per_micro_batch)
        self.ref: torch.nn.Module | None = None
        if cfg.kl_coef > 0:
            ref = Qwen3VLForConditionalGeneration.from_pretrained(base, dtype=self.dtype, **attention).eval()
            ref.requires_grad_(False)
            self.ref = shard(ref, None, reshard=per_micro_batch, offload=cfg.ref_cpu_offload)
        self.optimiser = torch.optim.AdamW(self.model.parameters(), lr=cfg.learning_rate,
                                           weight_decay=cfg.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimiser, lambda _: 1.0)
        self.skipped_steps = 0

    # ---------------------------------------------------------------------------- update

    def _all_reduce(self, values: list[float], op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device="cuda" if torch.cuda.is_available() else "cpu")
        dist.all_reduce(t, op=op)
        return t.tolist()

    def _micro_batches(self, groups: list[PromptGroup]) -> list[tuple[int, slice]]:
        return micro_batches(groups, self.cfg.micro_batch_size, self.cfg.max_tokens_per_micro_batch)

    def _plan(self, groups: list[PromptGroup], micro: list[tuple[int, slice]], steps: int) -> list[_Micro]:
        """``steps`` forward / backward passes: this rank's micro-batches, then zero-weight
        stand-ins (one response of a real group: an idle rank still takes part in every
        collective, contributing nothing)."""
        plan = []
        for i in range(steps):
            if i < len(micro):
                g, part = micro[i]
                group = groups[g]
                plan.append(_Micro(g, group.responses[part], group.advantages[part],
                                   group.old_logprobs[part] if group.old_logprobs is not None else None,
                                   group.rollout_logprobs[part] if group.rollout_logprobs is not None else None, 1.0))
            else:
                g = micro[0][0] if micro else 0
                group = groups[g]
                responses = group.responses[:1] or [[group.prompt_ids[-1]]]
                plan.append(_Micro(g, responses, [0.0] * len(responses), None, None, 0.0))
        return plan

    def _ref_logprobs(self, group: PromptGroup, batch: Any, vision: dict[str, torch.Tensor]) -> torch.Tensor:
        assert self.ref is not None
        with torch.no_grad():
            ref, _ = response_logprobs(self.ref, self.processor, group.request, group.prompt_ids, batch,
                                       vision=vision, temperature=self.cfg.temperature)
        return ref

    def _reference_pass(self, groups: list[PromptGroup], plan: list[_Micro],
                        vision: dict[int, dict[str, torch.Tensor]]) -> list[torch.Tensor | None]:
        """The reference's log-probs of every weighted micro-batch, the reference gathered once
        (its units stay gathered across these forwards, ``reshard_after_forward=False``) and freed
        before the policy's pass. A rank with only stand-ins still runs one forward, so that
        every rank gathers every unit exactly once."""
        out: list[torch.Tensor | None] = [None] * len(plan)
        todo = [i for i, m in enumerate(plan) if m.weight] or [0]
        try:
            for i in todo:
                m = plan[i]
                if m.group not in vision:
                    vision[m.group] = vision_inputs(self.processor, groups[m.group].request)
                out[i] = self._ref_logprobs(groups[m.group], pad_responses(m.responses), vision[m.group])
        finally:
            assert self.ref is not None
            _reshard(self.ref)
        return out

    def update(self, groups: list[PromptGroup]) -> UpdateStats:
        """One optimiser step on this rank's groups (a collective: every rank calls it)."""
        cfg = self.cfg
        if not groups:
            raise ValueError("update needs at least one prompt group (its request stands in for a rank "
                             "with nothing to learn from)")
        micro = self._micro_batches(groups)
        tokens, sequences = self._all_reduce([sum(len(r) for g in groups for r in g.responses),
                                              sum(len(g.responses) for g in groups)])
        [steps_f] = self._all_reduce([len(micro)], dist.ReduceOp.MAX)
        steps = int(steps_f)
        norm = LossNorm(max(tokens, 1.0), max(sequences, 1.0), float(cfg.max_response_tokens))
        plan = self._plan(groups, micro, steps)
        vision: dict[int, dict[str, torch.Tensor]] = {}
        per_step = self.schedule == SCHEDULE_STEP
        refs = self._reference_pass(groups, plan, vision) if per_step and self.ref is not None else None
        sums = [0.0] * 7  # loss, kl, entropy, clipped tokens, dual-clipped tokens, |rollout diff|, its tokens
        diff_max = -1.0
        self.optimiser.zero_grad(set_to_none=True)
        for i, m in enumerate(plan):
            if per_step:  # reduce-scatter, and free the gathered policy, after the last backward only
                last = i == steps - 1
                self.model.set_requires_gradient_sync(last)
                self.model.set_reshard_after_backward(last)
            group = groups[m.group]
            if m.group not in vision:
                vision[m.group] = vision_inputs(self.processor, group.request)
            batch = pad_responses(m.responses)
            lp, ent = response_logprobs(self.model, self.processor, group.request, group.prompt_ids, batch,
                                        with_entropy=True, entropy_grad=cfg.entropy_coef > 0, vision=vision[m.group],
                                        temperature=cfg.temperature)
            ref = None
            if refs is not None:
                ref = refs[i]
            elif self.ref is not None:  # the per-micro-batch schedule: every rank, every micro-batch
                ref = self._ref_logprobs(group, batch, vision[m.group])
            if ref is None and self.ref is not None:  # a stand-in's: it weighs nothing
                ref = lp.detach()
            mask = batch.mask.to(lp.device)
            adv = torch.tensor(m.advantages, dtype=torch.float32, device=lp.device)
            old_lp = lp.detach() if m.old is None else _padded(m.old, lp.shape, lp.device)
            loss = grpo_loss(lp, old_lp, ref, adv, mask, ent, kl_coef=cfg.kl_coef,
                             entropy_coef=cfg.entropy_coef, clip_low=cfg.clip_low, clip_high=cfg.clip_high,
                             aggregation=cfg.aggregation, clip_ratio_c=cfg.clip_ratio_c, norm=norm)
            # FSDP averages gradients over ranks; the shares already sum to the step's loss.
            (loss.total * (m.weight * self.world)).backward()
            if m.weight:
                n = float(mask.sum())
                sums[0] += float(loss.total.detach())
                sums[1] += float(loss.kl)
                sums[2] += float(loss.entropy)
                sums[3] += float(loss.policy.clip_fraction) * n
                sums[4] += float(loss.policy.clip_fraction_lower) * n
                if m.rollout is not None:
                    total, count, largest = _rollout_diff(lp.detach(), m.rollout, mask)
                    sums[5] += total
                    sums[6] += count
                    diff_max = max(diff_max, largest)
        loss_sum, kl, entropy, clipped, lower, diff_sum, diff_tokens = self._all_reduce(sums)
        [diff_max] = self._all_reduce([diff_max], dist.ReduceOp.MAX)
        grad_norm = full_tensor(torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.max_grad_norm))
        norm_value = float(grad_norm)
        # A non-finite loss can leave finite gradients (a NaN token's branch gets none): skip too.
        skipped = not (math.isfinite(norm_value) and math.isfinite(loss_sum))
        if skipped:
            self.skipped_steps += 1
            log.warning("step skipped: loss %s, gradient norm %s (skipped so far: %d)", loss_sum, norm_value,
                        self.skipped_steps)
            self.optimiser.zero_grad(set_to_none=True)
        else:
            self.optimiser.step()
        self.scheduler.step()
        self.optimiser.zero_grad(set_to_none=True)
        return UpdateStats(loss=loss_sum, kl=kl, entropy=entropy, clip_fraction=clipped / max(tokens, 1.0),
                           clip_fraction_lower=lower / max(tokens, 1.0), grad_norm=norm_value, skipped=skipped,
                           micro_batches=steps, tokens=int(tokens),
                           rollout_logprob_diff_mean=diff_sum / diff_tokens if diff_tokens else None,
                           rollout_logprob_diff_max=diff_max if diff_tokens else None)

    # ------------------------------------------------------------------ offload (GPU only)

    def offload(self) -> None:
        """Move the policy's (and reference's) shards and the AdamW state to host memory while
        the rollout engine is awake, so it can take its ``gpu_memory_utilization`` (veRL's
        param / optimiser offload). No-op on CPU or when ``actor_offload`` is off."""
        if not (self.cfg.actor_offload and torch.cuda.is_available()):
            return
        self._move("cpu")
        torch.cuda.empty_cache()

    def onload(self) -> None:
        """Bring everything ``offload`` moved back onto this rank's GPU for the update."""
        if self.cfg.actor_offload and torch.cuda.is_available():
            self._move(f"cuda:{torch.cuda.current_device()}")

    @torch.no_grad()
    def _move(self, device: str) -> None:
        self.model.to(device)
        if self.ref is not None and not self.cfg.ref_cpu_offload:
            self.ref.to(device)
        for state in self.optimiser.state.values():
            for key, value in state.items():
                if isinstance(value, torch.Tensor) and key != "step":
                    state[key] = value.to(device, non_blocking=True)
        if device != "cpu":
            torch.cuda.synchronize()

    # --------------------------------------------------------------------------- weights

    def stream_weights(self, dtype: torch.dtype, stats: dict[str, float] | None = None
                       ) -> Iterator[tuple[str, torch.Tensor]]:
        """Every weight under its checkpoint name, gathered one tensor at a time (never a second
        full copy of the model) in the engine's ``dtype`` (each shard cast before the gather);
        the tied head is sent too (an in-place reload without it keeps the old head). A
        collective: every rank iterates it."""
        started = time.perf_counter()
        total = 0
        state = self.model.state_dict()
        # The tied head, when the state dict does not list it, is the embedding sent again.
        embed_key = tied_embedding_key(state) if self.tied and "lm_head.weight" not in state else None
        embed: torch.Tensor | None = None
        for name, full in gathered(self.model, dtype):
            total += full.numel() * full.element_size()
            if name == embed_key:
                embed = full
            yield name, full
        if embed is not None:
            total += embed.numel() * embed.element_size()
            yield "lm_head.weight", embed
        if stats is not None:
            stats["push_bytes"] = float(total)
            stats["gather_s"] = time.perf_counter() - started

    # ------------------------------------------------------------------------ checkpoints

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The full model on rank 0 (CPU, compute dtype), empty elsewhere: a collective. Gathered
        one tensor at a time in the compute dtype (``gathered``); only rank 0 keeps each, so the
        host holds one compute-dtype model on rank 0 and nothing on the others (not an fp32 model
        on every rank and a cast copy on rank 0)."""
        out: dict[str, torch.Tensor] = {}
        for name, full in gathered(self.model, self.dtype):
            if self.rank == 0:
                out[name] = full.to("cpu", copy=True)
            del full
        return out

    def save_train_state(self, directory: Path) -> None:
        """fp32 model and optimiser shards through ``torch.distributed.checkpoint`` (each rank
        writes its own files; loadable at any world size)."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_sd, optim_sd = get_state_dict(self.model, self.optimiser)
        dcp.save({"model": model_sd, "optimiser": optim_sd}, checkpoint_id=str(directory))

    def load_train_state(self, directory: Path) -> None:
        """The shards ``save_train_state`` wrote (at any world size), read without unpickling
        anything the files name and without reading outside ``directory``
        (trainer/dcp_reader.py); a bad shard is a CheckpointError naming the file."""
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        from p2r.trainer.dcp_reader import load_train_state

        model_sd, optim_sd = get_state_dict(self.model, self.optimiser)
        state = {"model": model_sd, "optimiser": optim_sd}
        load_train_state(state, directory)
        set_state_dict(self.model, self.optimiser, model_state_dict=state["model"],
                       optim_state_dict=state["optimiser"])

    def param_digest(self) -> str:
        """``params_digest`` of the policy (a collective): equal on all ranks when right."""
        return params_digest(self.model)


def params_digest(model: torch.nn.Module) -> str:
    """sha256 over every full parameter by name, in fp32 (a collective when ``model`` is sharded)."""
    import hashlib

    digest = hashlib.sha256()
    for name, p in sorted(model.named_parameters()):
        digest.update(name.encode())
        digest.update(full_tensor(p.detach()).float().cpu().numpy().tobytes())
    return digest.hexdigest()


def _rollout_diff(logprobs: torch.Tensor, rollout: list[list[float]], mask: torch.Tensor) -> tuple[float, float, float]:
    """Sum, count and max of |engine log-prob - policy log-prob| over the response tokens that
    both have (an engine row shorter than its response covers only its own tokens)."""
    engine = _padded(rollout, logprobs.shape, logprobs.device)
    have = torch.zeros_like(mask, dtype=torch.bool)
    for i, r in enumerate(rollout):
        have[i, : min(len(r), have.shape[1])] = True
    have &= mask.bool()
    diff = (engine - logprobs.float()).abs()[have]
    if not diff.numel():
        return 0.0, 0.0, -1.0
    return float(diff.sum()), float(diff.numel()), float(diff.max())


def _padded(rows: list[list[float]], shape: torch.Size, device: torch.device) -> torch.Tensor:
    out = torch.zeros(shape, dtype=torch.float32)
    for i, r in enumerate(rows):
        r = r[: shape[1]]
        out[i, : len(r)] = torch.tensor(r, dtype=torch.float32)
    return out.to(device)

"""Per-GPU memory plan of a PRA-GRPO stage (``p2r train --plan``), before any GPU is touched.

Why: a run that does not fit fails minutes in, after the engine started and the checkpoint
loaded, on rented GPUs. What a rank holds is arithmetic on the architecture and the config, so
it is computed here, term by term, from the real architecture built on the meta device (no
weight is read), for each phase of a step as ``trainer/loop.py`` runs it:

- rollout: the engine awake, holding its whole ``gpu_memory_utilization`` share (weights, its
  runtime, the KV cache in the rest); the actor's shards are in host memory (``actor_offload``)
  or stay, with what the caching allocator kept from the update.
- reference: the engine asleep (sleep mode frees its share; level 1 and 2 both leave ~0 on the
  GPU; without sleep mode it keeps all of it); the shards, and the whole reference model gathered
  in the compute dtype (once per step, trainer/actor.py) with one no-grad micro-batch forward.
- update: fp32 params, gradients and AdamW states as FSDP2 shards, the reference's shards, the
  whole policy gathered in the compute dtype and its unsharded fp32 gradients (accumulated without
  a reduce-scatter until the last micro-batch), and one micro-batch's activations (counted with
  the sharded gradients, which only exist after the last reduce-scatter: an upper bound).
- push: the engine's weights woken (not the KV cache); the actor's params and AdamW states still
  on the GPU (offloaded after the push), gradients freed (``zero_grad(set_to_none=True)``), one
  full tensor gathered at a time in the engine's dtype.

The peak is the largest phase, plus ``RUNTIME_ALLOWANCE`` in every phase. ``estimate`` is pure
arithmetic on a ``TrainConfig`` and an ``Arch``, so the trainer memory benchmark can call it
with its CPU world size (``cpu=True``: no engine terms, fp32 compute, no CUDA allowance).

Besides memory, the plan counts what a rank sends through the process group in a step
(``Collectives``: all-gathers of the policy in the forward and the backward and of the reference,
the reduce-scatter of the gradients, the weight push's gather) and host memory at its peaks
(start-up, where each rank reads the whole fp32 policy before sharding it; the checkpoint, where
rank 0 holds the compute-dtype model and its serialised copy). ``schedule`` plans the previous
per-micro-batch schedule too (``SCHEDULE_MICRO_BATCH``), for the benchmark's "before".

Assumed (stated in the table too): attention by flash / memory-efficient kernels (no T x T
scores); a prompt's visual tokens are at most one image at ``max_pixels`` for the perceiver and
the whole prompt for the reasoner (several evidence images); FSDP2 pads each parameter's dim 0 to
a multiple of the world size.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from p2r.core.errors import UserError
from p2r.trainer.actor import SCHEDULE_MICRO_BATCH, SCHEDULE_STEP, Schedule
from p2r.trainer.config import TrainConfig
from p2r.trainer.policy import LOGPROB_CHUNK_TOKENS

GIB = 2**30
TB = 10**12
# One CUDA context (~0.5 GiB: under vLLM's external launcher the engine runs in the trainer's own
# process, on its device), NCCL buffers, the engine's CUDA-graph pool (sleep mode does not free
# it) and allocator fragmentation, per GPU.
RUNTIME_ALLOWANCE = 5 * GIB // 2
# The engine's runtime besides the sampler: its profiled forward at max_num_batched_tokens.
ENGINE_FIXED = 1 * GIB
FP32 = 4
LOGPROB_BUFFERS = 3  # fp32 chunk-sized buffers at once: the upcast, the log-softmax, its gradient
PRESET_PREFIX = "preset:"

# Row labels of the table, in order.
LABELS: dict[str, str] = {
    "params": "params (fp32, sharded)",
    "grads": "grads (fp32, sharded)",
    "optimiser": "AdamW states (2x fp32, sharded)",
    "reference": "reference model ({dtype}, sharded)",
    "reference_gathered": "reference gathered, whole ({dtype})",
    "gathered": "policy gathered ({dtype})",
    "unsharded_grads": "unsharded grads (fp32, accumulated)",
    "activations": "activations (one micro-batch)",
    "cached": "allocator cache (update's, kept)",
    "engine_weights": "engine weights ({dtype} / TP)",
    "engine_runtime": "engine runtime (sampler, profile)",
    "kv_cache": "KV cache (rest of engine share)",
    "engine_awake": "engine share (no sleep mode)",
    "weight_push": "weight push (largest tensor)",
    "allowance": "CUDA contexts / fragmentation",
}


@dataclass(frozen=True)
class Arch:
    """What the plan needs of a model: parameter shapes and the text / vision tower sizes."""

    name: str
    shapes: tuple[tuple[int, ...], ...]  # every distinct parameter (a tied head once)
    root_numel: int  # parameters outside decoder layers and vision blocks: FSDP's root unit
    unit_numel: int  # the largest decoder layer or vision block (one FSDP unit)
    largest_tensor: int
    embed_numel: int
    tied: bool
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    vision_depth: int
    vision_hidden: int
    vision_intermediate: int
    patch: int
    merge: int

    @property
    def params(self) -> int:
        return sum(math.prod(s) for s in self.shapes)

    def sharded(self, world: int) -> int:
        """Elements of one rank's FSDP2 shards: each parameter split on dim 0, padded."""
        return sum(-(-s[0] // world) * math.prod(s[1:]) for s in self.shapes)


@dataclass(frozen=True)
class Activations:
    """One micro-batch's activation memory in the update, by part (bytes)."""

    layer_inputs: int  # checkpointed decoder-layer (and vision-block) inputs, all layers
    recompute: int  # one layer's full activations, recomputed in the backward
    logits: int  # response-position logits in compute dtype and their gradient
    logprob_chunks: int  # fp32 log-softmax chunks (trainer/policy.py: LOGPROB_CHUNK_TOKENS)

    @property
    def total(self) -> int:
        return self.layer_inputs + self.recompute + self.logits + self.logprob_chunks


@dataclass(frozen=True)
class Collectives:
    """Bytes one rank sends through the process group in a step, under ring algorithms (what
    NCCL runs inside a node): an all-gather of a full tensor of ``B`` bytes sends ``B (W - 1) / W``,
    a reduce-scatter of ``B`` bytes ``B (W - 1) / W`` (``bench.trainer_memory.CollectiveCounter``
    counts the same way). Full sizes include FSDP2's padding to a multiple of the world size."""

    schedule: str
    micro_batches: int  # forward / backward passes per rank in the step, at the planned lengths
    policy_forward: float  # all-gathers of the policy (compute dtype) for the forwards
    policy_backward: float  # ... again in the backwards (reshard after forward)
    reference: float  # all-gathers of the reference model
    grad_reduce_scatter: float  # reduce-scatters of the fp32 gradients
    weight_push: float  # the push's gather into the engine
    checkpoint_export: float  # per checkpoint, not per step: the HF export's gather

    @property
    def total(self) -> float:
        return self.policy_forward + self.policy_backward + self.reference + self.grad_reduce_scatter + self.weight_push


@dataclass(frozen=True)
class Plan:
    """Per-GPU (per-rank) memory of a stage: every term, each phase's terms, the KV cache."""

    model: str
    model_params: int
    tied: bool
    role: str
    gpus: int
    capacity: int
    cpu: bool
    dtype: str
    micro_batch_size: int
    sequence_tokens: int
    gradient_checkpointing: bool
    params: int
    grads: int
    optimiser: int
    reference: int  # on the GPU
    reference_host: int
    gathered: int
    activations: Activations
    engine_weights: int
    engine_runtime: int
    kv_cache: int
    weight_push: int
    allowance: int
    kv_bytes_per_token: int
    kv_tokens: int
    kv_tokens_needed: int  # max_num_seqs x (max_prompt_tokens + max_response_tokens)
    rollouts_per_rank: int
    host_per_rank: int
    host_startup: int  # per rank, while the policy is read whole (fp32) before it is sharded
    host_checkpoint: int  # rank 0 while a checkpoint is written (the others: host_per_rank)
    micro_batch_tokens: int  # tokens of the largest micro-batch (the token budget, or micro-batch x sequence)
    collectives: Collectives
    phases: dict[str, dict[str, int]] = field(default_factory=dict)
    problem: str | None = None  # a reason it cannot run that is not a phase total

    def total(self, phase: str) -> int:
        return sum(self.phases[phase].values())

    @property
    def peak_phase(self) -> str:
        return max(self.phases, key=self.total)

    @property
    def peak(self) -> int:
        return self.total(self.peak_phase)

    @property
    def fits(self) -> bool:
        return self.problem is None and self.peak <= self.capacity

    def largest_term(self, phase: str | None = None) -> tuple[str, int]:
        terms = self.phases[phase or self.peak_phase]
        name = max(terms, key=lambda k: terms[k])
        return name, terms[name]

    def label(self, term: str) -> str:
        return LABELS[term].format(dtype=self.dtype)

    def error_line(self) -> str | None:
        """One line saying why it does not fit (naming the largest term), or None."""
        if self.problem is not None:
            return self.problem
        if self.peak <= self.capacity:
            return None
        name, size = self.largest_term()
        return (f"plan: does not fit: the {self.peak_phase} phase needs {gib(self.peak)} per GPU of "
                f"{gib(self.capacity)}; largest term: {self.label(name)} {gib(size)}")


def gib(n: int) -> str:
    return f"{n / GIB:.2f} GiB"


_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(text: str) -> int:
    """``80GiB``, ``24GB``, ``141 GiB``, ``1.5TiB`` or a byte count."""
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*", text)
    if not m or m.group(2).lower() not in _UNITS:
        raise UserError(f"--gpu-memory: cannot read {text!r} (e.g. 80GiB, 24GB)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


# ------------------------------------------------------------------------- architecture


def arch_from_config(config: Any, name: str) -> Arch:
    """The ``Arch`` of a Qwen3-VL config: the model built on the meta device (no memory, no
    weights), its parameters counted, its FSDP units (decoder layers, vision blocks) measured."""
    import torch
    from transformers import Qwen3VLForConditionalGeneration

    if getattr(config, "model_type", None) != "qwen3_vl":
        raise UserError(f"plan: {name}: model_type {getattr(config, 'model_type', None)!r}; the trainer "
                         "trains qwen3_vl (Qwen3VLForConditionalGeneration)")
    with torch.device("meta"):
        model = Qwen3VLForConditionalGeneration(config)
    unique = {id(p): p for p in model.parameters()}
    unit_types = set(model._no_split_modules)
    in_units: set[int] = set()
    unit_numel = 0
    for module in model.modules():
        if type(module).__name__ in unit_types:
            params = {id(p): p for p in module.parameters()}
            in_units |= params.keys()
            unit_numel = max(unit_numel, sum(p.numel() for p in params.values()))
    text, vision = config.text_config, config.vision_config
    embed = model.get_input_embeddings().weight
    return Arch(
        name=name,
        shapes=tuple(tuple(p.shape) for p in unique.values()),
        root_numel=sum(p.numel() for k, p in unique.items() if k not in in_units),
        unit_numel=unit_numel,
        largest_tensor=max(p.numel() for p in unique.values()),
        embed_numel=embed.numel(),
        tied=model.get_output_embeddings().weight is embed,
        layers=text.num_hidden_layers, hidden=text.hidden_size, intermediate=text.intermediate_size,
        heads=text.num_attention_heads, kv_heads=text.num_key_value_heads,
        head_dim=getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads,
        vocab=text.vocab_size, vision_depth=vision.depth, vision_hidden=vision.hidden_size,
        vision_intermediate=vision.intermediate_size, patch=vision.patch_size, merge=vision.spatial_merge_size,
    )


def load_arch(model: str) -> Arch:
    """The architecture of a config's ``model``: ``preset:NAME`` (``p2r.models.tiny.PRESETS``) or a
    local checkpoint directory (``file://`` allowed); only its config.json is read."""
    if model.startswith(PRESET_PREFIX):
        from p2r.models.tiny import preset_config

        name = model[len(PRESET_PREFIX):]
        return arch_from_config(preset_config(name), name)
    path = Path(model.removeprefix("file://"))
    if not (path / "config.json").is_file():
        from p2r.models.tiny import PRESETS

        raise UserError(f"plan: model {model!r} is not a local checkpoint directory (no config.json) or "
                         f"preset:NAME ({', '.join(PRESETS)}); set it, or P2R_TRAIN_MODEL, to one")
    from transformers import AutoConfig

    return arch_from_config(AutoConfig.from_pretrained(path), path.name)


# ------------------------------------------------------------------------------ estimate


def _dtype(cfg: TrainConfig, cpu: bool) -> tuple[str, int]:
    """The compute (and engine) dtype as trainer/actor.py's ``compute_dtype`` picks it."""
    if cfg.compute_dtype == "float32" or (cfg.compute_dtype == "auto" and cpu):
        return "fp32", 4
    return "bf16", 2


def _visual_tokens(cfg: TrainConfig, arch: Arch) -> int:
    """Merged visual tokens of one prompt, at most: one image at ``max_pixels`` (perceiver) or the
    whole prompt (reasoner: the original and its evidence crops), never over the prompt."""
    if cfg.role == "perceiver":
        return min(cfg.max_prompt_tokens, cfg.max_pixels // (arch.patch * arch.merge) ** 2)
    return cfg.max_prompt_tokens


def micro_batch_shape(cfg: TrainConfig) -> tuple[int, int, int]:
    """The largest micro-batch trainer/actor.py cuts (``micro_batches``): ``(sequences at full
    length, tokens, sequences at all)``. Without a token budget, ``micro_batch_size`` sequences of
    max prompt + max response tokens; with one, at most the budget's tokens (or one sequence, which
    always goes), full-length sequences as many as fit, and - short responses packing more - up
    to ``micro_batch_size`` sequences for the per-sequence vision tower."""
    seq = cfg.max_prompt_tokens + cfg.max_response_tokens
    b = cfg.micro_batch_size
    budget = cfg.max_tokens_per_micro_batch
    if budget is None:
        return b, b * seq, b
    full = min(b, max(1, budget // seq))
    return full, min(b * seq, max(seq, budget)), min(b, max(1, budget // (cfg.max_prompt_tokens + 1)))


def activations(cfg: TrainConfig, arch: Arch, d: int, grad: bool = True) -> Activations:
    """One micro-batch (``micro_batch_shape``), with gradients (the policy) or without (the
    reference: no layer inputs kept, one layer at a time, no logits gradient).

    Per token, a decoder layer keeps its input (checkpointing) or everything below (without):
    norm outputs and their fp32 upcasts, q / k / v, q/k-norm and rotary outputs, attention
    output, o-proj, gate / up / act / product. The vision tower runs once per sequence (pixels
    are repeated per response) on ``merge**2`` patches per visual token."""
    b, t, n = micro_batch_shape(cfg)
    h, q, kv = arch.hidden, arch.heads * arch.head_dim, arch.kv_heads * arch.head_dim
    layer_full = d * (4 * h + 4 * q + 5 * kv + 4 * arch.intermediate) + FP32 * (2 * h + q + kv)
    vh, vi = arch.vision_hidden, arch.vision_intermediate
    block_full = d * (8 * vh + 2 * vi)
    patches = n * _visual_tokens(cfg, arch) * arch.merge**2
    r = cfg.max_response_tokens
    chunk = b * min(LOGPROB_CHUNK_TOKENS, r) * arch.vocab * FP32
    if not grad:
        return Activations(0, max(t * layer_full, patches * block_full), b * (r + 1) * arch.vocab * d, 2 * chunk)
    if cfg.gradient_checkpointing:
        inputs = arch.layers * t * h * d + arch.vision_depth * patches * vh * d
        recompute = max(t * layer_full, patches * block_full)
    else:
        inputs = arch.layers * t * layer_full + arch.vision_depth * patches * block_full
        recompute = 0
    logits = 2 * b * (r + 1) * arch.vocab * d  # the logits and their gradient
    return Activations(inputs, recompute, logits, LOGPROB_BUFFERS * chunk)


def collectives(cfg: TrainConfig, arch: Arch, gpus: int, d: int, engine_d: int,
                schedule: Schedule = SCHEDULE_STEP) -> Collectives:
    """``Collectives`` of one step at the planned lengths (every response at max length: the most
    micro-batches). ``SCHEDULE_STEP``: the policy and the reference gathered once, the gradients
    reduce-scattered once, the push gathered in the engine's dtype. ``SCHEDULE_MICRO_BATCH`` (the
    previous actor): per micro-batch, the policy gathered in the forward and again in the backward,
    the reference gathered, the gradients reduce-scattered; the push and the export in fp32."""
    full = arch.sharded(gpus) * gpus  # elements, padded as FSDP2 pads them
    ring = (gpus - 1) / gpus
    b = micro_batch_shape(cfg)[0]
    micro = max(1, cfg.prompts_per_step // gpus) * -(-cfg.rollouts_per_prompt // b)
    ref = cfg.kl_coef > 0
    if schedule == SCHEDULE_STEP:
        return Collectives(schedule, micro, full * d * ring, 0.0, full * d * ring if ref else 0.0,
                           full * FP32 * ring, full * engine_d * ring, full * d * ring)
    return Collectives(schedule, micro, micro * full * d * ring, micro * full * d * ring,
                       micro * full * d * ring if ref else 0.0, micro * full * FP32 * ring, full * FP32 * ring,
                       full * FP32 * ring)


def estimate(cfg: TrainConfig, arch: Arch, gpus: int, gpu_memory_bytes: int, *, cpu: bool = False,
             schedule: Schedule = SCHEDULE_STEP) -> Plan:
    """The memory plan of ``cfg`` on ``gpus`` GPUs (or CPU ranks with ``cpu``) of
    ``gpu_memory_bytes`` each, under the actor's collective ``schedule``. Pure arithmetic: no
    torch, no device."""
    if schedule not in (SCHEDULE_STEP, SCHEDULE_MICRO_BATCH):
        raise ValueError(f"unknown schedule {schedule!r}")
    if gpus < 1:
        raise UserError("plan: --gpus must be at least 1")
    tp = 1 if cpu else cfg.rollout_tensor_parallel_size
    if gpus % tp:
        raise UserError(f"plan: rollout_tensor_parallel_size {tp} does not divide {gpus} GPUs")
    dtype, d = _dtype(cfg, cpu)
    shard = arch.sharded(gpus)
    params, grads, optimiser = FP32 * shard, FP32 * shard, 2 * FP32 * shard
    ref_total = d * shard if cfg.kl_coef > 0 else 0
    ref_host = ref_total if cfg.ref_cpu_offload and not cpu else 0
    reference = ref_total - ref_host
    acts = activations(cfg, arch, d)
    if schedule == SCHEDULE_STEP:
        # The whole policy stays gathered through the step's micro-batches, with its unsharded
        # gradients accumulated in fp32 (one compute-dtype unit's fresh gradients on top while a
        # backward adds them in) and, at the last backward, one unit's fp32 reduce-scatter input.
        gathered = arch.params * d
        unsharded_grads = arch.params * FP32 + arch.unit_numel * (d + FP32)
        ref_gathered = arch.params * d if ref_total else 0
    else:
        # FSDP2 keeps the root unit gathered through the forward and backward: its params (the
        # reference's too), its unsharded gradients and their fp32 reduce-scatter buffer; and two
        # layer units at a time (the current one and the prefetched next) plus one unit's gradients.
        gathered = (arch.root_numel * (2 * d + FP32) + (arch.root_numel * d if ref_total else 0)
                    + arch.unit_numel * (3 * d + FP32))
        unsharded_grads = ref_gathered = 0
    ref_acts = activations(cfg, arch, d, grad=False) if ref_total else None
    # Each shard cast to the engine's dtype and gathered (trainer/actor.py ``gathered``; the
    # previous push gathered fp32 and cast the full tensor); a tied embedding's full copy is held
    # to the end (it is pushed again as lm_head).
    gather_d = d if schedule == SCHEDULE_STEP else FP32
    push = arch.largest_tensor * (gather_d + d) + (arch.embed_numel * d if arch.tied else 0)
    allowance = 0 if cpu else RUNTIME_ALLOWANCE
    seq = cfg.max_prompt_tokens + cfg.max_response_tokens
    # Per engine: a TP group of ranks shares one engine and its prompts.
    rollouts = max(1, cfg.prompts_per_step // (gpus // tp)) * cfg.rollouts_per_prompt
    kv_per_token = 2 * arch.layers * -(-arch.kv_heads // tp) * arch.head_dim * d
    problem = None
    update = {"params": params, "grads": grads, "optimiser": optimiser, "reference": reference,
              "gathered": gathered, "activations": acts.total}
    if unsharded_grads:
        update["unsharded_grads"] = unsharded_grads
    ref_phase: dict[str, int] = {}
    if ref_gathered and ref_acts is not None:
        ref_phase = {"params": params, "optimiser": optimiser, "reference": reference,
                     "reference_gathered": ref_gathered, "activations": ref_acts.total}
    if cpu:
        engine_weights = engine_runtime = kv = 0
        phases = {
            **({"reference": ref_phase} if ref_phase else {}),
            "update": update,
            "push": {"params": params, "optimiser": optimiser, "reference": reference, "weight_push": push},
        }
    else:
        share = int(cfg.gpu_memory_utilization * gpu_memory_bytes)
        engine_weights = arch.params * d // tp
        engine_runtime = 2 * cfg.max_num_seqs * arch.vocab * FP32 + ENGINE_FIXED  # fp32 logits + probs
        kv = share - engine_weights - engine_runtime
        if kv < kv_per_token * cfg.max_model_len:
            problem = (f"plan: does not fit: the engine's share (gpu_memory_utilization {cfg.gpu_memory_utilization}"
                       f" x {gib(gpu_memory_bytes)} = {gib(share)}) leaves {gib(max(kv, 0))} for the KV cache "
                       f"after its weights ({gib(engine_weights)}) and runtime ({gib(engine_runtime)}), less than "
                       f"one max_model_len sequence ({gib(kv_per_token * cfg.max_model_len)}); largest term: "
                       f"{LABELS['engine_weights'].format(dtype=dtype)} {gib(engine_weights)}")
        kv = max(kv, 0)
        engine = {"engine_weights": engine_weights, "engine_runtime": engine_runtime, "kv_cache": kv}
        if cfg.actor_offload:
            resident: dict[str, int] = {}
        else:  # the shards stay, and without offload() nothing empties the allocator's cache
            resident = {"params": params, "optimiser": optimiser, "reference": reference,
                        "cached": max(gathered + unsharded_grads + acts.total,
                                      ref_gathered + (ref_acts.total if ref_acts else 0))}
        push_phase = {"params": params, "optimiser": optimiser, "reference": reference,
                      "engine_weights": engine_weights, "weight_push": push}
        if not cfg.enable_sleep_mode:  # the engine keeps its whole share through the update
            update["engine_awake"] = share
            if ref_phase:
                ref_phase["engine_awake"] = share
            push_phase = {k: v for k, v in push_phase.items() if k != "engine_weights"} | {"engine_awake": share}
        phases = {"rollout": {**engine, **resident}, **({"reference": ref_phase} if ref_phase else {}),
                  "update": update, "push": push_phase}
    for terms in phases.values():
        if allowance:
            terms["allowance"] = allowance
    host = ref_host
    if not cpu and cfg.actor_offload:
        host += params + optimiser + reference
    if not cpu and cfg.enable_sleep_mode and cfg.sleep_level == 1:
        host += engine_weights
    # Start-up: every rank reads the whole policy in fp32 before sharding it (the reference, read
    # next in the compute dtype, is smaller). Checkpoint: rank 0 holds the whole model in the
    # compute dtype and its serialised copy (safetensors builds a file's bytes in memory;
    # save_pretrained writes one file up to 50 GB); the previous export gathered the fp32 model on
    # every rank's host first.
    host_startup = arch.params * FP32 + (ref_host if not cpu else 0)
    export = arch.params * (d + d) if schedule == SCHEDULE_STEP else arch.params * (FP32 + d + d)
    host_checkpoint = host + export
    return Plan(
        model=arch.name, model_params=arch.params, tied=arch.tied, role=cfg.role, gpus=gpus,
        capacity=gpu_memory_bytes, cpu=cpu, dtype=dtype, micro_batch_size=cfg.micro_batch_size,
        sequence_tokens=seq, gradient_checkpointing=cfg.gradient_checkpointing, params=params, grads=grads,
        optimiser=optimiser, reference=reference, reference_host=ref_host, gathered=gathered, activations=acts,
        engine_weights=engine_weights, engine_runtime=engine_runtime, kv_cache=kv, weight_push=push,
        allowance=allowance, kv_bytes_per_token=kv_per_token, kv_tokens=kv // kv_per_token,
        kv_tokens_needed=kv_needed(cfg, rollouts), rollouts_per_rank=rollouts, host_per_rank=host,
        host_startup=host_startup, host_checkpoint=host_checkpoint, micro_batch_tokens=acts_tokens(cfg),
        collectives=collectives(cfg, arch, gpus, d, d, schedule), phases=phases, problem=problem,
    )


def acts_tokens(cfg: TrainConfig) -> int:
    return micro_batch_shape(cfg)[1]


def kv_needed(cfg: TrainConfig, rollouts: int) -> int:
    """KV tokens for every sequence the engine runs at once (``max_num_seqs``, at most the step's
    rollouts), with prefix sharing: the ``rollouts_per_prompt`` samples of a prompt share its
    prompt's blocks (vLLM's prefix caching), so a prompt's tokens count once per group."""
    running = min(rollouts, cfg.max_num_seqs)
    prompts = -(-running // cfg.rollouts_per_prompt)
    return prompts * cfg.max_prompt_tokens + running * cfg.max_response_tokens


# --------------------------------------------------------------------------------- table


def format_plan(plan: Plan, cfg: TrainConfig) -> str:
    """The plan as the table ``p2r train --plan`` prints."""
    device = "CPU rank" if plan.cpu else "GPU"
    sleep = f"level {cfg.sleep_level}" if cfg.enable_sleep_mode and not plan.cpu else "off"
    lines = [
        f"plan: {plan.model}, {plan.model_params:,} parameters ({'tied' if plan.tied else 'untied'} embeddings), "
        f"role {plan.role}, {plan.gpus} x {gib(plan.capacity)} per {device}, {plan.dtype} compute",
        f"micro-batch up to {plan.micro_batch_size} responses, {plan.micro_batch_tokens:,} tokens at most (token "
        f"budget {cfg.max_tokens_per_micro_batch if cfg.max_tokens_per_micro_batch else 'none'}; a sequence "
        f"{plan.sequence_tokens:,} = prompt {cfg.max_prompt_tokens:,} + response {cfg.max_response_tokens:,}), "
        f"gradient checkpointing "
        f"{'on' if plan.gradient_checkpointing else 'off'}, kl_coef {cfg.kl_coef}, "
        f"actor_offload {cfg.actor_offload and not plan.cpu}, sleep mode {sleep}",
        "",
    ]
    phases = list(plan.phases)
    width = max(len(plan.label(k)) for k in LABELS) + 2
    lines.append(f"{'per ' + device:<{width}}" + "".join(f"{p:>12}" for p in phases))
    for term in LABELS:
        if not any(term in plan.phases[p] for p in phases):
            continue
        cells = "".join(f"{gib(plan.phases[p][term]) if term in plan.phases[p] else '-':>12}" for p in phases)
        lines.append(f"{plan.label(term):<{width}}{cells}")
    lines.append(f"{'total':<{width}}" + "".join(f"{gib(plan.total(p)):>12}" for p in phases))
    lines.append(f"{'capacity':<{width}}" + "".join(f"{gib(plan.capacity):>12}" for p in phases))
    a = plan.activations
    lines += [
        "",
        f"peak: {plan.peak_phase} phase, {gib(plan.peak)} of {gib(plan.capacity)} "
        f"({100 * plan.peak / plan.capacity:.0f}%): {'fits' if plan.fits else 'DOES NOT FIT'}",
        f"activations: layer inputs {gib(a.layer_inputs)}, one layer recomputed {gib(a.recompute)}, logits and "
        f"their gradient {gib(a.logits)}, fp32 log-softmax chunks {gib(a.logprob_chunks)}",
    ]
    c = plan.collectives
    lines.append(f"collectives per rank per step (bytes sent, ring): {c.total / TB:.3f} TB = policy all-gathers "
                 f"forward {c.policy_forward / 1e9:.1f} GB + backward {c.policy_backward / 1e9:.1f} GB, reference "
                 f"all-gathers {c.reference / 1e9:.1f} GB, gradient reduce-scatters {c.grad_reduce_scatter / 1e9:.1f} "
                 f"GB, weight push {c.weight_push / 1e9:.1f} GB ({c.micro_batches} micro-batches per rank at full "
                 f"length; {c.schedule} schedule); per checkpoint, the HF export's gather "
                 f"{c.checkpoint_export / 1e9:.1f} GB")
    if not plan.cpu:
        running = min(plan.rollouts_per_rank, cfg.max_num_seqs)
        full = plan.kv_tokens // plan.sequence_tokens
        holds = "holds all of them" if plan.kv_tokens >= plan.kv_tokens_needed else (
            f"holds {full:,} full-length sequences at once; the engine queues the rest")
        lines.append(f"KV cache: {gib(plan.kv_cache)} = {plan.kv_tokens:,} tokens at "
                     f"{plan.kv_bytes_per_token // 1024} KiB/token; {running} sequences at once (a step: "
                     f"{plan.rollouts_per_rank} rollouts per engine, max_num_seqs {cfg.max_num_seqs}), the "
                     f"{cfg.rollouts_per_prompt} of a prompt sharing its {cfg.max_prompt_tokens:,} prompt tokens: "
                     f"{plan.kv_tokens_needed:,} tokens: {holds}")
    lines.append(f"host memory per rank: {gib(plan.host_per_rank)} steady (offloaded actor, reference, sleeping "
                 f"engine weights); peaks: start-up {gib(plan.host_startup)} per rank (the whole fp32 policy read "
                 f"before sharding), checkpoint {gib(plan.host_checkpoint)} on rank 0 (steady, plus the compute-dtype "
                 f"model and its serialised copy)")
    lines.append("assumed: flash / memory-efficient attention (no T x T scores); "
                 + ("no CUDA allowance" if plan.cpu else f"{gib(RUNTIME_ALLOWANCE)} per GPU for one CUDA context "
                    "(trainer and engine in one process), NCCL, CUDA graphs and fragmentation"))
    return "\n".join(lines)

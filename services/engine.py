"""An in-process vLLM engine that speaks the ``Generator`` protocol.

Renders chat requests with the checkpoint's own chat template, hands vLLM the images as
multimodal data, and returns ``n`` completions per request. It is the offline (batch) path used
by the demo, evaluation and trainer rollouts; the servers wrap the same rendering.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from p2r.core.generation import ChatRequest, Sampling

if TYPE_CHECKING:
    from vllm import LLM, SamplingParams

DEFAULT_KV_CACHE_GIB = 1


@dataclass(frozen=True)
class EngineLimits:
    """Per-role engine limits (vLLM arguments of the same names)."""

    max_model_len: int = 8192
    max_num_seqs: int = 16
    max_images_per_prompt: int = 4
    kv_cache_gib: int = DEFAULT_KV_CACHE_GIB


def sampling_params(sampling: Sampling) -> SamplingParams:
    """vLLM sampling parameters for our ``Sampling``."""
    from vllm import SamplingParams

    return SamplingParams(
        n=sampling.n,
        temperature=sampling.temperature,
        top_p=sampling.top_p,
        max_tokens=sampling.max_tokens,
        seed=sampling.seed,
        repetition_penalty=sampling.repetition_penalty,
    )


class OfflineEngine:
    """A vLLM ``LLM`` over one checkpoint directory. Create it under ``if __name__ == "__main__"``:
    vLLM starts worker processes."""

    def __init__(self, model: str, limits: EngineLimits | None = None, seed: int = 0) -> None:
        self.limits = limits or EngineLimits()
        # vLLM-CPU sizes its KV cache from this variable; a small default keeps tests and the
        # demo within a laptop's memory. A deployment sets its own.
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(self.limits.kv_cache_gib))
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
        # Logs belong on stderr: stdout carries results (``p2r answer --json``).
        os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
        from vllm import LLM

        self.model = model
        self.llm: LLM = LLM(
            model,
            max_model_len=self.limits.max_model_len,
            max_num_seqs=self.limits.max_num_seqs,
            limit_mm_per_prompt={"image": self.limits.max_images_per_prompt},
            seed=seed,
            enforce_eager=True,
        )
        self.tokenizer = self.llm.get_tokenizer()

    def render(self, request: ChatRequest) -> dict[str, Any]:
        """The vLLM prompt dict for one chat request."""
        if len(request.images) > self.limits.max_images_per_prompt:
            raise ValueError(
                f"request has {len(request.images)} images, over the limit of "
                f"{self.limits.max_images_per_prompt} per prompt"
            )
        text = self.tokenizer.apply_chat_template(
            request.messages, tokenize=False, add_generation_prompt=True
        )
        prompt: dict[str, Any] = {"prompt": text}
        if request.images:
            prompt["multi_modal_data"] = {"image": list(request.images)}
        return prompt

    def generate(self, requests: Sequence[ChatRequest], sampling: Sampling) -> list[list[str]]:
        if not requests:
            return []
        outputs = self.llm.generate(
            [self.render(r) for r in requests], sampling_params(sampling), use_tqdm=False
        )
        return [[c.text for c in o.outputs] for o in outputs]

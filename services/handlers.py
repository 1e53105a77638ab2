"""Role logic of the servers, on p2r.v1 messages, independent of the transport.

Each role validates a request completely before any work starts (so a batch with one bad item
fails as a whole, naming ``requests[i].field``; only a ReasonBatch item with invalid regions or a
bad ``image_index`` fails alone, in its result's ``error``), does the CPU-heavy image work in a thread, and
awaits the shared ``AsyncEngine``. The gateway's ``answer`` composes perceive and reason through
``RoleBackend`` objects that are either this process's handlers or remote gRPC stubs.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

from PIL import Image

from p2r.core import prompts
from p2r.core.answers import extract_answer, extract_reasoning
from p2r.core.bbox import BBOX_LIST_SCHEMA, Region, parse_regions, region_problem
from p2r.core.evidence import build_evidence
from p2r.core.flow import perceiver_request, reasoner_request, verifier_request
from p2r.core.generation import ChatRequest, Sampling
from p2r.core.grading import verifier_says_yes
from p2r.core.images import MAX_ASPECT_RATIO, ImageError, PixelBounds, load_image, model_size, open_image
from p2r.core.prompts import AnswerForm
from p2r.core.source_image import SourceImage
from p2r.services import metrics
from p2r.services.config import ServeConfig
from p2r.services.cpus import default_workers
from p2r.services.engine import AsyncEngine, GenerationOut, sampling_params
from p2r.services.errors import InvalidArgument
from p2r.services.image_cache import DecodedImages, conversion_cost, decode_cost, decoded_bytes, evidence_cost
from p2r.services.protocol import FORM_FROM_PB, region_to_pb
from p2r.v1 import p2r_pb2 as pb


def _ms(seconds: float) -> float:
    return round(seconds * 1000.0, 3)


@dataclass
class Prepared:
    """A validated request, ready for the engine."""

    chat: ChatRequest
    sampling: Sampling
    extra: dict[str, Any]


def vllm_client_error(exc: BaseException) -> bool:
    """Whether vLLM raised ``exc`` as the request's fault (``VLLMClientError``). vLLM is looked
    up, not imported: it is loaded once an engine runs, and importing it early would bypass
    ``configure_vllm_env``."""
    module = sys.modules.get("vllm.exceptions")
    return module is not None and isinstance(exc, module.VLLMClientError)


class ItemInvalid(InvalidArgument):
    """A batch item that fails alone (ReasonBatch: invalid regions): the batch answers it with
    ``result`` - its ``error`` naming the item - and the other items as usual. In a single call
    it is INVALID_ARGUMENT like any bad field."""

    def __init__(self, message: str, result: Any) -> None:
        super().__init__(message)
        self.result = result


@dataclass(frozen=True)
class EvidenceShown:
    """What a reasoner request's result reports of its evidence (the images are not kept)."""

    with_evidence: bool
    num_crops: int


class Handlers:
    """Perceiver, reasoner and verifier over one engine (``engine`` is None on a remote gateway)."""

    def __init__(self, config: ServeConfig, engine: AsyncEngine | None) -> None:
        self.config = config
        self.engine = engine
        self.bounds = PixelBounds(config.min_pixels, config.max_pixels)
        # Decoded images by content hash, within a budget of decoded bytes (image_cache.py).
        self._decoded = DecodedImages(config.decoded_image_cache_bytes)
        # The image work gets its own bounded pool: on a CPU engine it shares the cores with the
        # engine's own threads, and more builders than cores only slow both down.
        # 0: sized from the container's CPU quota, not the node's cores (services/cpus.py).
        workers = config.prepare_workers or default_workers()
        self._prepare_pool = ThreadPoolExecutor(workers, thread_name_prefix="p2r-prepare")

    # ------------------------------------------------------------------------------ validation

    def sampling(self, params: pb.SamplingParams, field: str, default_max_tokens: int) -> Sampling:
        for name in ("temperature", "top_p", "repetition_penalty"):
            if params.HasField(name) and not math.isfinite(getattr(params, name)):
                raise InvalidArgument(f"{field}.{name}: must be a finite number, got {getattr(params, name)}")
        if params.HasField("n") and params.n > self.config.max_n:
            raise InvalidArgument(f"{field}.n: {params.n} completions, over the limit max_n={self.config.max_n}")
        max_tokens = params.max_tokens if params.HasField("max_tokens") else default_max_tokens
        # No completion outgrows the context: vLLM ends it at max_model_len ("length"), so a
        # larger request is capped to what the context allows instead of failing.
        max_tokens = min(max_tokens, self.config.limits.max_model_len)
        try:
            sampling = Sampling(
                n=params.n if params.HasField("n") else 1,
                temperature=params.temperature if params.HasField("temperature") else 0.0,
                top_p=params.top_p if params.HasField("top_p") else 1.0,
                max_tokens=max_tokens,
                seed=params.seed if params.HasField("seed") else None,
                repetition_penalty=params.repetition_penalty if params.HasField("repetition_penalty") else 1.0,
            )
        except ValueError as e:
            raise InvalidArgument(f"{field}: {e}") from None
        if self.engine is not None:
            # vLLM's own rules (e.g. repetition_penalty > 0), checked now so that a bad value is
            # INVALID_ARGUMENT naming the field before any work, not an engine error later.
            from vllm.exceptions import VLLMValidationError

            try:
                sampling_params(sampling)
            except (VLLMValidationError, ValueError) as e:
                # Name the field: vLLM sets ``parameter`` on some errors; others start with it.
                name = getattr(e, "parameter", None) or str(e).split(" ", 1)[0]
                known = name in pb.SamplingParams.DESCRIPTOR.fields_by_name
                raise InvalidArgument(f"{field}{'.' + name if known else ''}: {e}") from None
        return sampling

    def image(self, data: bytes, field: str) -> Image.Image:
        """Check size, format and pixel count from the header; pixels are decoded later."""
        if len(data) > self.config.max_image_bytes:
            raise InvalidArgument(
                f"{field}: image is {len(data)} bytes, over the limit of {self.config.max_image_bytes} bytes"
            )
        try:
            image = open_image(data, field=field, max_pixels=self.config.max_image_pixels)
        except ImageError as e:
            raise InvalidArgument(str(e)) from None
        if max(image.size) > MAX_ASPECT_RATIO * max(1, min(image.size)):
            raise InvalidArgument(f"{field}: image is {image.width}x{image.height}, an aspect ratio over the "
                                  f"model's limit of {MAX_ASPECT_RATIO}:1")
        return image

    def source(self, image: Image.Image, data: bytes, field: str) -> SourceImage:
        """Decoded RGB pixels with their model-side resize, from the cache when the same bytes
        were seen recently.

        ``image`` is the request's header (``self.image``), kept by the request until it ends, so
        the pixels are decoded from a fresh open of ``data``: loading ``image`` itself would keep
        a second full-resolution copy alive beside the cached RGB one, outside the budget."""
        key = DecodedImages.key(data)
        cached = self._decoded.get(key)
        if cached is not None:
            return cached
        cost = decode_cost(image.size, model_size(*image.size, self.bounds))  # RGB once decoded
        converting = conversion_cost(image.mode, image.size)  # the original, until converted
        self._decoded.reserve(cost + converting)
        try:
            decoded = load_image(open_image(data, field=field, max_pixels=self.config.max_image_pixels), field=field)
            source = SourceImage(decoded, self.bounds)
        except ImageError as e:
            self._decoded.release(cost)
            raise InvalidArgument(str(e)) from None
        except BaseException:
            self._decoded.release(cost)
            raise
        finally:
            self._decoded.release(converting)
        self._decoded.hold(source, cost)
        self._decoded.put(key, source)
        return source

    def evidence(self, source: SourceImage, regions: list[Region], question: str, form: AnswerForm,
                 variant: prompts.Variant) -> tuple[ChatRequest, EvidenceShown]:
        """The reasoner's chat for ``regions`` on ``source``. The annotated full-resolution copy
        and the crops count against the decoded-image budget while they are built, and only
        their model-side resizes outlive this call (in the chat)."""
        cost = evidence_cost(source.image.size, regions, self.bounds)
        self._decoded.reserve(cost, own=decoded_bytes(source))
        try:
            evidence = build_evidence(source.image, regions)
            chat = reasoner_request(evidence, question, form, self.bounds, variant, source)
        finally:
            self._decoded.release(cost)
        return chat, EvidenceShown(evidence.with_evidence, evidence.num_crops)

    def question(self, text: str, field: str) -> str:
        if not text.strip():
            raise InvalidArgument(f"{field}: question is empty")
        if len(text) > self.config.max_question_chars:
            raise InvalidArgument(f"{field}: question has {len(text)} characters, over the limit of "
                                  f"{self.config.max_question_chars}")
        if self.engine is not None:
            tokens = len(self.engine.renderer.tokenizer.encode(text, add_special_tokens=False))
            limit = self.config.limits.max_model_len
            if tokens >= limit:
                raise InvalidArgument(f"{field}: question is {tokens} tokens, over the model length "
                                      f"max_model_len={limit}")
        return text

    @staticmethod
    def form(value: int, field: str) -> AnswerForm:
        if value not in FORM_FROM_PB:
            raise InvalidArgument(f"{field}: answer_form must be MCA, NA or FREE_FORM")
        return FORM_FROM_PB[value]

    @staticmethod
    def variant(value: int, field: str) -> prompts.Variant:
        """Proto3 enums are open: an unknown number arrives as itself and must not silently
        fall back to the training wording."""
        if value == pb.PROMPT_VARIANT_TRAIN:
            return "train"
        if value == pb.PROMPT_VARIANT_EVAL:
            return "eval"
        raise InvalidArgument(f"{field}: unknown PromptVariant {value}; PROMPT_VARIANT_TRAIN (0) or "
                              f"PROMPT_VARIANT_EVAL (1)")

    @staticmethod
    def regions(items: Any, field: str) -> list[Region]:
        """Regions as sent, by the rule model output is parsed with (finite, x1 < x2, y1 < y2):
        whatever ``parse_regions`` accepts is accepted here, so a trainer never loses a sample."""
        out = []
        for i, r in enumerate(items):
            problem = region_problem(r.x1, r.y1, r.x2, r.y2)
            if problem is not None:
                raise InvalidArgument(f"{field}regions[{i}]: {problem}")
            out.append(Region(r.x1, r.y1, r.x2, r.y2, r.label or None))
        return out

    def _need_engine(self) -> AsyncEngine:
        if self.engine is None:
            raise RuntimeError("this server has no model loaded for that role")
        return self.engine

    # ------------------------------------------------------------------------------- prepare

    # Each prepare_* validates its request completely and cheaply (image headers only) and
    # returns the heavy part - decoding, evidence, resizing - as a function run later in a
    # worker thread, so a batch is rejected before any work and then pipelined item by item.

    def prepare_perceive(self, req: pb.PerceiveRequest, field: str) -> Callable[[], Prepared]:
        question = self.question(req.question, f"{field}question")
        sampling = self.sampling(req.sampling, f"{field}sampling", self.config.perceive_max_tokens)
        image = self.image(req.image, f"{field}image")
        structured = req.structured or self.config.structured_perceiver
        schema = BBOX_LIST_SCHEMA if structured else None
        variant = self.variant(req.variant, f"{field}variant")

        def build() -> Prepared:
            # The cached resize is already at the target size, so resizing it again is a no-op.
            resized = self.source(image, req.image, f"{field}image").resized()
            chat = perceiver_request(resized, question, self.bounds, variant)
            return Prepared(chat, sampling, {"schema": schema})

        return build

    def reason_preparer(self, images: Sequence[bytes]) -> Callable[[pb.ReasonRequest, str], Callable[[], Prepared]]:
        """``prepare_reason`` for the items of one ReasonBatch, whose ``image_index`` names one of
        the batch's shared ``images``."""
        return lambda req, field: self.prepare_reason(req, field, images)

    @staticmethod
    def reason_image(req: pb.ReasonRequest, field: str, images: Sequence[bytes]) -> tuple[bytes, str]:
        """The request's image and the field that names it: its own ``image``, or the batch's
        ``images[image_index]``. A wrong index is the item's own fault (``ItemInvalid``: in a
        batch it fails alone, as invalid regions do)."""
        if not req.HasField("image_index"):
            return req.image, f"{field}image"
        k = req.image_index
        problem = ("set together with image; send one of them" if req.image
                   else None if k < len(images)
                   else f"{k} is out of range: the call has {len(images)} shared images"
                   + ("" if images else " (ReasonBatchRequest.images; a single Reason call has none)"))
        if problem is not None:
            message = f"{field}image_index: {problem}"
            raise ItemInvalid(message, pb.ReasonResult(id=req.id, error=message))
        return images[k], f"images[{k}]"

    def prepare_reason(self, req: pb.ReasonRequest, field: str, images: Sequence[bytes] = ()) -> Callable[[], Prepared]:
        question = self.question(req.question, f"{field}question")
        form = self.form(req.answer_form, f"{field}answer_form")
        sampling = self.sampling(req.sampling, f"{field}sampling", self.config.reason_max_tokens)
        try:
            regions = self.regions(req.regions, field)
        except InvalidArgument as e:  # one degenerate item must not cost its batch
            raise ItemInvalid(str(e), pb.ReasonResult(id=req.id, error=str(e))) from None
        data, image_field = self.reason_image(req, field, images)
        image = self.image(data, image_field)
        variant = self.variant(req.variant, f"{field}variant")

        def build() -> Prepared:
            started = time.perf_counter()
            source = self.source(image, data, image_field)
            chat, evidence = self.evidence(source, regions, question, form, variant)
            return Prepared(chat, sampling, {"evidence": evidence, "evidence_s": time.perf_counter() - started})

        return build

    def prepare_verify(self, req: pb.VerifyRequest, field: str) -> Callable[[], Prepared]:
        question = self.question(req.question, f"{field}question")
        if not req.ground_truth.strip():
            raise InvalidArgument(f"{field}ground_truth: empty")
        chat = verifier_request(question, req.ground_truth, req.answer)
        prepared = Prepared(chat, Sampling(temperature=0.0, max_tokens=self.config.verify_max_tokens), {})
        return lambda: prepared

    # ----------------------------------------------------------------------------------- run

    async def _generate(self, role: str, prepared: Prepared) -> GenerationOut:
        out = await self._need_engine().generate(prepared.chat, prepared.sampling, prepared.extra.get("schema"))
        self._observe(role, prepared, out)
        return out

    async def _stream(self, role: str, prepared: Prepared) -> AsyncIterator[str | GenerationOut]:
        """``_generate`` streamed: text deltas, then the ``GenerationOut`` (same metrics)."""
        async with contextlib.aclosing(self._need_engine().stream(
                prepared.chat, prepared.sampling, prepared.extra.get("schema"))) as items:
            async for item in items:
                if isinstance(item, GenerationOut):
                    self._observe(role, prepared, item)
                yield item

    @staticmethod
    def _observe(role: str, prepared: Prepared, out: GenerationOut) -> None:
        metrics.QUEUE_LATENCY.labels(role).observe(out.queue_s)
        metrics.ENGINE_LATENCY.labels(role).observe(out.engine_s)
        metrics.TOKENS.labels(role).inc(sum(c.num_tokens for c in out.completions))
        metrics.IMAGES.labels(role).inc(len(prepared.chat.images))

    @staticmethod
    def _completions(out: GenerationOut) -> list[pb.Completion]:
        return [pb.Completion(text=c.text, num_tokens=c.num_tokens, finish_reason=c.finish_reason)
                for c in out.completions]

    async def run_perceive(self, req: pb.PerceiveRequest, prepared: Prepared, started: float) -> pb.PerceiveResult:
        out = await self._generate("perceiver", prepared)
        regions = [
            pb.RegionList(regions=[region_to_pb(r) for r in parse_regions(c.text)])
            for c in out.completions
        ]
        return pb.PerceiveResult(
            id=req.id, completions=self._completions(out), regions=regions, prompt_tokens=out.prompt_tokens,
            timings=pb.Timings(queue_ms=_ms(out.queue_s), engine_ms=_ms(out.engine_s),
                               total_ms=_ms(time.perf_counter() - started)),
        )

    async def run_reason(self, req: pb.ReasonRequest, prepared: Prepared, started: float) -> pb.ReasonResult:
        return self._reason_result(req, prepared, await self._generate("reasoner", prepared), started)

    def _reason_result(
        self, req: pb.ReasonRequest, prepared: Prepared, out: GenerationOut, started: float
    ) -> pb.ReasonResult:
        evidence = prepared.extra["evidence"]
        return pb.ReasonResult(
            id=req.id, completions=self._completions(out),
            answers=[extract_answer(c.text) for c in out.completions],
            with_evidence=evidence.with_evidence, num_crops=evidence.num_crops, prompt_tokens=out.prompt_tokens,
            timings=pb.Timings(queue_ms=_ms(out.queue_s), engine_ms=_ms(out.engine_s),
                               total_ms=_ms(time.perf_counter() - started),
                               evidence_ms=_ms(prepared.extra["evidence_s"])),
        )

    async def run_verify(self, req: pb.VerifyRequest, prepared: Prepared, started: float) -> pb.VerifyResult:
        out = await self._generate("verifier", prepared)
        reply = out.completions[0].text
        return pb.VerifyResult(
            id=req.id, correct=verifier_says_yes(reply), reply=reply,
            timings=pb.Timings(queue_ms=_ms(out.queue_s), engine_ms=_ms(out.engine_s),
                               total_ms=_ms(time.perf_counter() - started)),
        )

    async def batch(
        self,
        requests: list[Any],
        prepare: Callable[[Any, str], Callable[[], Prepared]],
        run: Callable[[Any, Prepared, float], Awaitable[Any]],
        single: bool = False,
    ) -> list[Any]:
        """Validate every item, then decode and generate each item as soon as it is ready."""
        return await self.run_planned(requests, self.plan(requests, prepare, single), run, single)

    @staticmethod
    def plan(requests: list[Any], prepare: Callable[[Any, str], Callable[[], Prepared]],
             single: bool = False) -> list[Callable[[], Prepared] | ItemInvalid]:
        """Validate every item - fields, sampling, image headers, question length - without
        decoding anything: cheap enough to run before admission, so a bad request is
        INVALID_ARGUMENT (never retried) whatever the load, not RESOURCE_EXHAUSTED."""
        return [_builder(prepare, r, "" if single else f"requests[{i}].", single) for i, r in enumerate(requests)]

    async def run_planned(
        self,
        requests: list[Any],
        builders: list[Callable[[], Prepared] | ItemInvalid],
        run: Callable[[Any, Prepared, float], Awaitable[Any]],
        single: bool = False,
    ) -> list[Any]:
        """Decode and generate each planned item as soon as it is ready: the engine starts on
        the first item while later images are still being cropped."""
        started = time.perf_counter()

        async def one(request: Any, build: Callable[[], Prepared] | ItemInvalid, field: str) -> Any:
            if isinstance(build, ItemInvalid):
                return build.result
            prepared = await asyncio.get_running_loop().run_in_executor(self._prepare_pool, build)
            try:
                return await run(request, prepared, started)
            except Exception as e:
                if not vllm_client_error(e):
                    raise
                # vLLM refused the request as the client's (e.g. question + image tokens over
                # max_model_len): INVALID_ARGUMENT naming the item, never INTERNAL.
                raise InvalidArgument(f"{field.rstrip('.') or 'request'}: {e}") from None

        try:
            async with asyncio.TaskGroup() as group:
                tasks = [group.create_task(one(r, b, "" if single else f"requests[{i}]."))
                         for i, (r, b) in enumerate(zip(requests, builders, strict=True))]
        except BaseExceptionGroup as eg:  # one failed item fails the call; the rest were cancelled
            raise eg.exceptions[0] from None
        return [t.result() for t in tasks]

    async def perceive(self, req: pb.PerceiveRequest) -> pb.PerceiveResult:
        [result] = await self.batch([req], self.prepare_perceive, self.run_perceive, single=True)
        return result

    async def reason(self, req: pb.ReasonRequest) -> pb.ReasonResult:
        [result] = await self.batch([req], self.prepare_reason, self.run_reason, single=True)
        return result

    async def verify(self, req: pb.VerifyRequest) -> pb.VerifyResult:
        [result] = await self.batch([req], self.prepare_verify, self.run_verify, single=True)
        return result

    async def reason_stream(self, req: pb.ReasonRequest) -> AsyncIterator[str | pb.ReasonResult]:
        """``reason`` streamed: the completion's text deltas as generated, then the same
        ``ReasonResult`` (one completion; ``sampling.n`` must be 1)."""
        started = time.perf_counter()
        build = self.prepare_reason(req, "")
        if req.sampling.HasField("n") and req.sampling.n != 1:
            raise InvalidArgument(f"sampling.n: a streamed reply has one completion, got {req.sampling.n}")
        prepared = await asyncio.get_running_loop().run_in_executor(self._prepare_pool, build)
        try:
            async with contextlib.aclosing(self._stream("reasoner", prepared)) as items:
                async for item in items:
                    yield self._reason_result(req, prepared, item, started) if isinstance(item, GenerationOut) else item
        except Exception as e:
            if not vllm_client_error(e):
                raise
            raise InvalidArgument(f"request: {e}") from None  # as in batch: the client's fault


def _builder(prepare: Callable[[Any, str], Callable[[], Prepared]], request: Any, field: str,
             single: bool) -> Callable[[], Prepared] | ItemInvalid:
    """``prepare(request, field)``, or in a batch the item's own failure (``ItemInvalid``)."""
    try:
        return prepare(request, field)
    except ItemInvalid as e:
        if single:
            raise
        return e


class RoleBackend(Protocol):
    """Where the gateway sends perceive and reason calls: local handlers or a remote server."""

    async def perceive(self, req: pb.PerceiveRequest) -> pb.PerceiveResult: ...

    async def reason(self, req: pb.ReasonRequest) -> pb.ReasonResult: ...

    def reason_stream(self, req: pb.ReasonRequest) -> AsyncIterator[str | pb.ReasonResult]:
        """Text deltas of the one completion as generated, then the ``ReasonResult``."""
        ...


async def answer(
    req: pb.AnswerRequest, handlers: Handlers, perceiver: RoleBackend, reasoner: RoleBackend
) -> pb.AnswerResponse:
    """``P2R.Answer``: perceive, then reason on the evidence (built by the reasoner role from
    the image and the regions), exactly the flow of the method notes."""
    async with contextlib.aclosing(answer_events(req, handlers, perceiver, reasoner, stream=False)) as events:
        async for event in events:
            response = event.response
    return response


def validate_answer(req: pb.AnswerRequest, handlers: Handlers) -> None:
    """Every check of an Answer request that needs no decoding: question, form, variant, the
    image's size, header, pixels and aspect, and both stages' sampling, named by the Answer's own
    fields (``perceive_sampling.*``, ``reason_sampling.*``). Every entry point (gRPC Answer and
    AnswerStream, HTTP /v1/answer, the OpenAI route) runs it before admission, so a bad request
    is INVALID_ARGUMENT under any load, never RESOURCE_EXHAUSTED (which clients retry), and the
    reasoner's sampling is refused before the perceiver has generated; ``answer_events`` relies
    on it."""
    handlers.question(req.question, "question")
    handlers.form(req.answer_form, "answer_form")
    handlers.variant(req.variant, "variant")
    handlers.image(req.image, "image")
    stages = (("perceive_sampling", handlers.config.perceive_max_tokens),
              ("reason_sampling", handlers.config.reason_max_tokens))
    for name, max_tokens in stages:
        params = getattr(req, name)
        if params.HasField("n") and params.n != 1:
            raise InvalidArgument(f"{name}.n: Answer returns one answer; use Perceive/Reason for n > 1")
        handlers.sampling(params, name, max_tokens)


async def answer_events(
    req: pb.AnswerRequest, handlers: Handlers, perceiver: RoleBackend, reasoner: RoleBackend, stream: bool = True
) -> AsyncIterator[pb.AnswerEvent]:
    """The one P2R answer flow. ``stream``: ``P2R.AnswerStream``'s events - the regions as soon
    as the perceiver is done, the reasoner's text deltas as generated, then the response.
    Otherwise only the response, from a unary reason call (``answer``). Closing the iterator
    early (client gone) aborts the engine request in progress. Every caller (gRPC Answer and
    AnswerStream, HTTP /v1/answer, the OpenAI route) has run ``validate_answer`` already, before
    admission, so the question is not tokenized twice."""
    started = time.perf_counter()
    perceived = await perceiver.perceive(pb.PerceiveRequest(
        id=req.id, image=req.image, question=req.question, sampling=req.perceive_sampling, variant=req.variant,
        structured=req.structured_perceiver))
    perceive_done = time.perf_counter()
    regions = perceived.regions[0].regions if perceived.regions else []
    perceiver_output = perceived.completions[0].text
    if stream:
        yield pb.AnswerEvent(regions=pb.AnswerRegions(regions=regions, perceiver_output=perceiver_output,
                                                      perceive_ms=_ms(perceive_done - started)))
    reason_req = pb.ReasonRequest(
        id=req.id, image=req.image, question=req.question, answer_form=req.answer_form, regions=regions,
        sampling=req.reason_sampling, variant=req.variant)
    if stream:
        async with contextlib.aclosing(reasoner.reason_stream(reason_req)) as items:
            async for item in items:
                if isinstance(item, str):
                    yield pb.AnswerEvent(delta=item)
                else:
                    reasoned = item
    else:
        reasoned = await reasoner.reason(reason_req)
    done = time.perf_counter()
    output = reasoned.completions[0].text
    evidence_ms = reasoned.timings.evidence_ms
    yield pb.AnswerEvent(response=pb.AnswerResponse(
        id=req.id, regions=regions, perceiver_output=perceiver_output,
        answer=extract_answer(output), reasoning=extract_reasoning(output), reasoner_output=output,
        with_evidence=reasoned.with_evidence, num_crops=reasoned.num_crops,
        finish_reason=reasoned.completions[0].finish_reason,
        timings=pb.AnswerTimings(
            perceive_ms=_ms(perceive_done - started), evidence_ms=evidence_ms,
            reason_ms=max(0.0, _ms(done - perceive_done) - evidence_ms), total_ms=_ms(done - started)),
        usage=pb.AnswerUsage(
            perceive_prompt_tokens=perceived.prompt_tokens,
            perceive_completion_tokens=perceived.completions[0].num_tokens,
            reason_prompt_tokens=reasoned.prompt_tokens, reason_completion_tokens=reasoned.completions[0].num_tokens),
    ))

"""The three evaluation modes over one of two backends: in-process vLLM engines or role services.

The generation settings are p2r-method.md §Evaluation and live here only: temperature 0,
top_p 1, repetition penalty 1.05, eval pixel bounds; ``default`` answers directly (16 new
tokens), ``thinking`` uses its own step-by-step prompt (1,024), ``p2r`` perceives (256) then
reasons (1,024) with the with-evidence prompt only when evidence was built. The prompts are
``p2r.core.prompts``' evaluation strings. Every backend returns the same ``Output`` per sample,
so results are comparable across backends.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

from PIL import Image

from p2r.core import prompts
from p2r.core.bbox import Region
from p2r.core.errors import UserError
from p2r.core.flow import P2RConfig, Question, verifier_request
from p2r.core.flow import run_p2r as flow_run_p2r
from p2r.core.generation import ChatRequest, Generator, Sampling
from p2r.core.grading import VerifyRequest, verifier_says_yes
from p2r.core.images import EVAL_BOUNDS, PixelBounds, resize_for_model
from p2r.eval.benchmarks import EvalSample

if TYPE_CHECKING:
    from p2r.services.client import ServiceVerifier

Mode = Literal["default", "thinking", "p2r"]
MODES: tuple[Mode, ...] = ("default", "thinking", "p2r")
REPETITION_PENALTY = 1.05
DEFAULT_MAX_TOKENS = 16
THINKING_MAX_TOKENS = 1024
PERCEIVE_MAX_TOKENS = 256
REASON_MAX_TOKENS = 1024
IN_PROCESS_MODES: tuple[Mode, ...] = ("default", "thinking")
NEEDS_MODEL = ("--mode default and --mode thinking run in process: give --model, not service endpoints "
               "(the services expose only the P2R prompts)")
"""The services build only the P2R prompts; the baseline modes' prompts need in-process engines."""


@dataclass(frozen=True)
class EvalSettings:
    """One evaluation's generation settings; the defaults reproduce the reference evaluation.
    Smaller token budgets are for smoke runs and are recorded in ``summary.json``."""

    mode: Mode = "p2r"
    bounds: PixelBounds = EVAL_BOUNDS
    default_max_tokens: int = DEFAULT_MAX_TOKENS
    thinking_max_tokens: int = THINKING_MAX_TOKENS
    perceive_max_tokens: int = PERCEIVE_MAX_TOKENS
    reason_max_tokens: int = REASON_MAX_TOKENS

    def sampling(self, max_tokens: int) -> Sampling:
        return Sampling(temperature=0.0, top_p=1.0, max_tokens=max_tokens, repetition_penalty=REPETITION_PENALTY)

    def as_dict(self) -> dict[str, Any]:
        return {"mode": self.mode, "min_pixels": self.bounds.min_pixels, "max_pixels": self.bounds.max_pixels,
                "temperature": 0.0, "top_p": 1.0, "repetition_penalty": REPETITION_PENALTY,
                "max_tokens": self.max_tokens()}

    def max_tokens(self) -> dict[str, int]:
        if self.mode == "default":
            return {"answer": self.default_max_tokens}
        if self.mode == "thinking":
            return {"answer": self.thinking_max_tokens}
        return {"perceive": self.perceive_max_tokens, "answer": self.reason_max_tokens}


@dataclass
class Output:
    """What a mode produced for one sample: the answering prompt and reply, and in p2r mode
    the perceiver's raw output and the regions parsed from it."""

    prompt: str
    reply: str
    perceiver_output: str | None = None
    regions: list[Region] = field(default_factory=list)
    with_evidence: bool = False


class Backend(Protocol):
    settings: EvalSettings

    def run(self, samples: Sequence[EvalSample], images: Sequence[Image.Image]) -> list[Output]: ...

    def verifier(self) -> Any | None: ...


def direct_prompt(sample: EvalSample) -> str:
    return prompts.direct_text(sample.question, sample.form)


def thinking_prompt(sample: EvalSample) -> str:
    return prompts.thinking_text(sample.question, sample.form)


class EngineBackend:
    """In-process generators (vLLM ``OfflineEngine``s): one node, or one Ray worker."""

    def __init__(self, settings: EvalSettings, reasoner: Generator | None, perceiver: Generator | None = None,
                 verifier: Generator | None = None) -> None:
        self.settings, self.reasoner = settings, reasoner
        self.perceiver = perceiver or reasoner
        self._verifier = verifier

    def run(self, samples: Sequence[EvalSample], images: Sequence[Image.Image]) -> list[Output]:
        s = self.settings
        if self.reasoner is None:
            raise RuntimeError("this backend was built for grading only")
        if s.mode == "p2r":
            config = P2RConfig(bounds=s.bounds, variant="eval", perceive=s.sampling(s.perceive_max_tokens),
                               reason=s.sampling(s.reason_max_tokens))
            results = flow_run_p2r([Question(im, x.question, x.form) for x, im in zip(samples, images, strict=True)],
                                   self.perceiver, self.reasoner, config)
            return [Output(prompts.reasoner_text(x.question, x.form, with_evidence=r.evidence.with_evidence,
                                                 variant="eval"),
                           r.reasoner_output, r.perceiver_output, r.regions, r.evidence.with_evidence)
                    for x, r in zip(samples, results, strict=True)]
        build, max_tokens = ((direct_prompt, s.default_max_tokens) if s.mode == "default"
                             else (thinking_prompt, s.thinking_max_tokens))
        texts = [build(x) for x in samples]
        requests = [ChatRequest(prompts.chat_messages(t, 1), [resize_for_model(im, s.bounds)])
                    for t, im in zip(texts, images, strict=True)]
        replies = self.reasoner.generate(requests, s.sampling(max_tokens))
        return [Output(t, r[0]) for t, r in zip(texts, replies, strict=True)]

    def verifier(self) -> EngineVerifier | None:
        return EngineVerifier(self._verifier) if self._verifier is not None else None


class EngineVerifier:
    """The verifier model in process, behind ``grading.FreeFormVerifier``."""

    def __init__(self, generator: Generator) -> None:
        self.generator = generator

    def verify_batch(self, requests: Sequence[VerifyRequest]) -> list[bool | None]:
        replies = self.generator.generate([verifier_request(r.question, r.ground_truth, r.answer) for r in requests],
                                          Sampling(temperature=0.0, max_tokens=prompts.VERIFIER_MAX_TOKENS))
        return [verifier_says_yes(r[0]) for r in replies]


class ServiceBackend:
    """Deployed role services over gRPC, ``p2r`` mode (the baseline modes' prompts are not
    the services', so they run in process). The services' own pixel bounds apply:
    deploy them with the evaluation's ``max_pixels`` to reproduce the reference numbers."""

    def __init__(self, settings: EvalSettings, reasoner: str, perceiver: str | None = None,
                 verifier: str | None = None, timeout_s: float = 3600.0) -> None:
        from p2r.services.client import Client

        self.settings = settings
        self.reasoner = Client(reasoner, timeout_s=timeout_s)
        self.perceiver = Client(perceiver, timeout_s=timeout_s) if perceiver else self.reasoner
        self.verifier_client = Client(verifier, timeout_s=timeout_s) if verifier else None

    def run(self, samples: Sequence[EvalSample], images: Sequence[Image.Image]) -> list[Output]:
        from p2r.services.protocol import FORM_TO_PB, region_from_pb, region_to_pb, sampling_to_pb
        from p2r.v1 import p2r_pb2 as pb

        s = self.settings
        if s.mode != "p2r":
            raise UserError(NEEDS_MODEL)
        data = [image_bytes(x) for x in samples]
        results = self.perceiver.perceive_batch([
            pb.PerceiveRequest(id=x.uid, image=d, question=x.question, variant=pb.PROMPT_VARIANT_EVAL,
                               sampling=sampling_to_pb(s.sampling(s.perceive_max_tokens)))
            for x, d in zip(samples, data, strict=True)])
        perceived = [r.completions[0].text for r in results]
        regions = [[region_from_pb(g) for g in r.regions[0].regions] if r.regions else [] for r in results]
        reasoned = self.reasoner.reason_batch([
            pb.ReasonRequest(id=x.uid, image=d, question=x.question, answer_form=FORM_TO_PB[x.form],
                             variant=pb.PROMPT_VARIANT_EVAL, sampling=sampling_to_pb(s.sampling(s.reason_max_tokens)),
                             regions=[region_to_pb(r) for r in rs])
            for x, d, rs in zip(samples, data, regions, strict=True)])
        # An item the reasoner rejected alone (``error``) has no reply: scored as no answer.
        return [Output(prompts.reasoner_text(x.question, x.form, with_evidence=r.with_evidence, variant="eval"),
                       r.completions[0].text if r.completions else "", p, rs, r.with_evidence)
                for x, r, p, rs in zip(samples, reasoned, perceived, regions, strict=True)]

    def verifier(self) -> ServiceVerifier | None:
        """The verifier service, one batch RPC per call whose failure fails the run."""
        from p2r.services.client import ServiceVerifier

        return ServiceVerifier(self.verifier_client) if self.verifier_client is not None else None


def image_bytes(sample: EvalSample) -> bytes:
    if sample.image.data is not None:
        return sample.image.data
    assert sample.image.path is not None
    return sample.image.path.read_bytes()


# ------------------------------------------------------------------------------ construction


@dataclass(frozen=True)
class BackendSpec:
    """Everything needed to build a backend in another process (a Ray worker): model URIs are
    resolved there, so workers on other nodes fetch checkpoints themselves."""

    settings: EvalSettings
    model: str | None = None
    perceiver_model: str | None = None
    verifier_model: str | None = None
    reasoner_endpoint: str | None = None
    perceiver_endpoint: str | None = None
    verifier_endpoint: str | None = None
    limits: Any = None  # p2r.services.engine.EngineLimits
    seed: int = 0

    def __post_init__(self) -> None:
        if (self.model is None) == (self.reasoner_endpoint is None):
            raise UserError("give either --model (in-process engines) or --reasoner-endpoint (role services)")

    def check_local_models(self) -> None:
        """Fail fast, in the driver, on a local checkpoint that is not there: a Ray worker would
        report it as a remote traceback after the cluster started."""
        from p2r.services.checkpoints import REMOTE_SCHEMES, local_path, verify_checkpoint_dir

        for uri in (self.model, self.perceiver_model, self.verifier_model):
            if uri is not None and not uri.startswith(REMOTE_SCHEMES):
                verify_checkpoint_dir(local_path(uri))

    def build(self, answer: bool = True, verifier: bool = True) -> EngineBackend | ServiceBackend:
        """Engines for the models (one engine when two roles name the same model).
        ``verifier=False`` skips the verifier (Ray workers: the driver grades); ``answer=False``
        builds the verifier alone (the Ray driver)."""
        if self.reasoner_endpoint is not None:
            return ServiceBackend(self.settings, self.reasoner_endpoint, self.perceiver_endpoint,
                                  self.verifier_endpoint if verifier else None)
        from p2r.services.checkpoints import DEFAULT_CACHE, resolve_checkpoint
        from p2r.services.engine import EngineLimits, OfflineEngine

        cache = Path(os.environ.get("P2R_CHECKPOINT_CACHE", DEFAULT_CACHE))
        limits = self.limits or EngineLimits(max_model_len=16384, max_num_seqs=16)
        engines: dict[str, OfflineEngine] = {}

        def engine(uri: str | None) -> OfflineEngine | None:
            if uri is None:
                return None
            if uri not in engines:
                engines[uri] = OfflineEngine(str(resolve_checkpoint(uri, cache)), limits, self.seed)
            return engines[uri]

        assert self.model is not None
        reasoner = engine(self.model) if answer else None
        perceiver = engine(self.perceiver_model) if answer and self.settings.mode == "p2r" else None
        judge = engine(self.verifier_model) if verifier else None
        return EngineBackend(self.settings, reasoner, perceiver, judge)

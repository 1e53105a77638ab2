"""Role-aware rewards of PRA-GRPO (p2r-method.md §Rewards), computed against live services.

A reward is a float, or ``None`` when it could not be computed (a service still failing after
the client library's retries, ``services.client.RetryPolicy`` with ``reward_retries`` retries):
such a sample is dropped from the step and counted - never silently scored 0. Nothing here
retries on top of the client.
"""

from __future__ import annotations

import importlib
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import grpc

from p2r.core.bbox import Region, parse_regions
from p2r.core.errors import UserError
from p2r.core.grading import GradeItem, grade_batch
from p2r.core.images import encode_image
from p2r.core.rewards import perceiver_penalty
from p2r.data.dataset import Sample
from p2r.services.client import Client, RetryPolicy, ServiceVerifier
from p2r.services.protocol import FORM_TO_PB, region_to_pb
from p2r.v1 import p2r_pb2 as pb

log = logging.getLogger("p2r.train.rewards")


@dataclass
class RewardStats:
    """What the reward phase did in one step, for the step's metrics."""

    service_calls: int = 0
    service_items: int = 0
    deduplicated: int = 0
    dropped: int = 0
    penalised: int = 0
    seconds: float = 0.0
    extra: dict[str, float] = field(default_factory=dict)


def service_client(endpoint: str, cfg: Any) -> Client:
    """A client of a reward service under the one retry policy, with ``reward_retries`` retries;
    credentials (TLS CA, API key) come from the pod's Secrets via ``P2R_CLIENT_*`` (services/security.py).
    The server's batch limits are checked now, not at the first step."""
    client = Client(endpoint, timeout_s=cfg.service_timeout_s, retry=RetryPolicy(max_attempts=cfg.reward_retries + 1))
    check_batch_limits(client, endpoint, cfg.reward_batch_size)
    return client


def check_batch_limits(client: Client, endpoint: str, batch_size: int) -> None:
    """``reward_batch_size`` must fit the server's ``max_batch_items`` and its admission capacity
    (``Admin.Status``): a larger batch is refused every time (INVALID_ARGUMENT), so every reward
    would be dropped. A server that cannot be reached yet is left to the calls' own retries."""
    try:
        status = client.status()
    except grpc.RpcError as e:
        log.warning("%s: limits not checked at start-up (%s: %s)", endpoint, e.code().name, e.details())
        return
    for limit, value in (("max_batch_items", status.max_batch_items), ("max_in_flight", status.max_in_flight)):
        if value and batch_size > value:
            raise UserError(f"reward_batch_size={batch_size} is over {endpoint}'s {limit}={value}; "
                            f"lower reward_batch_size or raise the server's {limit}")


def batched_calls(
    call: Callable[[list[Any]], list[Any]], items: list[Any], batch_size: int, concurrency: int,
    stats: RewardStats,
) -> list[Any | None]:
    """Send ``items`` as batch RPCs, ``concurrency`` at a time. A batch still failing after the
    client's retries is given up: its items are None (logged), and the step goes on."""
    chunks = [items[i : i + batch_size] for i in range(0, len(items), batch_size)]

    def one(chunk: list[Any]) -> list[Any | None]:
        try:
            return list(call(chunk))
        except grpc.RpcError as e:
            log.warning("batch of %d failed for good (%s: %s)", len(chunk), e.code().name, e.details())
            return [None] * len(chunk)

    with ThreadPoolExecutor(max(1, min(concurrency, len(chunks)))) as pool:
        results = list(pool.map(one, chunks))
    stats.service_calls += len(chunks)
    stats.service_items += len(items)
    return [r for chunk in results for r in chunk]


def grade(
    items: list[tuple[Sample, str | None]], verifier: Client | None, cfg: Any, stats: RewardStats
) -> list[float | None]:
    """Grade replies (a missing reply stays None) with ``grade_batch``: rules for mca/na, the
    verifier service for free_form."""
    present = [i for i, (_, reply) in enumerate(items) if reply is not None]
    graded = grade_batch(
        [GradeItem(items[i][1] or "", items[i][0].ground_truth, items[i][0].form, items[i][0].question)
         for i in present],
        ServiceVerifier(verifier, lambda call, requests: batched_calls(
            call, requests, cfg.reward_batch_size, cfg.reward_concurrency, stats)) if verifier is not None else None,
    )
    out: list[float | None] = [None] * len(items)
    for i, verdict in zip(present, graded, strict=True):
        out[i] = None if verdict is None else float(verdict)
    return out


class ImageBytes:
    """Encoded bytes of each sample's image, made once per run (PNG: lossless)."""

    def __init__(self) -> None:
        self._cache: dict[int, bytes] = {}

    def __call__(self, sample: Sample) -> bytes:
        if sample.index not in self._cache:
            ref = sample.images[0]
            self._cache[sample.index] = (ref.data if ref.data is not None
                                         else ref.path.read_bytes() if ref.path is not None
                                         else encode_image(sample.load_image()))
        return self._cache[sample.index]


class PerceiverReward:
    """Stage 1: penalties first, then the frozen reasoner answers on the evidence each bbox set
    produces (temperature 0), graded by rule or by the verifier. Identical reasoner inputs
    within a step (same sample, same boxes - labels are not drawn) are sent once."""

    def __init__(self, cfg: Any) -> None:
        self.cfg = cfg
        self.reasoner = service_client(cfg.reasoner_endpoint, cfg)
        self.verifier = service_client(cfg.verifier_endpoint, cfg) if cfg.verifier_endpoint else None
        self.images = ImageBytes()

    def __call__(self, samples: Sequence[Sample], responses: Sequence[Sequence[str]]) -> tuple[
            list[list[float | None]], RewardStats]:
        started = time.perf_counter()
        stats = RewardStats()
        rewards: list[list[float | None]] = [[None] * len(r) for r in responses]
        unique: dict[tuple[int, tuple[tuple[float, ...], ...]], int] = {}
        calls: list[tuple[Sample, list[Region]]] = []
        slots: list[tuple[int, int, int]] = []  # (sample i, rollout j, unique call k)
        for i, (sample, texts) in enumerate(zip(samples, responses, strict=True)):
            for j, text in enumerate(texts):
                regions = parse_regions(text)
                if perceiver_penalty(regions) is not None:
                    rewards[i][j] = 0.0
                    stats.penalised += 1
                    continue
                key = (i, tuple(r.coords for r in regions))
                if key not in unique:
                    unique[key] = len(calls)
                    calls.append((sample, regions))
                else:
                    stats.deduplicated += 1
                slots.append((i, j, unique[key]))
        params = pb.SamplingParams(temperature=0.0, max_tokens=self.cfg.frozen_max_tokens)
        requests = [pb.ReasonRequest(image=self.images(s), question=s.question, answer_form=FORM_TO_PB[s.form],
                                     regions=[region_to_pb(r) for r in regions], sampling=params)
                    for s, regions in calls]
        stats.extra["reasoner_requests"] = len(requests)
        results = batched_calls(self.reasoner.reason_batch, requests, self.cfg.reward_batch_size,
                                self.cfg.reward_concurrency, stats)
        # An item the reasoner refused alone (``error``) cannot be scored: dropped, not 0.
        graded = grade([(s, None if res is None or res.error else res.completions[0].text) for (s, _), res
                        in zip(calls, results, strict=True)], self.verifier, self.cfg, stats)
        for i, j, k in slots:
            rewards[i][j] = graded[k]
        stats.dropped = sum(r is None for row in rewards for r in row)
        stats.seconds = time.perf_counter() - started
        return rewards, stats


class ReasonerReward:
    """Stage 2: grade the policy's own answers (the frozen perceiver's boxes built its prompt)."""

    def __init__(self, cfg: Any) -> None:
        self.cfg = cfg
        self.verifier = service_client(cfg.verifier_endpoint, cfg) if cfg.verifier_endpoint else None

    def __call__(self, samples: Sequence[Sample], responses: Sequence[Sequence[str]]) -> tuple[
            list[list[float | None]], RewardStats]:
        started = time.perf_counter()
        stats = RewardStats()
        flat = [(s, text) for s, texts in zip(samples, responses, strict=True) for text in texts]
        graded = grade(flat, self.verifier, self.cfg, stats)
        out, k = [], 0
        for texts in responses:
            out.append(graded[k : k + len(texts)])
            k += len(texts)
        stats.dropped = sum(r is None for r in graded)
        stats.seconds = time.perf_counter() - started
        return out, stats


class PerceiverCache:
    """The frozen perceiver's boxes for each sample, asked once per run (temperature 0)."""

    def __init__(self, cfg: Any) -> None:
        self.cfg = cfg
        self.client = service_client(cfg.perceiver_endpoint, cfg)
        self.images = ImageBytes()
        self.regions: dict[int, list[Region]] = {}
        self.calls = 0

    def get(self, samples: Sequence[Sample], stats: RewardStats) -> list[list[Region] | None]:
        missing = [s for s in samples if s.index not in self.regions]
        if missing:
            params = pb.SamplingParams(temperature=0.0, max_tokens=self.cfg.frozen_max_tokens)
            requests = [pb.PerceiveRequest(image=self.images(s), question=s.question, sampling=params)
                        for s in missing]
            results = batched_calls(self.client.perceive_batch, requests, self.cfg.reward_batch_size,
                                    self.cfg.reward_concurrency, stats)
            self.calls += len(missing)
            for s, res in zip(missing, results, strict=True):
                if res is not None:
                    self.regions[s.index] = parse_regions(res.completions[0].text)
        return [self.regions.get(s.index) for s in samples]


class PluginReward:
    """A user reward ``module:function(sample, response) -> float`` (for experiments and tests)."""

    def __init__(self, path: str) -> None:
        module, _, name = path.partition(":")
        if not module or not name:
            raise UserError(f"reward_plugin must look like 'package.module:function', got {path!r}")
        try:
            self.fn = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError) as e:
            raise UserError(f"reward_plugin {path!r} cannot be loaded: {e}") from None

    def __call__(self, samples: Sequence[Sample], responses: Sequence[Sequence[str]]) -> tuple[
            list[list[float | None]], RewardStats]:
        started = time.perf_counter()
        rewards = [[float(self.fn(s, t)) for t in texts] for s, texts in zip(samples, responses, strict=True)]
        return rewards, RewardStats(seconds=time.perf_counter() - started)

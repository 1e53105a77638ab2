"""Role-aware rewards of PRA-GRPO (p2r-method.md §Rewards), computed against live services.

A reward is a float, or ``None`` when it could not be computed: such a sample is dropped from
the step and counted - never silently scored 0. Nothing here retries on top of the client: a
reward client's ``services.client.RetryPolicy`` retries UNAVAILABLE ``reward_retries`` times and
waits out RESOURCE_EXHAUSTED (the service's admission is full, often with other ranks' or users'
work) with backoff until the step's deadline, ``reward_timeout_s``.

Under load nothing is lost quietly (issue 23):

- each rank keeps at most its share of a service's admission capacity in flight
  (``Admin.Status`` ``max_in_flight`` divided by ``WORLD_SIZE``), so the ranks together do not
  overrun it on their own;
- batches are cut by bytes as well as by items, well under the message limit, and a sample's
  image travels once per batch (``ReasonBatchRequest.images``), not once per region set;
- a step whose dropped share passes ``max_dropped_fraction`` raises ``RewardServiceError``
  naming the service and the gRPC status, and a service unreachable at start-up fails the run
  after ``service_wait_s``.
"""

from __future__ import annotations

import importlib
import logging
import os
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

import grpc

from p2r.core.bbox import Region, parse_regions
from p2r.core.errors import UserError
from p2r.core.grading import GradeItem, grade_batch
from p2r.core.images import encode_image
from p2r.core.rewards import perceiver_penalty
from p2r.data.dataset import Sample
from p2r.services.client import Client, RetryPolicy, ServiceVerifier
from p2r.services.protocol import FORM_TO_PB, MAX_MESSAGE_BYTES, region_to_pb
from p2r.v1 import p2r_pb2 as pb

log = logging.getLogger("p2r.train.rewards")

T = TypeVar("T")

ITEM_OVERHEAD_BYTES = 64
"""Protobuf framing of one repeated item (tag, length) with room to spare: batch sizes are
estimated from ``ByteSize()`` plus this, never under-counted."""


class RewardServiceError(UserError):
    """A reward service failed the run: unreachable at start-up, or too many of a step's rewards
    could not be computed. The message names the service's endpoint and the gRPC status, so
    the operator knows which service to look at (an exception on any rank aborts the job)."""


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
    failures: list[str] = field(default_factory=list)
    """Why items were dropped: "ENDPOINT Method: CODE: details", one per failed batch or item."""


def world_size() -> int:
    """Ranks sharing the services (torchrun's ``WORLD_SIZE``; 1 outside a distributed job)."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


@dataclass(frozen=True)
class SendLimits:
    """How one rank sends batch RPCs to one service."""

    batch_items: int
    concurrency: int
    batch_bytes: int


def send_limits(status: pb.StatusResponse | None, cfg: Any, ranks: int) -> SendLimits:
    """Items per batch, batches in flight and bytes per batch for one rank.

    The rank's share of the service's admission capacity is ``max_in_flight // ranks``: batches
    of at most that many items, and only as many in flight as fit in it, so the ranks' bursts
    together stay within what the service admits (what users send on top is waited out, see
    ``RetryPolicy.exhausted_until_deadline``). Behind a load-balanced Service, ``Status`` is one
    replica's, so the share is conservative. Bytes: ``reward_batch_bytes``, at most half the
    message limit - the smaller of this client's send limit (``MAX_MESSAGE_BYTES``) and the
    server's receive limit (``max_receive_bytes``, from its config)."""
    limit = MAX_MESSAGE_BYTES
    items, concurrency = cfg.reward_batch_size, cfg.reward_concurrency
    if status is not None:
        if status.max_receive_bytes:
            limit = min(limit, status.max_receive_bytes)
        if status.max_batch_items:
            items = min(items, status.max_batch_items)
        if status.max_in_flight:
            share = max(1, status.max_in_flight // ranks)
            items = min(items, share)
            concurrency = max(1, min(concurrency, share // items))
    return SendLimits(items, concurrency, max(1, min(cfg.reward_batch_bytes, limit // 2)))


def check_batch_limits(client: Client, endpoint: str, batch_size: int,
                       status: pb.StatusResponse | None = None) -> None:
    """``reward_batch_size`` must fit the server's ``max_batch_items`` and its admission capacity
    (``Admin.Status``): a larger batch is refused every time (INVALID_ARGUMENT), so every reward
    would be dropped. ``status``: one already fetched; otherwise it is asked for now."""
    if status is None:
        status = client.status()
    for limit, value in (("max_batch_items", status.max_batch_items), ("max_in_flight", status.max_in_flight)):
        if value and batch_size > value:
            raise UserError(f"reward_batch_size={batch_size} is over {endpoint}'s {limit}={value}; "
                            f"lower reward_batch_size or raise the server's {limit}")


def wait_for_service(client: Client, endpoint: str, wait_s: float) -> pb.StatusResponse | None:
    """The service's ``Admin.Status`` once it accepts a connection; a service that does not
    within ``wait_s`` (it may be starting) fails the run naming it, rather than letting every
    step drop its rewards. A service that connects but cannot report its limits (an error from
    Status) is used with the configured limits, with a warning."""
    try:
        client.wait_ready(wait_s)
    except grpc.FutureTimeoutError:
        raise RewardServiceError(
            f"reward service {endpoint} is unreachable: no connection within {wait_s:g} s (service_wait_s; "
            f"gRPC status UNAVAILABLE); is it running, and is the endpoint right?") from None
    try:
        return client.status(timeout_s=3)  # a connected server answers at once, whatever its load
    except grpc.RpcError as e:
        log.warning("%s: limits not checked at start-up (%s: %s)", endpoint, e.code().name, e.details())
        return None


class RewardService:
    """One reward service as one rank uses it: a client whose policy waits out admission until
    the call's deadline, the endpoint (for errors) and this rank's ``SendLimits``."""

    def __init__(self, endpoint: str, cfg: Any) -> None:
        self.endpoint = endpoint
        # Credentials (TLS CA, API key) come from the pod's Secrets via P2R_CLIENT_* (services/security.py).
        self.client = Client(endpoint, timeout_s=cfg.service_timeout_s, retry=RetryPolicy(
            max_attempts=cfg.reward_retries + 1, exhausted_until_deadline=True))
        status = wait_for_service(self.client, endpoint, cfg.service_wait_s)
        if status is not None:
            check_batch_limits(self.client, endpoint, cfg.reward_batch_size, status)
        self.limits = send_limits(status, cfg, world_size())
        log.info("%s: batches of <= %d items and <= %d bytes, %d in flight", endpoint,
                 self.limits.batch_items, self.limits.batch_bytes, self.limits.concurrency)


def cut_batches(items: Sequence[T], max_items: int, max_bytes: int, size: Callable[[T], int],
                shared: Callable[[T], tuple[Hashable, int]] | None = None) -> list[list[T]]:
    """Consecutive batches of at most ``max_items`` items and ``max_bytes`` bytes. ``size`` is
    an item's own bytes; ``shared`` its shared image (key, bytes), counted once per batch. An
    item larger than ``max_bytes`` alone is a batch of its own (the server's image limit bounds it)."""
    batches: list[list[T]] = []
    current: list[T] = []
    used, seen = 0, set()
    for item in items:
        ref = shared(item) if shared is not None else None
        cost = size(item) + (ref[1] if ref is not None and ref[0] not in seen else 0)
        if current and (len(current) >= max_items or used + cost > max_bytes):
            batches.append(current)
            current, used, seen = [], 0, set()
            cost = size(item) + (ref[1] if ref is not None else 0)
        current.append(item)
        used += cost
        if ref is not None:
            seen.add(ref[0])
    if current:
        batches.append(current)
    return batches


def message_size(message: Any) -> int:
    return int(message.ByteSize()) + ITEM_OVERHEAD_BYTES


def send_batches(service: RewardService, call: Callable[[list[Any], float], list[Any]], batches: list[list[Any]],
                 method: str, stats: RewardStats, deadline: float) -> list[Any | None]:
    """Send the batches, at most ``service.limits.concurrency`` at once, each with what is left
    of the step's ``deadline``. A batch still failing after the client's policy is given up: its
    items are None, and why (endpoint, method, status) is recorded in ``stats.failures``."""

    def one(batch: list[Any]) -> list[Any | None]:
        left = deadline - time.monotonic()
        try:
            if left <= 0:
                raise _Expired()
            return list(call(batch, left))
        except grpc.RpcError as e:
            why = f"{e.code().name}: {e.details()}"
        except _Expired:
            why = "DEADLINE_EXCEEDED: reward_timeout_s passed before the batch could be sent"
        stats.failures.append(f"{service.endpoint} {method}: {why}")
        log.warning("%s %s: batch of %d failed for good (%s)", service.endpoint, method, len(batch), why)
        return [None] * len(batch)

    with ThreadPoolExecutor(max(1, min(service.limits.concurrency, len(batches)))) as pool:
        results = list(pool.map(one, batches))
    stats.service_calls += len(batches)
    stats.service_items += sum(len(b) for b in batches)
    return [r for chunk in results for r in chunk]


class _Expired(Exception):
    pass


def batched_calls(service: RewardService, call: Callable[[list[Any], float], list[Any]], items: list[Any],
                  method: str, stats: RewardStats, deadline: float) -> list[Any | None]:
    """``items`` (self-contained requests) as batch RPCs cut by ``service.limits``."""
    limits = service.limits
    batches = cut_batches(items, limits.batch_items, limits.batch_bytes, message_size)
    return send_batches(service, call, batches, method, stats, deadline)


def check_dropped(what: str, dropped: int, total: int, stats: RewardStats, cfg: Any) -> None:
    """Fail the run when more than ``max_dropped_fraction`` of ``total`` rewards were dropped:
    the step would train on what little is left (or nothing) and the run would go on as if well."""
    if total and dropped / total > cfg.max_dropped_fraction:
        causes = list(dict.fromkeys(stats.failures))
        why = "; ".join(causes[:3]) + (f" (and {len(causes) - 3} more)" if len(causes) > 3 else "")
        raise RewardServiceError(
            f"{what}: {dropped} of {total} rewards could not be computed ({dropped / total:.0%}, over "
            f"max_dropped_fraction={cfg.max_dropped_fraction:g}): {why or 'no reply'}")


def grade(
    items: list[tuple[Sample, str | None]], verifier: RewardService | None, cfg: Any, stats: RewardStats,
    deadline: float,
) -> list[float | None]:
    """Grade replies (a missing reply stays None) with ``grade_batch``: rules for mca/na, the
    verifier service for free_form."""
    present = [i for i, (_, reply) in enumerate(items) if reply is not None]
    send = None
    if verifier is not None:
        v = verifier

        def send(call: Callable[..., list[Any]], requests: list[Any]) -> list[Any | None]:
            return batched_calls(v, lambda batch, left: call(batch, left), requests, "VerifyBatch", stats, deadline)

    graded = grade_batch(
        [GradeItem(items[i][1] or "", items[i][0].ground_truth, items[i][0].form, items[i][0].question)
         for i in present],
        ServiceVerifier(verifier.client, send) if verifier is not None else None,
    )
    out: list[float | None] = [None] * len(items)
    for i, verdict in zip(present, graded, strict=True):
        out[i] = None if verdict is None else float(verdict)
    return out


class ImageBytes:
    """Encoded bytes of each sample's image (PNG when it must be encoded: lossless), the most
    recently used kept within ``max_bytes``: re-reading a file is cheap, while keeping every
    file of the run cost 7-37 GB per rank at the reference sizes."""

    def __init__(self, max_bytes: int = 512 * 1024**2) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self._cache: OrderedDict[int, bytes] = OrderedDict()

    def __call__(self, sample: Sample) -> bytes:
        data = self._cache.get(sample.index)
        if data is not None:
            self._cache.move_to_end(sample.index)
            return data
        ref = sample.images[0]
        data = (ref.data if ref.data is not None else ref.path.read_bytes() if ref.path is not None
                else encode_image(sample.load_image()))
        if ref.data is None and len(data) <= self.max_bytes:  # inline bytes are held by the sample already
            self._cache[sample.index] = data
            self.bytes += len(data)
            while self.bytes > self.max_bytes:
                _, old = self._cache.popitem(last=False)
                self.bytes -= len(old)
        return data


@dataclass(frozen=True)
class ReasonItem:
    """One reasoner request of a step, its image kept apart so a batch carries it once."""

    key: Hashable
    image: bytes
    request: pb.ReasonRequest


def reason_batch_request(items: Sequence[ReasonItem]) -> pb.ReasonBatchRequest:
    """The ReasonBatch of ``items``: each distinct image once in ``images``, and every request
    naming its image by ``image_index``."""
    index: dict[Hashable, int] = {}
    images: list[bytes] = []
    requests = []
    for item in items:
        if item.key not in index:
            index[item.key] = len(images)
            images.append(item.image)
        request = pb.ReasonRequest()
        request.CopyFrom(item.request)
        request.image_index = index[item.key]
        requests.append(request)
    return pb.ReasonBatchRequest(requests=requests, images=images)


class PerceiverReward:
    """Stage 1: penalties first, then the frozen reasoner answers on the evidence each bbox set
    produces (temperature 0), graded by rule or by the verifier. Identical reasoner inputs
    within a step (same sample, same boxes - labels are not drawn) are sent once, and a
    sample's image once per batch."""

    def __init__(self, cfg: Any) -> None:
        self.cfg = cfg
        self.reasoner = RewardService(cfg.reasoner_endpoint, cfg)
        self.verifier = RewardService(cfg.verifier_endpoint, cfg) if cfg.verifier_endpoint else None
        self.images = ImageBytes(cfg.reward_image_cache_bytes)

    def __call__(self, samples: Sequence[Sample], responses: Sequence[Sequence[str]]) -> tuple[
            list[list[float | None]], RewardStats]:
        started = time.perf_counter()
        deadline = time.monotonic() + self.cfg.reward_timeout_s
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
        # ``calls`` are in sample order, so one sample's region sets share batches (and its image).
        images = {s.index: self.images(s) for s, _ in calls}  # read once a step, whatever the cache keeps
        items = [ReasonItem(s.index, images[s.index], pb.ReasonRequest(
                     question=s.question, answer_form=FORM_TO_PB[s.form], regions=[region_to_pb(r) for r in regions],
                     sampling=params)) for s, regions in calls]
        stats.extra["reasoner_requests"] = len(items)
        limits = self.reasoner.limits
        batches = cut_batches(items, limits.batch_items, limits.batch_bytes, lambda it: message_size(it.request),
                              lambda it: (it.key, len(it.image) + ITEM_OVERHEAD_BYTES))
        stats.extra["reasoner_batches"] = len(batches)
        stats.extra["reasoner_image_bytes"] = sum(
            len(im) for b in batches for im in {it.key: it.image for it in b}.values())

        def call(batch: list[ReasonItem], left: float) -> list[pb.ReasonResult]:
            request = reason_batch_request(batch)
            return self.reasoner.client.reason_batch(list(request.requests), left, images=list(request.images))

        results = send_batches(self.reasoner, call, batches, "ReasonBatch", stats, deadline)
        # An item the reasoner refused alone (``error``) cannot be scored: dropped, not 0.
        for res in results:
            if res is not None and res.error:
                stats.failures.append(f"{self.reasoner.endpoint} ReasonBatch: INVALID_ARGUMENT: {res.error}")
        graded = grade([(s, None if res is None or res.error else res.completions[0].text) for (s, _), res
                        in zip(calls, results, strict=True)], self.verifier, self.cfg, stats, deadline)
        for i, j, k in slots:
            rewards[i][j] = graded[k]
        stats.dropped = sum(r is None for row in rewards for r in row)
        stats.seconds = time.perf_counter() - started
        check_dropped("perceiver rewards", stats.dropped, sum(len(r) for r in rewards), stats, self.cfg)
        return rewards, stats


class ReasonerReward:
    """Stage 2: grade the policy's own answers (the frozen perceiver's boxes built its prompt)."""

    def __init__(self, cfg: Any) -> None:
        self.cfg = cfg
        self.verifier = RewardService(cfg.verifier_endpoint, cfg) if cfg.verifier_endpoint else None

    def __call__(self, samples: Sequence[Sample], responses: Sequence[Sequence[str]]) -> tuple[
            list[list[float | None]], RewardStats]:
        started = time.perf_counter()
        deadline = time.monotonic() + self.cfg.reward_timeout_s
        stats = RewardStats()
        flat = [(s, text) for s, texts in zip(samples, responses, strict=True) for text in texts]
        graded = grade(flat, self.verifier, self.cfg, stats, deadline)
        out, k = [], 0
        for texts in responses:
            out.append(graded[k : k + len(texts)])
            k += len(texts)
        stats.dropped = sum(r is None for r in graded)
        stats.seconds = time.perf_counter() - started
        check_dropped("reasoner rewards", stats.dropped, len(graded), stats, self.cfg)
        return out, stats


class PerceiverCache:
    """The frozen perceiver's boxes for each sample, asked once per run (temperature 0). A
    sample whose boxes could not be had gets the no-evidence prompt this step (and is asked
    again next time); past ``max_dropped_fraction`` of a call the run fails."""

    def __init__(self, cfg: Any) -> None:
        self.cfg = cfg
        self.perceiver = RewardService(cfg.perceiver_endpoint, cfg)
        self.images = ImageBytes(cfg.reward_image_cache_bytes)
        self.regions: dict[int, list[Region]] = {}
        self.calls = 0

    def get(self, samples: Sequence[Sample], stats: RewardStats) -> list[list[Region] | None]:
        missing = [s for s in samples if s.index not in self.regions]
        if missing:
            deadline = time.monotonic() + self.cfg.reward_timeout_s
            params = pb.SamplingParams(temperature=0.0, max_tokens=self.cfg.frozen_max_tokens)
            requests = [pb.PerceiveRequest(image=self.images(s), question=s.question, sampling=params)
                        for s in missing]
            results = batched_calls(self.perceiver, lambda batch, left: self.perceiver.client.perceive_batch(
                batch, left), requests, "PerceiveBatch", stats, deadline)
            self.calls += len(missing)
            for s, res in zip(missing, results, strict=True):
                if res is not None:
                    self.regions[s.index] = parse_regions(res.completions[0].text)
            failed = sum(res is None for res in results)
            stats.extra["perceiver_failed"] = stats.extra.get("perceiver_failed", 0.0) + failed
            check_dropped("frozen perceiver boxes", failed, len(missing), stats, self.cfg)
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

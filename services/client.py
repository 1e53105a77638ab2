"""Client library for the P2R services, used by the trainer, the evaluation and the CLI.

The one retry policy of the project is ``RetryPolicy`` here, carried out by gRPC itself (the
channel's service config): exponential backoff with jitter, only on UNAVAILABLE (server
restarting, connection refused) and RESOURCE_EXHAUSTED (admission control said "later").
INVALID_ARGUMENT, DEADLINE_EXCEEDED and the rest are never retried: retrying a bad request or
an exhausted deadline cannot help, and a server bug (INTERNAL) does not go away on a retry.
Every call carries a deadline, which covers all its attempts. A caller that must carry on
without an answer (the trainer drops the sample) catches the final ``grpc.RpcError``; it never
retries on top, which would multiply the attempts.

A policy may instead wait out RESOURCE_EXHAUSTED until the call's deadline
(``exhausted_until_deadline``: the trainer's reward calls, whose batches queue behind others
for tens of seconds). gRPC's service config cannot say that (it caps attempts at 5), so such a
policy is carried out by the blocking ``Client`` itself (``RetryInterceptor``), with the
channel's own retries off: one mechanism per channel, never one on top of the other.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import grpc

from p2r.core.grading import VerifyRequest
from p2r.services.protocol import ALL_SERVICES, MAX_MESSAGE_BYTES, verify_to_pb
from p2r.services.security import ClientCredentials, secure_aio_channel, secure_channel
from p2r.v1 import p2r_pb2 as pb
from p2r.v1 import p2r_pb2_grpc as pb_grpc

RETRYABLE_CODES = ("UNAVAILABLE", "RESOURCE_EXHAUSTED")
"""The only codes ever retried (names as the gRPC service config spells them)."""
MAX_GRPC_ATTEMPTS = 5
"""gRPC silently treats a larger ``maxAttempts`` as 5; ``RetryPolicy`` refuses one instead."""


@dataclass(frozen=True)
class RetryPolicy:
    """How many attempts a call gets (the first included) and how long it waits between them;
    the codes retried are always ``RETRYABLE_CODES``."""

    max_attempts: int = MAX_GRPC_ATTEMPTS
    initial_backoff_s: float = 0.2
    max_backoff_s: float = 5.0
    multiplier: float = 2.0
    exhausted_until_deadline: bool = False
    """RESOURCE_EXHAUSTED ("later", from admission control) is retried until the call's deadline
    instead of ``max_attempts`` times; UNAVAILABLE keeps ``max_attempts`` (a server that is down
    is not waited for beyond them). Carried out by ``RetryInterceptor`` on a blocking ``Client``."""

    def __post_init__(self) -> None:
        if not 1 <= self.max_attempts <= MAX_GRPC_ATTEMPTS:
            raise ValueError(f"max_attempts must be 1..{MAX_GRPC_ATTEMPTS} (gRPC's limit), got {self.max_attempts}")

    def backoff_s(self, retry: int) -> float:
        """The wait before retry number ``retry`` (1-based), by gRPC's own rule: a random time up
        to ``initial * multiplier**(retry-1)``, capped at ``max_backoff_s`` (jitter spreads the
        retries of many callers refused at once)."""
        return random.uniform(0.0, min(self.max_backoff_s, self.initial_backoff_s * self.multiplier ** (retry - 1)))

    def method_config(self) -> dict[str, Any]:
        """The service-config ``methodConfig`` entry for every p2r.v1 service (no ``retryPolicy``
        when the ``Client`` carries the policy out itself)."""
        config: dict[str, Any] = {"name": [{"service": s} for s in ALL_SERVICES]}
        if self.max_attempts > 1 and not self.exhausted_until_deadline:  # gRPC rejects maxAttempts < 2
            config["retryPolicy"] = {
                "maxAttempts": self.max_attempts,
                "initialBackoff": f"{self.initial_backoff_s}s",
                "maxBackoff": f"{self.max_backoff_s}s",
                "backoffMultiplier": self.multiplier,
                "retryableStatusCodes": list(RETRYABLE_CODES),
            }
        return config


def channel_options(retry: RetryPolicy | None = None) -> list[tuple[str, Any]]:
    retry = retry or RetryPolicy()
    service_config = {"methodConfig": [retry.method_config()]}
    return [
        ("grpc.enable_retries", 0 if retry.exhausted_until_deadline else 1),
        ("grpc.service_config", json.dumps(service_config)),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        # Retried requests are buffered client-side; batches of images are large.
        ("grpc.per_rpc_retry_buffer_size", MAX_MESSAGE_BYTES),
        ("grpc.retry_buffer_size", 2 * MAX_MESSAGE_BYTES),
        # Spread calls over every address the target resolves to (a headless Service's pods, or
        # ipv4:A,B), not the first one only (gRPC's default pick_first). With the servers'
        # max_connection_age the channel re-resolves, so pods added by a scale-up get traffic.
        # Targets: "dns:///<headless-service>:<port>" (a bare host:port resolves the same way).
        ("grpc.lb_policy_name", "round_robin"),
    ]


def aio_channel(target: str, retry: RetryPolicy | None = None,
                credentials: ClientCredentials | None = None) -> grpc.aio.Channel:
    """An asyncio channel; ``credentials`` default to the environment's (Secret-mounted files)."""
    if retry is not None and retry.exhausted_until_deadline:
        raise ValueError("exhausted_until_deadline is carried out by the blocking Client only")
    return secure_aio_channel(target, credentials or ClientCredentials.from_env(), channel_options(retry))


LAST_ATTEMPT_S = 0.05
"""A deadline-bound retry is not tried with less time left than this (an admission refusal is
answered at once; an admitted call could not finish in it anyway)."""


class _AttemptDetails(NamedTuple):
    """A call's details with the time its deadline leaves for one attempt."""

    method: str
    timeout: float | None
    metadata: Any
    credentials: Any
    wait_for_ready: Any
    compression: Any


class _Details(_AttemptDetails, grpc.ClientCallDetails):  # type: ignore[misc]
    pass


class RetryInterceptor(grpc.UnaryUnaryClientInterceptor):  # type: ignore[misc]
    """Carries out a ``RetryPolicy`` with ``exhausted_until_deadline`` on a blocking channel's
    unary calls: RESOURCE_EXHAUSTED is retried with the policy's backoff for as long as the
    call's deadline leaves time for another attempt (without a deadline, ``max_attempts`` times),
    UNAVAILABLE ``max_attempts`` times in all, every other code never. Each attempt gets what is
    left of the deadline, so the deadline still covers all attempts; the caller sees the last
    attempt's status (RESOURCE_EXHAUSTED, not a DEADLINE_EXCEEDED of a doomed final attempt)."""

    def __init__(self, policy: RetryPolicy) -> None:
        self.policy = policy

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        deadline = None if details.timeout is None else time.monotonic() + details.timeout
        unavailable = retries = 0
        while True:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            outcome = continuation(_Details(details.method, left, details.metadata, details.credentials,
                                            getattr(details, "wait_for_ready", None),
                                            getattr(details, "compression", None)), request)
            code = outcome.code()
            if code == grpc.StatusCode.UNAVAILABLE:
                unavailable += 1
                if unavailable >= self.policy.max_attempts:
                    return outcome
            elif code == grpc.StatusCode.RESOURCE_EXHAUSTED:
                if deadline is None and retries + 1 >= self.policy.max_attempts:
                    return outcome
            else:
                return outcome
            retries += 1
            wait = self.policy.backoff_s(retries)
            if deadline is not None:
                # The last wait is shortened, so the attempts go on until the deadline itself.
                left = deadline - time.monotonic()
                if left <= LAST_ATTEMPT_S:
                    return outcome
                wait = min(wait, left - LAST_ATTEMPT_S)
            time.sleep(wait)


class Client:
    """Blocking client for all p2r.v1 services on one target (``host:port``).

    ``credentials`` (TLS root, client certificate, API key, admin token) default to
    ``ClientCredentials.from_env()``: what the pod's Secrets provide. ``admin_target`` is the
    server's admin port, where ``load_checkpoint`` goes with the admin token; ``status`` is
    answered by the public port too.
    """

    def __init__(self, target: str, timeout_s: float = 300.0, retry: RetryPolicy | None = None,
                 credentials: ClientCredentials | None = None, admin_target: str | None = None) -> None:
        self.target = target
        self.timeout_s = timeout_s
        credentials = credentials or ClientCredentials.from_env()
        options = channel_options(retry)
        self._raw, self.channel = secure_channel(target, credentials, options)
        retrier = [RetryInterceptor(retry)] if retry is not None and retry.exhausted_until_deadline else []
        if retrier:
            self.channel = grpc.intercept_channel(self.channel, *retrier)
        self.perceiver = pb_grpc.PerceiverStub(self.channel)
        self.reasoner = pb_grpc.ReasonerStub(self.channel)
        self.verifier = pb_grpc.VerifierStub(self.channel)
        self.p2r = pb_grpc.P2RStub(self.channel)
        self.admin = pb_grpc.AdminStub(self.channel)
        self._admin_raw: grpc.Channel | None = None
        if admin_target is not None:
            self._admin_raw, admin_channel = secure_channel(admin_target, credentials, options, admin=True)
            self.admin = pb_grpc.AdminStub(grpc.intercept_channel(admin_channel, *retrier) if retrier
                                           else admin_channel)
        self._status = pb_grpc.AdminStub(self.channel)

    def _t(self, timeout_s: float | None) -> float:
        return self.timeout_s if timeout_s is None else timeout_s

    def wait_ready(self, timeout_s: float = 120.0) -> None:
        grpc.channel_ready_future(self._raw).result(timeout=timeout_s)

    def answer(self, request: pb.AnswerRequest, timeout_s: float | None = None) -> pb.AnswerResponse:
        return self.p2r.Answer(request, timeout=self._t(timeout_s))

    def answer_stream(self, request: pb.AnswerRequest, timeout_s: float | None = None) -> Any:
        """``P2R.AnswerStream``: iterate for the events (regions, text deltas, the response);
        the returned call's ``cancel()`` - or dropping it - aborts the server's engine request.
        The deadline covers the whole stream."""
        return self.p2r.AnswerStream(request, timeout=self._t(timeout_s))

    def perceive_batch(
        self, requests: list[pb.PerceiveRequest], timeout_s: float | None = None
    ) -> list[pb.PerceiveResult]:
        return list(self.perceiver.PerceiveBatch(pb.PerceiveBatchRequest(requests=requests),
                                                 timeout=self._t(timeout_s)).results)

    def reason_batch(self, requests: list[pb.ReasonRequest], timeout_s: float | None = None,
                     images: Sequence[bytes] = ()) -> list[pb.ReasonResult]:
        """``images``: the batch's shared images, which requests name by ``image_index``."""
        return list(self.reasoner.ReasonBatch(pb.ReasonBatchRequest(requests=requests, images=images),
                                              timeout=self._t(timeout_s)).results)

    def verify_batch(self, requests: list[pb.VerifyRequest], timeout_s: float | None = None) -> list[pb.VerifyResult]:
        return list(self.verifier.VerifyBatch(pb.VerifyBatchRequest(requests=requests),
                                              timeout=self._t(timeout_s)).results)

    def load_checkpoint(self, uri: str, timeout_s: float | None = None) -> pb.LoadCheckpointResponse:
        return self.admin.LoadCheckpoint(pb.LoadCheckpointRequest(uri=uri), timeout=self._t(timeout_s))

    def status(self, timeout_s: float = 10) -> pb.StatusResponse:
        return self._status.Status(pb.StatusRequest(), timeout=timeout_s)

    def close(self) -> None:
        self._raw.close()
        if self._admin_raw is not None:
            self._admin_raw.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ServiceVerifier:
    """``grading.FreeFormVerifier`` over the verifier service, for the trainer and the evaluation.

    ``send(call, requests)`` sends the batch RPCs; by default one ``VerifyBatch`` whose failure
    raises (the evaluation's choice: a run must not report unverified answers as graded). The
    trainer passes its bounded-concurrency sender whose failed batch gives ``None`` verdicts.
    """

    def __init__(self, client: Client, send: Callable[[Callable[[list[Any]], list[Any]], list[Any]],
                                                     list[Any]] | None = None) -> None:
        self.client = client
        self.send = send or (lambda call, requests: call(requests))

    def verify_batch(self, requests: Sequence[VerifyRequest]) -> list[bool | None]:
        results = self.send(self.client.verify_batch, [verify_to_pb(r) for r in requests])
        return [None if r is None else r.correct for r in results]

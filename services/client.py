"""Client library for the P2R services, used by the trainer, the evaluation and the CLI.

Retries are gRPC's own (the channel's service config): exponential backoff with jitter, only
on UNAVAILABLE (server restarting, connection refused) and RESOURCE_EXHAUSTED (admission
control said "later"). INVALID_ARGUMENT, DEADLINE_EXCEEDED and the rest are never retried:
retrying a bad request or an exhausted deadline cannot help. Every call carries a deadline.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import grpc

from p2r.core.bbox import Region
from p2r.core.generation import Sampling
from p2r.core.grading import VerifyRequest
from p2r.v1 import p2r_pb2 as pb
from p2r.v1 import p2r_pb2_grpc as pb_grpc

MAX_MESSAGE_BYTES = 512 * 1024 * 1024
RETRYABLE_CODES = ("UNAVAILABLE", "RESOURCE_EXHAUSTED")


def sampling_to_pb(sampling: Sampling) -> pb.SamplingParams:
    """Every field set explicitly, so the server's role defaults never apply by accident."""
    return pb.SamplingParams(n=sampling.n, temperature=sampling.temperature, top_p=sampling.top_p,
                             max_tokens=sampling.max_tokens, repetition_penalty=sampling.repetition_penalty,
                             **({"seed": sampling.seed} if sampling.seed is not None else {}))


def region_to_pb(region: Region) -> pb.Region:
    return pb.Region(x1=region.x1, y1=region.y1, x2=region.x2, y2=region.y2, label=region.label or "")


def region_from_pb(region: pb.Region) -> Region:
    return Region(region.x1, region.y1, region.x2, region.y2, region.label or None)


def verify_to_pb(request: VerifyRequest) -> pb.VerifyRequest:
    return pb.VerifyRequest(question=request.question, ground_truth=request.ground_truth, answer=request.answer)


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 5          # gRPC caps this at 5
    initial_backoff_s: float = 0.2
    max_backoff_s: float = 5.0
    multiplier: float = 2.0


def channel_options(retry: RetryPolicy | None = None) -> list[tuple[str, Any]]:
    retry = retry or RetryPolicy()
    service_config = {
        "methodConfig": [{
            "name": [{"service": s} for s in
                     ("p2r.v1.Perceiver", "p2r.v1.Reasoner", "p2r.v1.Verifier", "p2r.v1.P2R", "p2r.v1.Admin")],
            "retryPolicy": {
                "maxAttempts": retry.max_attempts,
                "initialBackoff": f"{retry.initial_backoff_s}s",
                "maxBackoff": f"{retry.max_backoff_s}s",
                "backoffMultiplier": retry.multiplier,
                "retryableStatusCodes": list(RETRYABLE_CODES),
            },
        }]
    }
    return [
        ("grpc.enable_retries", 1),
        ("grpc.service_config", json.dumps(service_config)),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        # Retried requests are buffered client-side; batches of images are large.
        ("grpc.per_rpc_retry_buffer_size", MAX_MESSAGE_BYTES),
        ("grpc.retry_buffer_size", 2 * MAX_MESSAGE_BYTES),
    ]


def aio_channel(target: str, retry: RetryPolicy | None = None) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(target, options=channel_options(retry))


class Client:
    """Blocking client for all p2r.v1 services on one target (``host:port``)."""

    def __init__(self, target: str, timeout_s: float = 300.0, retry: RetryPolicy | None = None) -> None:
        self.target = target
        self.timeout_s = timeout_s
        self.channel = grpc.insecure_channel(target, options=channel_options(retry))
        self.perceiver = pb_grpc.PerceiverStub(self.channel)
        self.reasoner = pb_grpc.ReasonerStub(self.channel)
        self.verifier = pb_grpc.VerifierStub(self.channel)
        self.p2r = pb_grpc.P2RStub(self.channel)
        self.admin = pb_grpc.AdminStub(self.channel)

    def _t(self, timeout_s: float | None) -> float:
        return self.timeout_s if timeout_s is None else timeout_s

    def wait_ready(self, timeout_s: float = 120.0) -> None:
        grpc.channel_ready_future(self.channel).result(timeout=timeout_s)

    def answer(self, request: pb.AnswerRequest, timeout_s: float | None = None) -> pb.AnswerResponse:
        return self.p2r.Answer(request, timeout=self._t(timeout_s))

    def perceive_batch(
        self, requests: list[pb.PerceiveRequest], timeout_s: float | None = None
    ) -> list[pb.PerceiveResult]:
        return list(self.perceiver.PerceiveBatch(pb.PerceiveBatchRequest(requests=requests),
                                                 timeout=self._t(timeout_s)).results)

    def reason_batch(self, requests: list[pb.ReasonRequest], timeout_s: float | None = None) -> list[pb.ReasonResult]:
        return list(self.reasoner.ReasonBatch(pb.ReasonBatchRequest(requests=requests),
                                              timeout=self._t(timeout_s)).results)

    def verify_batch(self, requests: list[pb.VerifyRequest], timeout_s: float | None = None) -> list[pb.VerifyResult]:
        return list(self.verifier.VerifyBatch(pb.VerifyBatchRequest(requests=requests),
                                              timeout=self._t(timeout_s)).results)

    def load_checkpoint(self, uri: str, timeout_s: float | None = None) -> pb.LoadCheckpointResponse:
        return self.admin.LoadCheckpoint(pb.LoadCheckpointRequest(uri=uri), timeout=self._t(timeout_s))

    def status(self) -> pb.StatusResponse:
        return self.admin.Status(pb.StatusRequest(), timeout=10)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

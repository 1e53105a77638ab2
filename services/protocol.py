"""Facts of the p2r.v1 wire protocol that both ends share: the service names, the message size
limit, and the conversions between ``p2r.v1`` messages and the ``p2r.core`` types.

Client code (trainer, evaluation, CLI) and the servers import them from here, so nothing
outside ``services/`` needs a server module, and the two ends cannot drift apart.
"""

from __future__ import annotations

import math
import struct
from typing import Any

from google.protobuf.descriptor import FieldDescriptor

from p2r.core.bbox import Region
from p2r.core.generation import Sampling
from p2r.core.grading import VerifyRequest
from p2r.core.prompts import AnswerForm
from p2r.v1 import p2r_pb2 as pb

MAX_MESSAGE_BYTES = 512 * 1024 * 1024
"""Largest gRPC message either end sends or accepts: batches of hundreds of full-resolution
images fit in one call."""

_SERVICES = {name: s.full_name for name, s in pb.DESCRIPTOR.services_by_name.items()}
SERVICE_NAMES: dict[str, str] = {
    "perceiver": _SERVICES["Perceiver"],
    "reasoner": _SERVICES["Reasoner"],
    "verifier": _SERVICES["Verifier"],
    "gateway": _SERVICES["P2R"],
}
"""The gRPC service each role serves (full names, from the proto itself)."""
ADMIN_SERVICE = _SERVICES["Admin"]
ALL_SERVICES: tuple[str, ...] = (*SERVICE_NAMES.values(), ADMIN_SERVICE)
"""Every p2r.v1 service: what a client's retry policy covers and a server registers."""

FORM_FROM_PB: dict[int, AnswerForm] = {
    pb.ANSWER_FORM_MCA: AnswerForm.MCA,
    pb.ANSWER_FORM_NA: AnswerForm.NA,
    pb.ANSWER_FORM_FREE_FORM: AnswerForm.FREE_FORM,
}
"""``ANSWER_FORM_UNSPECIFIED`` is deliberately absent: a request must say its form."""
FORM_TO_PB: dict[AnswerForm, int] = {v: k for k, v in FORM_FROM_PB.items()}


_INT_RANGES: dict[int, tuple[int, int]] = {
    FieldDescriptor.CPPTYPE_INT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.CPPTYPE_INT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.CPPTYPE_UINT32: (0, 2**32 - 1),
    FieldDescriptor.CPPTYPE_UINT64: (0, 2**64 - 1),
}
"""What each protobuf integer type holds: a value outside it cannot be put on the wire."""


def wire_problem(message: Any, name: str, value: Any) -> str | None:
    """Why ``value`` cannot be field ``name`` of ``message`` (a p2r.v1 message class) as sent,
    or None. The ranges are the field's own type, read from the proto: an integer outside its
    type (``max_tokens`` 2**32 in a uint32) and a float that a 32-bit ``float`` field turns into
    something else (1e-300 -> 0.0, 1e39 -> inf). Used where a request comes from outside the
    wire (JSON) so such a value is refused naming its field, not a bug deep in a conversion."""
    field = message.DESCRIPTOR.fields_by_name[name]
    if field.cpp_type in _INT_RANGES:
        low, high = _INT_RANGES[field.cpp_type]
        return None if low <= value <= high else f"{value} is out of range [{low}, {high}]"
    if field.cpp_type == FieldDescriptor.CPPTYPE_FLOAT and math.isfinite(value):
        try:
            stored = struct.unpack("f", struct.pack("f", value))[0]
        except OverflowError:
            stored = math.inf
        if not math.isfinite(stored) or (stored == 0.0) != (value == 0.0):
            return f"{value} is not representable as a 32-bit float (it would be {stored})"
    return None


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

"""The wire facts both ends share (``services/protocol.py``): service names from the proto, the
answer-form table both ways, and the core <-> p2r.v1 conversions."""

from __future__ import annotations

from p2r.core.bbox import Region
from p2r.core.generation import Sampling
from p2r.core.grading import VerifyRequest
from p2r.core.prompts import AnswerForm
from p2r.services.protocol import (
    ADMIN_SERVICE,
    ALL_SERVICES,
    FORM_FROM_PB,
    FORM_TO_PB,
    SERVICE_NAMES,
    region_from_pb,
    region_to_pb,
    sampling_to_pb,
    verify_to_pb,
)
from p2r.v1 import p2r_pb2 as pb


def test_service_names_are_the_protos() -> None:
    assert SERVICE_NAMES == {"perceiver": "p2r.v1.Perceiver", "reasoner": "p2r.v1.Reasoner",
                             "verifier": "p2r.v1.Verifier", "gateway": "p2r.v1.P2R"}
    assert ADMIN_SERVICE == "p2r.v1.Admin"
    assert set(ALL_SERVICES) == {s.full_name for s in pb.DESCRIPTOR.services_by_name.values()}


def test_every_answer_form_maps_both_ways_and_unspecified_does_not() -> None:
    assert set(FORM_TO_PB) == set(AnswerForm)
    assert all(FORM_FROM_PB[FORM_TO_PB[form]] is form for form in AnswerForm)
    assert pb.ANSWER_FORM_UNSPECIFIED not in FORM_FROM_PB
    assert FORM_TO_PB[AnswerForm.FREE_FORM] == pb.ANSWER_FORM_FREE_FORM


def test_conversions() -> None:
    region = Region(1.5, 2.0, 30.25, 40.0, "red circle")
    assert region_from_pb(region_to_pb(region)) == region
    unlabelled = region_to_pb(Region(0, 0, 1, 1, None))
    assert unlabelled.label == "" and region_from_pb(unlabelled).label is None
    params = sampling_to_pb(Sampling(n=2, temperature=0.5, top_p=0.9, max_tokens=7, repetition_penalty=1.05))
    # every field set explicitly (the server's role defaults never apply), seed only when given
    assert all(params.HasField(f) for f in ("n", "temperature", "top_p", "max_tokens", "repetition_penalty"))
    assert not params.HasField("seed") and sampling_to_pb(Sampling(seed=3)).seed == 3
    assert verify_to_pb(VerifyRequest("Q?", "a cat", "cat")) == pb.VerifyRequest(
        question="Q?", ground_truth="a cat", answer="cat")


def test_wire_problem_uses_each_fields_own_type() -> None:
    """Issue 25 items 7 and 13: a JSON value the p2r.v1 field cannot hold is named before it is
    put on the wire (where protobuf raised a bare ValueError, or silently stored 1e-300 as 0.0)."""
    from p2r.services.protocol import wire_problem

    S = pb.SamplingParams
    assert wire_problem(S, "max_tokens", 2**32 - 1) is None
    assert wire_problem(S, "max_tokens", 2**32) == "4294967296 is out of range [0, 4294967295]"
    assert wire_problem(S, "n", -1) == "-1 is out of range [0, 4294967295]"
    assert wire_problem(S, "seed", -(2**63)) is None and wire_problem(S, "seed", 2**63 - 1) is None
    assert "out of range" in (wire_problem(S, "seed", 10**20) or "")
    assert wire_problem(S, "top_p", 1e-300) == "1e-300 is not representable as a 32-bit float (it would be 0.0)"
    assert wire_problem(S, "temperature", 1e39) == "1e+39 is not representable as a 32-bit float (it would be inf)"
    for ok in (0.0, 1e-30, 0.5, 3.0e38):
        assert wire_problem(S, "temperature", ok) is None
    # Each problem is exactly what the conversion would do: protobuf refuses or changes the value.
    for name, value in (("max_tokens", 2**32), ("seed", 10**20)):
        try:
            S(**{name: value})
            raise AssertionError(f"{name}={value} was accepted")
        except ValueError:
            pass
    assert S(top_p=1e-300).top_p == 0.0

"""The gRPC services against real servers on loopback with the tiny model: every RPC, health,
reflection, bad input, deadlines, overload, reload under load, metrics, HTTP, SIGTERM drain."""

from __future__ import annotations

import base64
import io
import json
import math
import re
import threading
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import grpc
import jsonschema
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image

from p2r.core.bbox import BBOX_LIST_SCHEMA, parse_regions
from p2r.services.checkpoints import sha256_file
from p2r.services.client import Client, RetryPolicy, channel_options
from p2r.services.launch import ServerProc, start_server
from p2r.v1 import p2r_pb2 as pb
from p2r.v1 import p2r_pb2_grpc as pb_grpc
from tests.grpc_support import loopback_server

pytestmark = pytest.mark.engine


def png(size: tuple[int, int] = (640, 480), colour: str = "white") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def client(role_server: ServerProc) -> Client:
    c = Client(role_server.target, timeout_s=120, admin_target=role_server.admin_target)
    c.wait_ready()
    return c


@pytest.fixture(scope="module")
def synth_image(synthetic_dir: Path) -> bytes:
    return (synthetic_dir / "images" / "000000.png").read_bytes()


def sampling(**kw: float) -> pb.SamplingParams:
    return pb.SamplingParams(**kw)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------ RPCs


def test_answer_runs_perceive_then_reason(client: Client, synth_image: bytes) -> None:
    r = client.answer(pb.AnswerRequest(id="q1", image=synth_image, question="What colour is the square?",
                                       answer_form=pb.ANSWER_FORM_MCA,
                                       perceive_sampling=sampling(max_tokens=16),
                                       reason_sampling=sampling(max_tokens=16)))
    assert r.id == "q1" and r.perceiver_output and r.reasoner_output
    assert r.with_evidence == (r.num_crops > 0)
    assert r.timings.total_ms >= r.timings.perceive_ms > 0 and r.timings.reason_ms > 0


def test_perceive_batch_n_completions_and_regions(client: Client, synth_image: bytes) -> None:
    reqs = [pb.PerceiveRequest(id=str(i), image=synth_image, question="Where is the text?",
                               sampling=sampling(n=2, temperature=1.0, seed=i, max_tokens=8)) for i in range(6)]
    results = client.perceive_batch(reqs)
    assert [r.id for r in results] == [str(i) for i in range(6)]
    for r in results:
        assert len(r.completions) == 2 and len(r.regions) == 2
        assert all(c.num_tokens > 0 and c.finish_reason in ("stop", "length") for c in r.completions)
    again = client.perceive_batch(reqs[:1])  # per-request seeds make sampling reproducible
    assert [c.text for c in again[0].completions] == [c.text for c in results[0].completions]


def test_reason_builds_evidence_server_side(client: Client, synth_image: bytes) -> None:
    regions = [pb.Region(x1=100 * i, y1=100, x2=100 * i + 50, y2=160, label=f"r{i}") for i in range(1, 6)]
    with_ev, without, outside = client.reason_batch([
        pb.ReasonRequest(image=synth_image, question="Q?", answer_form=pb.ANSWER_FORM_NA, regions=regions,
                         sampling=sampling(max_tokens=8)),
        pb.ReasonRequest(image=synth_image, question="Q?", answer_form=pb.ANSWER_FORM_NA,
                         sampling=sampling(max_tokens=8)),
        pb.ReasonRequest(image=synth_image, question="Q?", answer_form=pb.ANSWER_FORM_FREE_FORM,
                         regions=[pb.Region(x1=1200, y1=0, x2=1500, y2=100, label="off")],
                         sampling=sampling(max_tokens=8)),
    ])
    assert (with_ev.with_evidence, with_ev.num_crops) == (True, 3)
    assert (without.with_evidence, without.num_crops) == (False, 0)
    assert (outside.with_evidence, outside.num_crops) == (False, 0)
    assert with_ev.timings.evidence_ms > 0 and len(with_ev.answers) == 1


def test_verify_unary_and_batch(client: Client) -> None:
    single = client.verifier.Verify(pb.VerifyRequest(id="u", question="What?", ground_truth="cat", answer="cat"),
                                    timeout=60)
    assert single.id == "u" and single.timings.engine_ms > 0
    results = client.verify_batch([pb.VerifyRequest(id="v", question="What?", ground_truth="cat", answer="a cat")])
    assert results[0].id == "v" and isinstance(results[0].correct, bool)
    assert results[0].correct == ("yes" in re.sub(r"<think>.*?</think>", "", results[0].reply, flags=re.S).lower())


def test_structured_perceiver_output_matches_the_schema(client: Client, synth_image: bytes) -> None:
    reqs = [pb.PerceiveRequest(image=synth_image, question="Where?", structured=True,
                               sampling=sampling(temperature=1.0, seed=s, max_tokens=400)) for s in range(4)]
    checked = 0
    for r in client.perceive_batch(reqs):
        c = r.completions[0]
        if c.finish_reason == "stop":
            jsonschema.validate(json.loads(c.text), BBOX_LIST_SCHEMA)
            # the schema cannot say x1 < x2: the regions are the valid boxes among them
            assert len(r.regions[0].regions) == len(parse_regions(c.text))
            checked += 1
    assert checked >= 1, "no constrained completion finished within max_tokens"


def test_admin_status(client: Client, tiny_model_dir: Path) -> None:
    s = client.status()
    assert s.checkpoint == str(tiny_model_dir) and set(s.roles) == {"perceiver", "reasoner", "verifier", "gateway"}
    assert s.max_in_flight == 64


# --------------------------------------------------------------------- health, reflection


def test_health_protocol(client: Client) -> None:
    stub = health_pb2_grpc.HealthStub(client.channel)
    for service in ("", "p2r.v1.Perceiver", "p2r.v1.Reasoner", "p2r.v1.Verifier", "p2r.v1.P2R"):
        resp = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        assert resp.status == health_pb2.HealthCheckResponse.SERVING
    with pytest.raises(grpc.RpcError) as err:
        stub.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=5)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_server_reflection(client: Client) -> None:
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    db = ProtoReflectionDescriptorDatabase(client.channel)
    services = set(db.get_services())
    assert {"p2r.v1.Perceiver", "p2r.v1.Reasoner", "p2r.v1.Verifier", "p2r.v1.P2R", "p2r.v1.Admin",
            "grpc.health.v1.Health"} <= services
    assert db.FindFileContainingSymbol("p2r.v1.AnswerRequest").package == "p2r.v1"


# ----------------------------------------------------------------------------- bad input


def _code(fn) -> tuple[grpc.StatusCode, str]:  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.RpcError) as err:
        fn()
    return err.value.code(), err.value.details()


@pytest.mark.parametrize(
    ("request_kwargs", "details"),
    [
        ({"image": b""}, "image: image is empty (0 bytes)"),
        ({"image": b"GIF89a-not-really"}, "image: cannot decode image"),
        ({"image": b"\x00" * 2_000_001}, "image: image is 2000001 bytes, over the limit of 2000000 bytes"),
        ({"image": png((5000, 5000))}, "image: image has 5000x5000 = 25000000 pixels, over the limit of 20000000"),
        ({"question": "   "}, "question: question is empty"),
        ({"answer_form": pb.ANSWER_FORM_UNSPECIFIED}, "answer_form: answer_form must be MCA, NA or FREE_FORM"),
        ({"sampling": pb.SamplingParams(top_p=0.0)}, "sampling: top_p must be in (0, 1]"),
        ({"regions": [pb.Region(x1=5, y1=5, x2=1, y2=9)]}, "regions[0]: a region needs x1 < x2 and y1 < y2"),
    ],
)
def test_bad_reason_input_is_invalid_argument(client: Client, request_kwargs: dict, details: str) -> None:
    base = {"image": png(), "question": "Q?", "answer_form": pb.ANSWER_FORM_MCA}
    req = pb.ReasonRequest(**{**base, **request_kwargs})
    code, message = _code(lambda: client.reasoner.Reason(req, timeout=30))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and message.startswith(details), message


def test_bad_item_in_a_batch_is_named(client: Client) -> None:
    good = pb.PerceiveRequest(image=png(), question="Q?")
    bad = pb.PerceiveRequest(image=b"", question="Q?")
    code, message = _code(lambda: client.perceive_batch([good, good, bad]))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and message == "requests[2].image: image is empty (0 bytes)"
    code, message = _code(lambda: client.perceive_batch([]))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "empty" in message


def test_degenerate_region_fails_its_item_alone_and_doubles_keep_precision(client: Client) -> None:
    """Issue 15 item 5: Region coordinates are doubles, so the valid box [500.00001, 10,
    500.000011, 200] stays x1 < x2 on the server (as 32-bit floats it became x1 == x2); a ReasonBatch
    item with x1 == x2, +-inf or NaN fails alone with its own ``error`` naming ``requests[i]``, and
    the rest of the batch is answered. Huge finite boxes (3e38) are valid boxes, as the perceiver's
    parser accepts them, and are answered (outlines are clamped at the image)."""
    def reason(*regions: pb.Region) -> pb.ReasonRequest:
        return pb.ReasonRequest(image=png(), question="Q?", answer_form=pb.ANSWER_FORM_MCA, regions=list(regions),
                                sampling=sampling(max_tokens=2))

    inf = float("inf")
    items = [reason(pb.Region(x1=500.00001, y1=10, x2=500.000011, y2=200, label="thin")),
             reason(pb.Region(x1=5, y1=5, x2=5, y2=9)),
             reason(pb.Region(x1=0, y1=0, x2=10, y2=10), pb.Region(x1=-inf, y1=0, x2=inf, y2=10)),
             reason(pb.Region(x1=float("nan"), y1=0, x2=1, y2=1)),
             reason(pb.Region(x1=0, y1=0, x2=3e38, y2=3e38, label="huge"))]
    results = client.reason_batch(items)
    assert [r.error for r in results] == [
        "", "requests[1].regions[0]: a region needs x1 < x2 and y1 < y2",
        "requests[2].regions[1]: coordinates must be finite numbers",
        "requests[3].regions[0]: coordinates must be finite numbers", ""]
    assert [len(r.completions) for r in results] == [1, 0, 0, 0, 1]
    assert results[0].with_evidence and results[4].with_evidence
    # a single call with the same degenerate region is INVALID_ARGUMENT, as any bad field
    code, message = _code(lambda: client.reasoner.Reason(items[1], timeout=30))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and message == "regions[0]: a region needs x1 < x2 and y1 < y2"


def test_answer_rejects_bad_input(client: Client) -> None:
    code, message = _code(lambda: client.answer(pb.AnswerRequest(image=png(), question="", answer_form=1)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and message == "question: question is empty"
    code, message = _code(lambda: client.answer(pb.AnswerRequest(image=b"", question="Q", answer_form=1)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and message.startswith("image:")


# ------------------------------------------------------------------- deadline and overload


def _scrape(port: int | None) -> str:
    assert port is not None
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        return resp.read().decode()


def _value(text: str, name: str) -> float:
    return sum(float(m.group(1)) for m in re.finditer(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", text, re.M))


def test_deadline_exceeded_aborts_the_engine_request(client: Client, role_server: ServerProc) -> None:
    text = _scrape(role_server.metrics_port)
    before = _value(text, "p2r_engine_aborted_requests_total")
    tokens_before = _value(text, "vllm:generation_tokens_total")
    req = pb.PerceiveRequest(image=png(), question="Q?", sampling=sampling(temperature=1.0, max_tokens=6000))
    code, _ = _code(lambda: client.perceiver.Perceive(req, timeout=0.5))
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        text = _scrape(role_server.metrics_port)
        if (_value(text, "p2r_engine_aborted_requests_total") > before
                and _value(text, "vllm:num_requests_running") == 0):
            break
        time.sleep(0.2)
    else:
        pytest.fail("the engine request was not aborted after the deadline")
    # Aborted, not finished: the engine stopped well short of the 6000 tokens it was asked for.
    assert _value(text, "vllm:generation_tokens_total") - tokens_before < 6000


def test_overload_is_resource_exhausted_quickly(client: Client) -> None:
    # One batch larger than the whole capacity (64) can never run: INVALID_ARGUMENT naming the
    # limit, never retried (issue 14 item 8; tests/test_abuse.py pins the max_in_flight case).
    too_many = [pb.PerceiveRequest(image=png((64, 64)), question="Q?") for _ in range(65)]
    code, message = _code(lambda: client.perceiver.PerceiveBatch(pb.PerceiveBatchRequest(requests=too_many),
                                                                 timeout=60, wait_for_ready=True))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "=64" in message, message
    # While 60 items are in flight, 10 more are refused at once instead of queueing.
    slow = [pb.PerceiveRequest(image=png((64, 64)), question="Q?", sampling=sampling(temperature=1.0, max_tokens=400))
            for _ in range(60)]
    no_retry = grpc.insecure_channel(client.target, options=[("grpc.enable_retries", 0)])
    stub = pb_grpc.PerceiverStub(no_retry)
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(stub.PerceiveBatch, pb.PerceiveBatchRequest(requests=slow), timeout=120)
        deadline = time.monotonic() + 10
        while client.status().in_flight < 60 and time.monotonic() < deadline:
            time.sleep(0.05)
        code, _ = _code(lambda: stub.PerceiveBatch(pb.PerceiveBatchRequest(requests=slow[:10]), timeout=60))
        # Refused while the 60 still run, not queued behind them until they finished.
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and not running.done()
        # A bad request is validated before admission: INVALID_ARGUMENT naming its field even at
        # capacity (RESOURCE_EXHAUSTED would be retried by every client, in vain).
        bad = pb.PerceiveRequest(image=png((64, 64)), question="Q?", sampling=sampling(temperature=math.nan))
        code, message = _code(lambda: stub.Perceive(bad, timeout=60))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "sampling.temperature" in message, message
        code, message = _code(lambda: stub.PerceiveBatch(pb.PerceiveBatchRequest(requests=[slow[0], bad]), timeout=60))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "requests[1].sampling.temperature" in message, message
        code, message = _code(lambda: pb_grpc.P2RStub(no_retry).Answer(
            pb.AnswerRequest(image=png((64, 64)), question="  "), timeout=60))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "question" in message, message
        assert not running.done()
        assert len(running.result().results) == 60
    no_retry.close()


def test_client_retries_only_retryable_codes() -> None:
    config = json.loads(dict(channel_options())["grpc.service_config"])
    policy = config["methodConfig"][0]["retryPolicy"]
    assert policy["retryableStatusCodes"] == ["UNAVAILABLE", "RESOURCE_EXHAUSTED"]
    assert policy["backoffMultiplier"] == 2.0 and policy["maxAttempts"] == 5
    assert {n["service"] for n in config["methodConfig"][0]["name"]} == {
        "p2r.v1.Perceiver", "p2r.v1.Reasoner", "p2r.v1.Verifier", "p2r.v1.P2R", "p2r.v1.Admin"}
    with pytest.raises(ValueError, match=r"max_attempts must be 1\.\.5"):
        RetryPolicy(max_attempts=6)  # gRPC would silently make it 5
    # Against a port nobody listens on: UNAVAILABLE once the retries are spent, before the deadline
    # (DEADLINE_EXCEEDED otherwise: the call would have waited for a server instead).
    with Client("127.0.0.1:1", timeout_s=3) as c:
        code, _ = _code(lambda: c.status())
        assert code == grpc.StatusCode.UNAVAILABLE
    # Against a server that answers with a given code: the attempts it receives are the retries.
    C = grpc.StatusCode
    for answer, policy_attempts, attempts in (
            (C.UNAVAILABLE, 5, 5), (C.RESOURCE_EXHAUSTED, 5, 5), (C.UNAVAILABLE, 2, 2), (C.UNAVAILABLE, 1, 1),
            (C.INVALID_ARGUMENT, 5, 1), (C.DEADLINE_EXCEEDED, 5, 1), (C.INTERNAL, 5, 1),
            (C.FAILED_PRECONDITION, 5, 1)):
        retry = RetryPolicy(max_attempts=policy_attempts, initial_backoff_s=0.01)
        with _answering(answer) as (target, calls), Client(target, timeout_s=30, retry=retry) as c:
            code, _ = _code(lambda: c.status())
            assert code == answer and len(calls) == attempts, (answer, policy_attempts, len(calls))


def test_trainer_gives_up_after_the_client_retries() -> None:
    """The trainer's per-batch give-up is built on the client's policy: ``reward_retries`` + 1
    attempts on UNAVAILABLE, RESOURCE_EXHAUSTED waited out until ``reward_timeout_s``, one
    attempt on any other code, never more; the samples become None, and a step that loses more
    than ``max_dropped_fraction`` of its rewards fails naming the service and the status."""
    from p2r.core.prompts import AnswerForm
    from p2r.data.dataset import Sample
    from p2r.trainer.config import TrainConfig
    from p2r.trainer.rewards import ReasonerReward, RewardServiceError

    C = grpc.StatusCode
    samples = [Sample(i, "What animal?", "a cat", AnswerForm.FREE_FORM, []) for i in range(3)]
    replies = [["a cat"]] * 3
    for answer, retries, attempts in ((C.UNAVAILABLE, 2, 3), (C.RESOURCE_EXHAUSTED, 0, None),
                                      (C.INVALID_ARGUMENT, 3, 1), (C.DEADLINE_EXCEEDED, 3, 1)):
        with _answering(answer) as (target, calls):
            cfg = TrainConfig(role="reasoner", model="m", data="d.parquet", output="o", verifier_endpoint=target,
                              perceiver_endpoint="127.0.0.1:1", reward_timeout_s=1.5,
                              reward_retries=retries, service_timeout_s=30, reward_batch_size=2)
            reward = ReasonerReward(cfg)
            started = time.monotonic()
            with pytest.raises(RewardServiceError, match=f"3 of 3 .*{target} VerifyBatch: {answer.name}"):
                reward(samples, replies)
            # 3 replies in batches of 2: two batch RPCs, each given its attempts, then given up.
            batches = [c for c in calls if isinstance(c, pb.VerifyBatchRequest)]
            if attempts is None:  # waited out until the step's deadline, not max_attempts times
                assert len(batches) > 2 * (retries + 1) and time.monotonic() - started >= 1.0, len(batches)
            else:
                assert len(batches) == 2 * attempts, (answer, retries, len(batches))


@contextmanager
def _answering(code: grpc.StatusCode) -> Iterator[tuple[str, list[object]]]:
    """A gRPC server on loopback whose Admin.Status and Verifier.VerifyBatch always fail with
    ``code``; yields its target and the list of the calls it received (the client's attempts,
    which a time bound cannot count)."""
    calls: list[object] = []

    class Admin(pb_grpc.AdminServicer):
        def Status(self, request: pb.StatusRequest, context: grpc.ServicerContext) -> pb.StatusResponse:
            calls.append(request)
            context.abort(code, "as told")

    class Verifier(pb_grpc.VerifierServicer):
        def VerifyBatch(self, request: pb.VerifyBatchRequest, context: grpc.ServicerContext) -> pb.VerifyBatchResponse:
            calls.append(request)
            context.abort(code, "as told")

    with loopback_server((pb_grpc.add_AdminServicer_to_server, Admin()),
                         (pb_grpc.add_VerifierServicer_to_server, Verifier())) as target:
        yield target, calls


# --------------------------------------------------------------------------------- reload


def _upload(model_dir: Path, s3: dict[str, str], bucket: str, prefix: str, with_manifest: bool) -> str:
    from minio import Minio

    client = Minio(s3["P2R_S3_ENDPOINT"], access_key=s3["AWS_ACCESS_KEY_ID"],
                   secret_key=s3["AWS_SECRET_ACCESS_KEY"], secure=False)
    if not client.bucket_exists(bucket):
        client.make_bucket(bucket)
    # The model's own manifest stays behind: this helper decides whether the prefix gets one.
    files = sorted(p for p in model_dir.iterdir() if p.is_file() and p.name != "manifest.json")
    for f in files:
        client.fput_object(bucket, f"{prefix}/{f.name}", str(f))
    if with_manifest:
        manifest = json.dumps({"files": {f.name: sha256_file(f) for f in files}}).encode()
        client.put_object(bucket, f"{prefix}/manifest.json", io.BytesIO(manifest), len(manifest))
    return f"s3://{bucket}/{prefix}/"


def test_reload_under_load_drops_nothing(client: Client, tiny_model_dir: Path, second_model_dir: Path,
                                         s3_server: dict[str, str], synth_image: bytes) -> None:
    probe = [pb.PerceiveRequest(image=synth_image, question="Where?",
                                sampling=sampling(temperature=1.0, seed=11, max_tokens=24))]

    def texts() -> list[str]:
        return [r.completions[0].text for r in client.perceive_batch(probe)]

    original = texts()
    failures: list[Exception] = []
    answered: list[tuple[float, float]] = []  # (sent, answered) of every load batch
    stop = threading.Event()

    def load() -> None:
        while not stop.is_set():
            sent = time.monotonic()
            try:
                client.reason_batch([pb.ReasonRequest(image=png(), question="Q?", answer_form=1,
                                                      sampling=sampling(max_tokens=48)) for _ in range(8)])
                answered.append((sent, time.monotonic()))
            except Exception as e:
                failures.append(e)

    def swap(uri: str) -> tuple[float, float]:
        """Reload ``uri``; returns when the reload began and ended."""
        began = time.monotonic()
        assert client.load_checkpoint(uri).uri == uri
        return began, time.monotonic()

    # Six workers keep 48 requests in flight, three times what the engine runs at once (max_num_seqs
    # 16): a swap lets the running ones finish on the old weights and holds the queued ones until
    # the new weights are in, so batches sent before it began are answered after it ended.
    workers = [threading.Thread(target=load) for _ in range(6)]
    for w in workers:
        w.start()
    try:
        s3_uri = _upload(second_model_dir, s3_server, "ckpts", "seed1", with_manifest=True)
        deadline = time.monotonic() + 120
        while not answered:  # the load runs
            assert not failures and time.monotonic() < deadline, failures or "the load did not run"
            time.sleep(0.05)
        swaps = [swap(s3_uri)]
        assert client.status().checkpoint == s3_uri
        swapped = texts()
        swaps.append(swap(f"file://{tiny_model_dir}"))
    finally:
        stop.set()
        for w in workers:
            w.join()
    assert failures == [], failures
    # Batches sent before a swap began and answered after it ended: the swap happened under load.
    across = [sum(1 for sent, done in answered if sent < began and done > ended) for began, ended in swaps]
    assert all(across), f"load batches in flight across each swap: {across}"
    assert swapped != original, "the reload did not change the served weights"
    restored = texts()
    assert restored == original, f"reloading the original weights must restore its outputs: {restored} != {original}"


def test_reload_refuses_incomplete_or_missing_checkpoints(client: Client, second_model_dir: Path,
                                                          s3_server: dict[str, str], tmp_path: Path) -> None:
    partial = _upload(second_model_dir, s3_server, "ckpts", "partial", with_manifest=False)
    code, message = _code(lambda: client.load_checkpoint(partial))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "no manifest.json" in message
    code, message = _code(lambda: client.load_checkpoint(str(tmp_path / "nope")))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "no such directory" in message
    code, _ = _code(lambda: client.load_checkpoint(""))
    assert code == grpc.StatusCode.INVALID_ARGUMENT


# ------------------------------------------------------------------------- metrics, HTTP


def test_metrics_after_traffic(client: Client, role_server: ServerProc, tiny_model_dir: Path) -> None:
    client.answer(pb.AnswerRequest(image=png(), question="Q?", answer_form=pb.ANSWER_FORM_MCA,
                                   perceive_sampling=sampling(max_tokens=8), reason_sampling=sampling(max_tokens=8)))
    text = _scrape(role_server.metrics_port)
    for name in ("p2r_requests_total", "p2r_request_latency_seconds_count", "p2r_queue_latency_seconds_count",
                 "p2r_engine_latency_seconds_count", "p2r_generated_tokens_total", "p2r_images_processed_total",
                 "vllm:generation_tokens_total", "p2r_max_in_flight_items"):
        assert _value(text, name) > 0, name
    assert 'p2r_requests_total{code="OK",method="Answer"}' in text
    assert 'code="INVALID_ARGUMENT"' in text
    for gauge in ("p2r_in_flight_items", "vllm:kv_cache_usage_perc", "vllm:num_requests_waiting"):
        assert re.search(rf"^{re.escape(gauge)}(\{{[^}}]*\}})? ", text, re.M), gauge
    assert re.search(r'^p2r_checkpoint_info\{uri="[^"]+"\} 1\.0$', text, re.M)


def test_http_facade(role_server: ServerProc, synth_image: bytes) -> None:
    import httpx

    base = f"http://127.0.0.1:{role_server.http_port}"
    assert httpx.get(f"{base}/healthz").json() == {"status": "ok"}
    assert httpx.get(f"{base}/readyz").status_code == 200
    ok = httpx.post(f"{base}/v1/answer", files={"image": ("a.png", synth_image, "image/png")},
                    data={"question": "What colour?", "answer_form": "mca"}, timeout=120)
    assert ok.status_code == 200 and "answer" in ok.json() and "timings" in ok.json()
    bad = httpx.post(f"{base}/v1/answer", files={"image": ("a.png", b"nope", "image/png")},
                     data={"question": "Q"}, timeout=60)
    assert bad.status_code == 400 and bad.json()["detail"].startswith("image: cannot decode image")
    form = httpx.post(f"{base}/v1/answer", files={"image": ("a.png", synth_image, "image/png")},
                      data={"question": "Q", "answer_form": "essay"}, timeout=60)
    assert form.status_code == 400 and "unknown answer form 'essay'" in form.json()["detail"]
    # The form is parsed as it streams (services/http.py read_form): not multipart -> 415, no image -> 400.
    not_multipart = httpx.post(f"{base}/v1/answer", data={"question": "Q"}, timeout=60)
    assert not_multipart.status_code == 415 and "multipart/form-data" in not_multipart.json()["detail"]
    missing = httpx.post(f"{base}/v1/answer", files={"question": (None, b"Q")}, timeout=60)
    assert missing.status_code == 400 and missing.json()["detail"].startswith("image: required")


# -------------------------------------------------------------------- gateway, SIGTERM


def test_remote_gateway_composes_remote_roles(role_server: ServerProc, synth_image: bytes) -> None:
    gateway = start_server(["gateway"], env={"P2R_PERCEIVER_ENDPOINT": role_server.target,
                                             "P2R_REASONER_ENDPOINT": role_server.target})
    try:
        with Client(gateway.target, timeout_s=120) as c:
            r = c.answer(pb.AnswerRequest(image=synth_image, question="Q?", answer_form=pb.ANSWER_FORM_NA,
                                          perceive_sampling=sampling(max_tokens=8),
                                          reason_sampling=sampling(max_tokens=8)))
            assert r.perceiver_output and r.reasoner_output
            # A bad image is refused by the gateway itself, before admission; vLLM's own sampling
            # rules are the roles' to check, and their refusal passes through as theirs.
            code, message = _code(lambda: c.answer(pb.AnswerRequest(image=b"xx", question="Q", answer_form=1)))
            assert code == grpc.StatusCode.INVALID_ARGUMENT and message.startswith("image:")
            code, message = _code(lambda: c.answer(pb.AnswerRequest(
                image=synth_image, question="Q", answer_form=1, perceive_sampling=sampling(repetition_penalty=0.0))))
            assert code == grpc.StatusCode.INVALID_ARGUMENT and "upstream" in message, message
    finally:
        assert gateway.stop() == 0


def _chat_body(stream: bool, seed: int, max_tokens: int) -> dict[str, object]:
    url = "data:image/png;base64," + base64.b64encode(png()).decode()
    sampling = {"temperature": 1.0, "max_tokens": max_tokens, "seed": seed}
    return {"model": "p2r", "stream": stream, **sampling,
            "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                      {"type": "text", "text": "Q?"}]}],
            "p2r": {"answer_form": "na", "perceive": sampling}}


def test_sigterm_drains_in_flight_requests(tiny_model_dir: Path, serve_config: Path) -> None:
    """SIGTERM stops accepting on every port and drains gRPC *and* HTTP work in flight: a gRPC
    batch, OpenAI unary chats, SSE streams (each to its finish chunk and [DONE]) and /v1/answer
    all complete with 200 / OK; new connections are refused (issue 25 finding 1: HTTP requests
    got 500 and streams were cut)."""
    import httpx

    # /v1/answer takes the server's default sampling: long enough to be in flight at SIGTERM.
    server = start_server(["perceiver", "reasoner", "gateway", "--model", str(tiny_model_dir), "--http-port", "0"],
                          config=serve_config, env={"P2R_PERCEIVE_MAX_TOKENS": "300", "P2R_REASON_MAX_TOKENS": "300"})
    base = f"http://127.0.0.1:{server.http_port}"

    def chat(stream: bool, seed: int) -> tuple[int, list[str]]:
        body = _chat_body(stream, seed, 300)
        if not stream:
            r = httpx.post(f"{base}/v1/chat/completions", json=body, timeout=180)
            return r.status_code, [r.text]
        with httpx.stream("POST", f"{base}/v1/chat/completions", json=body, timeout=180) as r:
            return r.status_code, [line for line in r.iter_lines() if line]

    def answer() -> tuple[int, list[str]]:
        r = httpx.post(f"{base}/v1/answer", files={"image": ("a.png", png(), "image/png")},
                       data={"question": "Q?", "answer_form": "na"}, timeout=180)
        return r.status_code, [r.text]

    try:
        c = Client(server.target, timeout_s=120)
        c.wait_ready()
        reqs = [pb.ReasonRequest(image=png(), question="Q?", answer_form=1,
                                 sampling=sampling(temperature=1.0, max_tokens=600, seed=i)) for i in range(4)]
        with ThreadPoolExecutor(6) as pool:
            running = pool.submit(c.reason_batch, reqs)
            http = [pool.submit(chat, False, 1), pool.submit(chat, True, 2), pool.submit(chat, True, 3),
                    pool.submit(chat, False, 4), pool.submit(answer)]
            deadline = time.monotonic() + 60
            while c.status().in_flight < 9 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert c.status().in_flight == 9  # all five HTTP requests and the four batch items
            server.proc.terminate()  # SIGTERM
            time.sleep(1.0)
            draining = server.proc.poll() is None
            with pytest.raises(httpx.ConnectError):  # the HTTP port stopped accepting
                httpx.get(f"{base}/healthz", timeout=5)
            results = running.result(timeout=120)
            answers = [f.result(timeout=120) for f in http]
        assert draining, "the server exited before its in-flight work could have finished"
        assert len(results) == 4 and all(r.completions[0].num_tokens > 0 for r in results)
        assert [code for code, _ in answers] == [200] * 5, answers
        for _status, lines in answers[1:3]:  # the streams: every chunk, the finish, then [DONE]
            assert lines[-1] == "data: [DONE]", lines[-3:]
            last = json.loads(lines[-2].removeprefix("data: "))
            assert last["choices"][0]["finish_reason"] in ("stop", "length"), last
        assert json.loads(answers[0][1][0])["choices"][0]["finish_reason"] in ("stop", "length")
        assert "answer" in json.loads(answers[4][1][0])
        assert server.proc.wait(60) == 0
        code, _ = _code(lambda: Client(server.target, timeout_s=2).status())
        assert code == grpc.StatusCode.UNAVAILABLE
    finally:
        server.stop(timeout=10)


def test_cli_ask_uses_the_client(role_server: ServerProc, synthetic_dir: Path) -> None:
    import subprocess
    import sys

    image = synthetic_dir / "images" / "000002.png"
    out = subprocess.run([sys.executable, "-m", "p2r.cli", "ask", "--target", role_server.target, "--image",
                          str(image), "--question", "What word?", "--form", "free_form"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "perceiver_output" in json.loads(out.stdout)
    out = subprocess.run([sys.executable, "-m", "p2r.cli", "ask", "--target", "127.0.0.1:1", "--image", str(image),
                          "--question", "Q", "--timeout", "2"], capture_output=True, text=True, timeout=60)
    # nobody listens there: retried while UNAVAILABLE, until the 2 s deadline runs out
    assert out.returncode == 2
    assert re.match(r"p2r: error: 127\.0\.0\.1:1: (UNAVAILABLE|DEADLINE_EXCEEDED): ", out.stderr)
    assert len(out.stderr.strip().splitlines()) == 1

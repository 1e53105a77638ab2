"""Rewards under back-pressure, nothing lost quietly (issue 23 item 3).

Against one real reasoner server on the tiny model with a small admission capacity
(``max_in_flight: 8``, its own process: a changed config), the trainer's reward classes:

- lose no reward under a burst larger than the capacity (RESOURCE_EXHAUSTED waited out until
  ``reward_timeout_s``, each rank within its share of ``Admin.Status``);
- fail the run, naming the service and the gRPC status, past ``max_dropped_fraction``;
- split a batch of large PNGs by bytes, each sample's image sent once per batch, and have it
  accepted.

Plus the cheap parts without an engine: the built ReasonBatch carries each image once, an
unreachable service fails at start-up naming it.
"""

from __future__ import annotations

import io
import os
import re
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import pytest
from PIL import Image

from p2r.core.prompts import AnswerForm
from p2r.data.dataset import ImageRef, Sample
from p2r.services.client import Client
from p2r.services.launch import ServerProc, start_server
from p2r.v1 import p2r_pb2 as pb
from p2r.v1 import p2r_pb2_grpc as pb_grpc

CAPACITY = 8
MAX_IMAGE_BYTES = 3_000_000
PRESSURE_CONFIG = f"""\
max_in_flight: {CAPACITY}
max_batch_items: {CAPACITY}
max_image_bytes: {MAX_IMAGE_BYTES}
max_image_pixels: 4000000
max_pixels: 65536
reason_max_tokens: 8
grace_period_s: 5
limits:
  max_model_len: 4096
  max_num_seqs: 8
"""
BOXES = ['[{"bbox_2d": [10, 20, 600, 700], "label": "a"}]', "[]"]
"""Two region sets per sample (one with evidence, one without): two reasoner requests that
share the sample's image."""


def png(size: tuple[int, int], seed: int, noise: bool = False) -> bytes:
    """A PNG; with ``noise`` incompressible (about 3 bytes a pixel), as large as a photo gets."""
    image = (Image.frombytes("RGB", size, os.urandom(size[0] * size[1] * 3)) if noise
             else Image.new("RGB", size, (seed * 37 % 256, seed * 91 % 256, seed * 53 % 256)))
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def samples(n: int, start: int = 0, size: tuple[int, int] = (64, 64), noise: bool = False) -> list[Sample]:
    return [Sample(start + i, "Which option is right? A. yes B. no", "A", AnswerForm.MCA,
                   [ImageRef(data=png(size, start + i, noise))]) for i in range(n)]


def config(target: str, **overrides: Any) -> Any:
    from p2r.trainer.config import TrainConfig

    return TrainConfig(**{"role": "perceiver", "model": "m", "data": "d.parquet", "output": "o",
                          "reasoner_endpoint": target, "frozen_max_tokens": 4, "reward_batch_size": CAPACITY,
                          "service_wait_s": 60, "reward_timeout_s": 300, **overrides})


def rejected(server: ServerProc) -> float:
    """Work items the server's admission has refused so far (``p2r_rejected_items``)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    m = re.search(r"^p2r_rejected_items_total (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


@pytest.fixture(scope="module")
def reasoner(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProc]:
    """A reasoner with a small admission capacity: its own process (the shared role_server has 64)."""
    path = tmp_path_factory.mktemp("pressure") / "serve.yaml"
    path.write_text(PRESSURE_CONFIG)
    server = start_server(["reasoner", "--model", str(tiny_model_dir)], config=path)
    yield server
    server.stop()


# ------------------------------------------------------------------------------ no engine


def test_shared_image_travels_once_per_batch() -> None:
    """Eight region sets of one sample carry its image once: ``images`` has it once and every
    request names it by ``image_index``; a batch cut by bytes repeats it only in the next batch."""
    from p2r.trainer.rewards import ITEM_OVERHEAD_BYTES, ReasonItem, cut_batches, message_size, reason_batch_request

    a, b = b"A" * 1000, b"B" * 1000
    items = [ReasonItem(key, image, pb.ReasonRequest(question=f"q{k}", answer_form=pb.ANSWER_FORM_MCA))
             for k, (key, image) in enumerate([("a", a)] * 8 + [("b", b)] * 8)]
    request = reason_batch_request(items)
    assert list(request.images) == [a, b]
    assert [r.image_index for r in request.requests] == [0] * 8 + [1] * 8
    assert all(not r.image and r.HasField("image_index") for r in request.requests)
    # One image per request would be 16 KB; shared, the batch is about 2 KB.
    assert request.ByteSize() < 2 * 1000 + 16 * 100
    # Cut by bytes: room for one image with its requests, so two batches of 8, each image once.
    batches = cut_batches(items, 64, 2000, lambda it: message_size(it.request),
                          lambda it: (it.key, len(it.image) + ITEM_OVERHEAD_BYTES))
    assert [len(batch) for batch in batches] == [8, 8]
    assert [list(reason_batch_request(batch).images) for batch in batches] == [[a], [b]]


def test_unreachable_service_fails_at_start_naming_it() -> None:
    from p2r.trainer.rewards import PerceiverReward, RewardServiceError

    started = time.monotonic()
    with pytest.raises(RewardServiceError, match=r"127\.0\.0\.1:1 is unreachable.*UNAVAILABLE"):
        PerceiverReward(config("127.0.0.1:1", service_wait_s=1))
    assert time.monotonic() - started < 10


# -------------------------------------------------------------------------- real server


@pytest.mark.engine
def test_burst_over_capacity_loses_no_reward(reasoner: ServerProc, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two ranks (``WORLD_SIZE=2``) each send 16 reasoner items at once while a user's batch holds
    most of the capacity: 38 items against room for 8. Each rank keeps to its share (4 of 8); what
    the user's batch leaves no room for is refused with RESOURCE_EXHAUSTED and waited out, so
    every reward is computed."""
    from p2r.trainer.rewards import PerceiverReward

    monkeypatch.setenv("WORLD_SIZE", "2")
    ranks = [PerceiverReward(config(reasoner.target)) for _ in range(2)]
    for rank in ranks:
        limits = rank.reasoner.limits
        assert limits.batch_items * limits.concurrency <= CAPACITY // 2, limits
    data = [samples(8, start=100 * r) for r in range(2)]
    replies = [BOXES] * 8
    before = rejected(reasoner)
    user = pb_grpc.ReasonerStub(grpc.insecure_channel(reasoner.target, options=[("grpc.enable_retries", 0)]))
    hold = pb.ReasonBatchRequest(requests=[pb.ReasonRequest(
        image=png((64, 64), 50 + i), question="Describe it.", answer_form=pb.ANSWER_FORM_NA,
        sampling=pb.SamplingParams(temperature=1.0, max_tokens=160, seed=i)) for i in range(6)])
    with Client(reasoner.target) as c, ThreadPoolExecutor(3) as pool:
        busy = user.ReasonBatch.future(hold, timeout=120)
        deadline = time.monotonic() + 30
        while c.status().in_flight < 6 and time.monotonic() < deadline and not busy.done():
            time.sleep(0.02)
        runs = [pool.submit(rank, d, replies) for rank, d in zip(ranks, data, strict=True)]
        results = [run.result(timeout=300) for run in runs]
        assert len(busy.result().results) == 6  # the user's work was not displaced either
    assert rejected(reasoner) > before, "the burst never met a full admission: the test proves nothing"
    for rewards, stats in results:
        assert stats.dropped == 0 and not stats.failures, stats
        assert all(r in (0.0, 1.0) for row in rewards for r in row)
        assert stats.extra["reasoner_requests"] == 16


@pytest.mark.engine
def test_run_fails_past_max_dropped_fraction_naming_the_service(reasoner: ServerProc) -> None:
    """The service's admission stays full for longer than the step allows (``reward_timeout_s``):
    every reward of the step is dropped, and the reward call raises, naming the endpoint and
    RESOURCE_EXHAUSTED, instead of returning an empty step for the run to go on with."""
    from p2r.trainer.rewards import PerceiverReward, RewardServiceError

    reward = PerceiverReward(config(reasoner.target, reward_timeout_s=2.0))
    user = pb_grpc.ReasonerStub(grpc.insecure_channel(reasoner.target, options=[("grpc.enable_retries", 0)]))
    hold = pb.ReasonBatchRequest(requests=[pb.ReasonRequest(
        image=png((64, 64), 70 + i), question="Describe it.", answer_form=pb.ANSWER_FORM_NA,
        sampling=pb.SamplingParams(temperature=1.0, max_tokens=3000, seed=i)) for i in range(CAPACITY)])
    with Client(reasoner.target) as c:
        busy = user.ReasonBatch.future(hold, timeout=120)
        try:
            deadline = time.monotonic() + 30
            while c.status().in_flight < CAPACITY and time.monotonic() < deadline:
                time.sleep(0.02)
            assert c.status().in_flight == CAPACITY
            started = time.monotonic()
            with pytest.raises(RewardServiceError) as info:
                reward(samples(2, start=300), [BOXES] * 2)
            waited = time.monotonic() - started
        finally:
            busy.cancel()
    message = str(info.value)
    assert reasoner.target in message and "RESOURCE_EXHAUSTED" in message and "max_dropped_fraction=0.1" in message
    assert "4 of 4" in message, message
    assert 1.5 <= waited < 15, waited  # waited for the step's deadline, not 1.4 s of retries


@pytest.mark.engine
def test_large_pngs_are_split_by_bytes_and_accepted(reasoner: ServerProc) -> None:
    """Six samples of incompressible 2.4 MB PNGs, two region sets each: batches of at most
    ``reward_batch_bytes`` (6 MB), each image once per batch - three batches of two samples,
    all accepted, every reward computed."""
    from p2r.trainer.rewards import PerceiverReward

    budget = 6_000_000
    reward = PerceiverReward(config(reasoner.target, reward_batch_bytes=budget))
    status = reward.reasoner.client.status()
    assert reward.reasoner.limits.batch_bytes == min(budget, status.max_receive_bytes // 2)
    data = samples(6, start=500, size=(900, 900), noise=True)
    sizes = [len(s.images[0].data or b"") for s in data]
    assert all(2_000_000 < n < MAX_IMAGE_BYTES for n in sizes), sizes
    rewards, stats = reward(data, [BOXES] * 6)
    assert stats.dropped == 0 and not stats.failures, stats
    assert all(r in (0.0, 1.0) for row in rewards for r in row)
    # 12 requests would carry 12 images one per request (29 MB); by bytes: 3 batches, 6 images.
    assert stats.service_calls == 3 and stats.extra["reasoner_batches"] == 3
    assert stats.extra["reasoner_image_bytes"] == sum(sizes)


@pytest.mark.engine
def test_bad_image_index_fails_its_item_alone(reasoner: ServerProc) -> None:
    """``image_index`` past the batch's images, or set beside ``image``, is the item's own
    INVALID_ARGUMENT (``error`` naming the field); the others are answered. A single Reason call
    has no shared images."""
    image = png((64, 64), 9)
    params = pb.SamplingParams(max_tokens=2)

    def item(**kw: Any) -> pb.ReasonRequest:
        return pb.ReasonRequest(question="Which?", answer_form=pb.ANSWER_FORM_MCA, sampling=params, **kw)

    with Client(reasoner.target) as c:
        results = c.reason_batch([item(image_index=0), item(image_index=1), item(image=image, image_index=0),
                                  item(image=image)], images=[image])
        assert results[0].completions and not results[0].error
        assert results[1].error.startswith("requests[1].image_index: 1 is out of range"), results[1].error
        assert results[2].error.startswith("requests[2].image_index: set together with image"), results[2].error
        assert results[3].completions and not results[3].error
        with pytest.raises(grpc.RpcError) as info:
            c.reasoner.Reason(item(image_index=0), timeout=30)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert (info.value.details() or "").startswith("image_index: 0 is out of range")

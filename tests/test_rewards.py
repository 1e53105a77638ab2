"""Perceiver-reward penalties (p2r-method.md §Rewards)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from p2r.core.bbox import parse_regions
from p2r.core.rewards import perceiver_penalty


@pytest.mark.parametrize(
    ("reply", "reason"),
    [
        ('[{"bbox_2d": [0, 0, 100, 100], "label": "a"}, {"bbox_2d": [10, 0, 110, 100], "label": "b"}]',
         "IoU 0.82 > 0.5"),
        ('[{"bbox_2d": [0, 0, 100, 100]}]', "bbox 0 has no label"),
        ('[{"bbox_2d": [0, 0, 100, 100], "label": ""}]', "bbox 0 has no label"),
        # not a string: the reference crashes; the project penalises it as missing
        ('[{"bbox_2d": [0, 0, 100, 100], "label": 3}]', "bbox 0 has no label"),
        ('[{"bbox_2d": [0, 0, 10, 10], "label": "x"}, {"bbox_2d": [50, 50, 90, 90], "label": "description"}]',
         "bbox 1 label is the placeholder"),
    ],
)
def test_penalised(reply: str, reason: str) -> None:
    penalty = perceiver_penalty(parse_regions(reply))
    assert penalty is not None and reason in penalty


@pytest.mark.parametrize(
    "reply",
    [
        "[]",  # whole image: no penalty, the reasoner answers without evidence
        '[{"bbox_2d": [0, 0, 100, 100], "label": "a"}]',
        # IoU exactly 0.5 is allowed (the rule is IoU > 0.5): [0,0,100,100] vs [0,0,100,50] -> 0.5
        '[{"bbox_2d": [0, 0, 100, 100], "label": "a"}, {"bbox_2d": [0, 0, 100, 50], "label": "b"}]',
        # the evaluation placeholder is not the training one
        '[{"bbox_2d": [0, 0, 100, 100], "label": "<description>"}]',
        # reference: only missing, empty or strip().lower() == "description" is penalised, so a
        # label of only spaces is not
        '[{"bbox_2d": [0, 0, 100, 100], "label": "  "}]',
        # an invalid (inverted) box is dropped before the rule, so its missing label is not counted
        '[{"bbox_2d": [0, 0, 100, 100], "label": "a"}, {"bbox_2d": [90, 90, 10, 10]}]',
    ],
)
def test_not_penalised(reply: str) -> None:
    assert perceiver_penalty(parse_regions(reply)) is None


@pytest.mark.parametrize("label", ["description", " Description ", "DESCRIPTION", "\tdescription\n"])
def test_placeholder_label_is_compared_stripped_and_lower_cased(label: str) -> None:
    """Reference: ``label.strip().lower() == "description"`` gives reward 0, so ``" Description "``
    is penalised as the bare placeholder is."""
    regions = parse_regions(json.dumps([{"bbox_2d": [0, 0, 100, 100], "label": label}]))
    penalty = perceiver_penalty(regions)
    assert penalty is not None and "placeholder" in penalty


# ---------------------------------------------------------------- back-pressure (issue 23 item 3)


def _cfg(**kw: object) -> object:
    from p2r.trainer.config import TrainConfig

    return TrainConfig(**{"role": "perceiver", "model": "m", "data": "d.parquet", "output": "o",
                          "reasoner_endpoint": "127.0.0.1:1", **kw})


def test_each_rank_keeps_to_its_share_of_the_admission_capacity() -> None:
    """Reference: 4 ranks, one replica admitting 256: each rank 64 in flight (one batch of 64);
    with 8 ranks batches shrink to 32; never over the server's batch limit; message limit is the
    smaller of the client's and the server's, halved."""
    from p2r.services.protocol import MAX_MESSAGE_BYTES
    from p2r.trainer.rewards import SendLimits, send_limits
    from p2r.v1 import p2r_pb2 as pb

    cfg = _cfg()
    status = pb.StatusResponse(max_in_flight=256, max_batch_items=64, max_receive_bytes=2**31 - 1)
    assert send_limits(status, cfg, 4) == SendLimits(64, 1, 64 * 1024**2)
    assert send_limits(status, cfg, 8) == SendLimits(32, 1, 64 * 1024**2)
    assert send_limits(status, cfg, 1) == SendLimits(64, 4, 64 * 1024**2)
    assert send_limits(status, _cfg(reward_batch_size=16), 4) == SendLimits(16, 4, 64 * 1024**2)
    assert send_limits(status, cfg, 1000).batch_items == 1  # more ranks than slots: 1 each, the rest waits
    small = pb.StatusResponse(max_in_flight=256, max_batch_items=64, max_receive_bytes=40 * 1024**2)
    assert send_limits(small, cfg, 4).batch_bytes == 20 * 1024**2
    assert send_limits(None, _cfg(reward_batch_bytes=2**40), 4).batch_bytes == MAX_MESSAGE_BYTES // 2


def test_a_batch_of_4k_pngs_is_cut_well_under_the_message_limit() -> None:
    """The issue's case: 64 reasoner items of 8 samples' 25 MB PNGs, by item count one 1.6 GB
    message (or 200 MB with images shared) - past 512 MiB either way before. By bytes: no batch
    over ``reward_batch_bytes``, each image once per batch, no item lost."""
    from p2r.trainer.rewards import (
        ITEM_OVERHEAD_BYTES,
        ReasonItem,
        cut_batches,
        message_size,
        reason_batch_request,
    )
    from p2r.v1 import p2r_pb2 as pb

    budget = 64 * 1024**2
    images = {k: bytes([k]) * 25_000_000 for k in range(8)}
    items = [ReasonItem(k, images[k], pb.ReasonRequest(question="q", answer_form=pb.ANSWER_FORM_MCA))
             for k in range(8) for _ in range(8)]
    batches = cut_batches(items, 64, budget, lambda it: message_size(it.request),
                          lambda it: (it.key, len(it.image) + ITEM_OVERHEAD_BYTES))
    assert sum(len(b) for b in batches) == 64 and len(batches) == 4
    for batch in batches:
        request = reason_batch_request(batch)
        assert request.ByteSize() <= budget and len(request.images) == len({it.key for it in batch})


def test_image_cache_is_bounded_by_bytes(tmp_path: Path) -> None:
    """Least recently used files are evicted past the budget; a file over it is not kept."""
    from p2r.core.prompts import AnswerForm
    from p2r.data.dataset import ImageRef, Sample
    from p2r.trainer.rewards import ImageBytes

    def sample(i: int, size: int) -> Sample:
        path = tmp_path / f"{i}.png"
        path.write_bytes(bytes([i]) * size)
        return Sample(i, "q", "A", AnswerForm.MCA, [ImageRef(path=path)])

    cache = ImageBytes(max_bytes=250)
    a, b, c, big = sample(1, 100), sample(2, 100), sample(3, 100), sample(4, 300)
    assert cache(a) == bytes([1]) * 100 and cache(b) and cache(a)  # a is now the most recent
    cache(c)  # 300 > 250: b, the least recently used, goes
    assert cache.bytes == 200 and set(cache._cache) == {1, 3}
    assert cache(big) == bytes([4]) * 300 and 4 not in cache._cache and cache.bytes <= 250
    a.images[0].path.unlink()  # type: ignore[union-attr]
    assert cache(a) == bytes([1]) * 100  # still cached: not read again

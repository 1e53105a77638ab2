"""Perceiver-reward penalties (p2r-method.md §Rewards)."""

from __future__ import annotations

import json

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

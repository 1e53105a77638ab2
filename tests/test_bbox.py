"""Bbox parsing and IoU (p2r-method.md §Visual evidence), including hostile perceiver output."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from p2r.core.bbox import Region, iou, parse_regions


def coords(text: str) -> list[tuple[float, float, float, float]]:
    return [r.coords for r in parse_regions(text)]


def test_whole_text_list_keeps_valid_items_in_order() -> None:
    text = json.dumps(
        [
            {"bbox_2d": [10, 20, 30, 40], "label": "a"},
            {"bbox_2d": [30, 40, 10, 20], "label": "inverted"},
            {"bbox_2d": [5, 5, 5, 9], "label": "zero width"},
            "not a dict",
            {"bbox_2d": [1, 2, 3], "label": "three coords"},
            {"bbox_2d": ["1", 2, 3, 4], "label": "string coord"},
            {"bbox_2d": [1, 2, 3, None], "label": "null coord"},
            {"bbox_2d": [True, 2, 3, 4], "label": "bool coord"},
            {"box": [1, 2, 3, 4]},
            {"bbox_2d": [100.5, 200, 300, 400.25], "label": "b"},
        ]
    )
    regions = parse_regions(text)
    assert [r.coords for r in regions] == [(10, 20, 30, 40), (100.5, 200, 300, 400.25)]
    assert [r.label for r in regions] == ["a", "b"]


def test_whole_text_dict_is_one_bbox() -> None:
    assert coords('{"bbox_2d": [1, 2, 3, 4], "label": "x"}') == [(1, 2, 3, 4)]
    assert coords('{"bbox_2d": [3, 2, 1, 4]}') == []


def test_empty_list_means_whole_image() -> None:
    assert parse_regions("[]") == []


def test_extraction_from_prose_and_fences() -> None:
    text = (
        "Sure! Here you go:\n```json\n[\n"
        '  {"bbox_2d": [12, 34, 56, 78], "label": "sign"},\n'
        '  {"bbox_2d": [90, 10, 20, 30], "label": "inverted"}\n'
        "]\n```\nand also {\"label\": \"late\", \"bbox_2d\": [1, 1, 2, 2]} trailing"
    )
    assert coords(text) == [(12, 34, 56, 78), (1, 1, 2, 2)]


def test_malformed_json_salvages_complete_objects() -> None:
    text = '[{"bbox_2d": [1, 2, 3, 4], "label": "ok"}, {"bbox_2d": [5, 6, 7'
    assert coords(text) == [(1, 2, 3, 4)]


@pytest.mark.parametrize(
    "text",
    ["", "no boxes here", "null", "42", '"a string"', "{", "[{]", '{"bbox_2d": "1,2,3,4"}',
     '[{"bbox_2d": [NaN, 1, 2, 3]}]', '[{"bbox_2d": [1, 2, Infinity, 3]}]', "[" * 5000],
)
def test_garbage_gives_no_regions(text: str) -> None:
    assert parse_regions(text) == []


def test_out_of_range_coordinates_are_still_valid_boxes() -> None:
    # The validity rule is numeric + ordered; clamping happens when cropping.
    assert coords('[{"bbox_2d": [-50, 900, 1200, 1500], "label": "x"}]') == [(-50, 900, 1200, 1500)]


def test_label_must_be_a_string() -> None:
    [region] = parse_regions('[{"bbox_2d": [1, 2, 3, 4], "label": 7}]')
    assert region.label is None


def test_region_json_round_trip() -> None:
    r = Region(1, 2, 3, 4, "cat")
    assert parse_regions(json.dumps([r.to_json()])) == [r]


def test_iou_hand_computed() -> None:
    a = Region(0, 0, 10, 10)
    assert iou(a, a) == 1.0
    assert iou(a, Region(5, 0, 15, 10)) == pytest.approx(50 / 150)
    assert iou(a, Region(10, 0, 20, 10)) == 0.0  # touching edges
    assert iou(a, Region(2, 2, 4, 4)) == pytest.approx(4 / 100)
    assert iou(a, Region(20, 20, 30, 30)) == 0.0


@given(st.text())
def test_parsing_never_raises_on_arbitrary_text(text: str) -> None:
    for region in parse_regions(text):
        assert region.x1 < region.x2 and region.y1 < region.y2


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=5),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(
        st.sampled_from(["bbox_2d", "label", "x"]), children, max_size=3
    ),
    max_leaves=20,
)


@given(json_values)
def test_parsing_never_raises_on_arbitrary_json(value: object) -> None:
    for region in parse_regions(json.dumps(value)):
        assert region.x1 < region.x2 and region.y1 < region.y2


def test_integer_literal_beyond_float_range_is_an_invalid_box_not_a_crash() -> None:
    """A JSON integer above 1e308 has no float (``float()`` raises OverflowError): that box is
    rejected like any invalid one, and its valid neighbours are kept (model output never crashes)."""
    huge = "1" + "0" * 400
    text = f'[{{"bbox_2d": [0, 0, {huge}, 10], "label": "a"}}, {{"bbox_2d": [1, 2, 3, 4], "label": "b"}}]'
    assert parse_regions(text) == [Region(1, 2, 3, 4, "b")]
    assert parse_regions(f'see {{"bbox_2d": [{huge}, 0, 5, 5]}}') == []
    # what the perceiver reward and a p2r-mode eval do with such a reply: no exception
    from PIL import Image

    from p2r.core.flow import evidence_for
    from p2r.core.rewards import perceiver_penalty

    assert perceiver_penalty(parse_regions(text)) is None
    assert evidence_for(Image.new("RGB", (64, 48)), text, 3).with_evidence


@pytest.mark.parametrize("space", ["\u3000", "\u00a0", "\u2003\n"])
def test_whole_text_is_unicode_stripped_before_json(space: str) -> None:
    """Reference: ``json.loads(text.strip())``, and ``str.strip`` removes Unicode whitespace that
    JSON does not skip (U+3000, U+00A0), so a list wrapped in it is still read whole."""
    text = f'{space}[{{"bbox_2d": [1, 2, 3, 4], "label": "a"}}, {{"bbox_2d": [5, 6, 7, 8]}}]{space}'
    assert parse_regions(text) == [Region(1, 2, 3, 4, "a"), Region(5, 6, 7, 8)]

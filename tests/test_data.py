"""Synthetic data and the P2R-10k loader: layout, ground truth, and malformed rows."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from p2r.core.images import encode_image
from p2r.core.prompts import AnswerForm
from p2r.data.dataset import DataError, load_samples, write_synthetic
from p2r.data.synth import COLOURS, MIN_LONG_SIDE, make_sample


def test_synthetic_set_layout_and_forms(synthetic_dir: Path) -> None:
    table = pq.read_table(synthetic_dir / "train.parquet")
    assert {"data_source", "prompt", "images", "reward_model", "extra_info"} <= set(table.column_names)
    samples = load_samples(synthetic_dir / "train.parquet")
    assert [s.form for s in samples] == [AnswerForm.MCA, AnswerForm.NA, AnswerForm.FREE_FORM] * 2
    assert [s.index for s in samples] == list(range(6))
    row = table.slice(0, 1).to_pylist()[0]
    assert row["prompt"][0]["content"].startswith("<image>")
    assert samples[0].question == row["prompt"][0]["content"].removeprefix("<image>")
    for s in samples:
        image = s.load_image()
        assert max(image.size) >= MIN_LONG_SIDE
        assert s.gt_bboxes and all(0 <= c <= 1000 for box in s.gt_bboxes for c in box)


def test_ground_truth_matches_the_pixels() -> None:
    for index in range(9):
        s = make_sample(index, seed=3)
        w, h = s.image.size
        for x1, y1, x2, y2 in s.gt_boxes:
            cx, cy = (x1 + x2) / 2000 * w, (y1 + y2) / 2000 * h
            px = s.image.getpixel((int(cx), int(cy) + 5))
            if s.form is AnswerForm.MCA:
                colour = s.question.splitlines()[["A", "B", "C", "D"].index(s.answer) + 2][3:]
                assert px == COLOURS[colour]
            elif s.form is AnswerForm.NA:
                assert px == COLOURS[s.question.split()[2]]
                assert int(s.answer) == len(s.gt_boxes)
            else:
                assert max(x2 - x1, y2 - y1) / 1000 * max(w, h) < 250  # a small box
        # objects are small: shapes under 6 % of each side, word boxes under 11 %
        limit = 110 if s.form is AnswerForm.FREE_FORM else 60
        assert all((x2 - x1) < limit and (y2 - y1) < limit for x1, y1, x2, y2 in s.gt_boxes)


def test_synthetic_is_deterministic_and_bytes_mode_matches(tmp_path: Path) -> None:
    assert make_sample(4, 1).image.tobytes() == make_sample(4, 1).image.tobytes()
    write_synthetic(tmp_path / "b", 3, image_mode="bytes")
    assert not (tmp_path / "b" / "images").exists()
    inline = load_samples(tmp_path / "b" / "train.parquet")
    assert inline[2].load_image().tobytes() == make_sample(2).image.tobytes()


def _p2r10k_row(index: int, image: dict[str, Any]) -> dict[str, Any]:
    """A row as the released P2R-10k parquet has it (veRL layout)."""
    return {
        "data_source": "p2r-10k",
        "prompt": [
            {"role": "user", "content": "<image>\nWhat is the colour of the bag?\nOptions:\nA. red\nB. blue"}
        ],
        "images": [image],
        "ability": "perception",
        "reward_model": {"ground_truth": "B", "style": "rule"},
        "extra_info": {"answer_form": "mca", "index": index, "split": "train"},
    }


def _write(path: Path, rows: list[dict[str, Any]]) -> Path:
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def test_real_layout_with_image_prefix_and_bytes(tmp_path: Path) -> None:
    prefix = tmp_path / "images-root"
    (prefix / "sub").mkdir(parents=True)
    Image.new("RGB", (40, 30), "blue").save(prefix / "sub" / "a.jpg")
    png = encode_image(Image.new("RGB", (8, 8), "red"))
    path = _write(
        tmp_path / "p2r10k.parquet",
        [_p2r10k_row(7, {"bytes": None, "path": "sub/a.jpg"}), _p2r10k_row(8, {"bytes": png, "path": None})],
    )
    a, b = load_samples(path, image_prefix=prefix)
    assert a.question == "What is the colour of the bag?\nOptions:\nA. red\nB. blue"
    assert (a.index, a.ground_truth, a.form, a.gt_bboxes) == (7, "B", AnswerForm.MCA, [])
    assert a.load_image().size == (40, 30) and b.load_image().size == (8, 8)
    with pytest.raises(DataError, match=r"row 0: field 'images\[0\].path': no file at"):
        load_samples(path)  # without the prefix the relative path does not resolve


def _mutations() -> list[tuple[str, Any]]:
    def drop_user(r: dict) -> None:
        r["prompt"] = [{"role": "system", "content": "x"}]

    def no_images(r: dict) -> None:
        r["images"] = []

    def empty_image(r: dict) -> None:
        r["images"] = [{"bytes": None, "path": None}]

    def empty_truth(r: dict) -> None:
        r["reward_model"]["ground_truth"] = "  "

    def bad_form(r: dict) -> None:
        r["extra_info"]["answer_form"] = "mcq"

    def no_form(r: dict) -> None:
        r["extra_info"]["answer_form"] = None

    def only_image_tag(r: dict) -> None:
        r["prompt"] = [{"role": "user", "content": "<image>"}]

    def short_box(r: dict) -> None:
        r["extra_info"]["gt_bboxes"] = [[1.0, 2.0, 3.0, 4.0], [1.0, 2.0, 3.0]]

    def text_boxes(r: dict) -> None:
        r["extra_info"]["gt_bboxes"] = "[[1, 2, 3, 4]]"

    def inf_box(r: dict) -> None:
        r["extra_info"]["gt_bboxes"] = [[0.0, 0.0, float("inf"), 4.0]]

    # Issue 25 item 13: these were accepted (an absolute path was read wherever it pointed).
    def no_image_tag(r: dict) -> None:
        r["prompt"] = [{"role": "user", "content": "What is the colour of the bag?"}]

    def two_images_one_tag(r: dict) -> None:
        r["images"] = r["images"] * 2

    def absolute_path(r: dict) -> None:
        r["images"] = [{"bytes": None, "path": "/etc/hostname"}]

    def escaping_path(r: dict) -> None:
        r["images"] = [{"bytes": None, "path": "sub/../../../etc/hostname"}]

    return [
        ("field 'extra_info.gt_bboxes[1]' must be [x1, y1, x2, y2], got [1.0, 2.0, 3.0]", short_box),
        ("field 'extra_info.gt_bboxes' must be a list of [x1, y1, x2, y2] boxes, got str", text_boxes),
        ("field 'extra_info.gt_bboxes[0]' has a non-finite coordinate: [0.0, 0.0, inf, 4.0]", inf_box),
        ("field 'prompt' has no user message", drop_user),
        ("field 'images' must be a non-empty list", no_images),
        ("field 'images[0]' has neither bytes nor path", empty_image),
        ("field 'reward_model.ground_truth' is empty", empty_truth),
        ("field 'extra_info.answer_form': unknown answer form 'mcq' (expected one of: mca, na, free_form)", bad_form),
        ("field 'extra_info.answer_form' is missing", no_form),
        ("field 'prompt' holds no question text", only_image_tag),
        ("field 'prompt' has 0 <image> tag(s) for 1 image(s); the layout has one tag per image", no_image_tag),
        ("field 'prompt' has 1 <image> tag(s) for 2 image(s); the layout has one tag per image", two_images_one_tag),
        ("field 'images[0].path': '/etc/hostname' is outside the image prefix (absolute or '..'); image paths are "
         "relative to --image-prefix", absolute_path),
        ("field 'images[0].path': 'sub/../../../etc/hostname' is outside the image prefix (absolute or '..'); "
         "image paths are relative to --image-prefix", escaping_path),
    ]


@pytest.mark.parametrize(("message", "mutate"), _mutations(), ids=[m for m, _ in _mutations()])
def test_malformed_rows_name_row_and_field(tmp_path: Path, message: str, mutate: Any) -> None:
    good = _p2r10k_row(0, {"bytes": encode_image(Image.new("RGB", (4, 4))), "path": None})
    bad = copy.deepcopy(good)
    mutate(bad)
    path = _write(tmp_path / "bad.parquet", [good, bad])
    with pytest.raises(DataError) as err:
        load_samples(path)
    assert str(err.value) == f"row 1: {message}"


def test_missing_columns_and_unreadable_files(tmp_path: Path) -> None:
    path = _write(tmp_path / "cols.parquet", [{"prompt": "x"}])
    with pytest.raises(DataError, match="missing column\\(s\\) images, reward_model, extra_info"):
        load_samples(path)
    junk = tmp_path / "junk.parquet"
    junk.write_bytes(b"not parquet")
    with pytest.raises(DataError, match="not a readable parquet file"):
        load_samples(junk)


def test_undecodable_image_names_the_row(tmp_path: Path) -> None:
    path = _write(tmp_path / "x.parquet", [_p2r10k_row(0, {"bytes": b"garbage", "path": None})])
    [sample] = load_samples(path)
    with pytest.raises(DataError, match="row 0: field 'images\\[0\\]': image: cannot decode"):
        sample.load_image()

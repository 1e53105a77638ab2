"""Evaluation without an engine: each benchmark's published layout (files generated here),
prompt text, scoring against hand-computed results, aggregation, reports and resume."""

from __future__ import annotations

import base64
import csv
import io
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from p2r.core.bbox import Region
from p2r.core.prompts import AnswerForm
from p2r.data.dataset import DataError
from p2r.eval.benchmarks import load_benchmark
from p2r.eval.inference import Output, direct_prompt, thinking_prompt
from p2r.eval.report import grade_rows, result_row, summarize, table_rows, write_reports
from p2r.eval.runner import ResultsFile


def _png(colour: str = "red", size: tuple[int, int] = (64, 48)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()


SUFFIX = "Answer with the option's letter from the given choices directly."


def _v_star(tmp_path: Path) -> Path:
    rows = [
        {"question_id": "sa_1", "text": f"What is the colour of the cup?\n(A) red\n(B) blue\n{SUFFIX}",
         "image": {"bytes": _png(), "path": "sa_1.png"}, "label": "A", "category": "direct_attributes"},
        {"question_id": "sa_2", "text": f"Is the dog left of the cat?\n(A) yes\n(B) no\n{SUFFIX}",
         "image": {"bytes": _png("blue"), "path": None}, "label": "B", "category": "relative_position"},
    ]
    d = tmp_path / "vstar" / "data"
    d.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows), d / "test-00000-of-00001.parquet")
    return tmp_path / "vstar"


def _hr_bench(tmp_path: Path) -> Path:
    d = tmp_path / "hrbench"
    d.mkdir()
    for name, cats in (("hr_bench_4k.tsv", ["single", "cross"]), ("hr_bench_8k.tsv", ["single"])):
        with (d / name).open("w", newline="") as f:
            w = csv.DictWriter(f, ["index", "question", "A", "B", "C", "D", "answer", "category", "image"],
                               delimiter="\t")
            w.writeheader()
            for i, cat in enumerate(cats):
                w.writerow({"index": i, "question": f"Which sign is shown {i}?", "A": "stop", "B": "yield",
                            "C": "exit", "D": "none", "answer": "BC"[i], "category": cat,
                            "image": base64.b64encode(_png()).decode()})
    return d


def _mme(tmp_path: Path) -> Path:
    """One row as the parquet release holds it (options a list, image bytes), one as the TSV
    dump (options as the list's repr, image base64)."""
    d = tmp_path / "mme"
    d.mkdir()
    pq.write_table(pa.Table.from_pylist([{
        "index": 7, "question": "What is written on the board?",
        "multi-choice options": ["(A) OPEN", "(B) CLOSED", "(C) EXIT", "(D) PUSH", "(E) PULL"],
        "answer": "E", "category": "OCR", "bytes": _png()}]), d / "a_mme_realworld_lite.parquet")
    with (d / "b_mme_realworld_lite.tsv").open("w", newline="") as f:
        w = csv.DictWriter(f, ["index", "question", "multi-choice options", "answer", "category", "bytes"],
                           delimiter="\t")
        w.writeheader()
        w.writerow({"index": 8, "question": "How many cars?", "multi-choice options": "['(A) 1', '(B) 2']",
                    "answer": "(B)", "category": "counting", "bytes": base64.b64encode(_png("green")).decode()})
    return d


def test_v_star_layout_question_and_categories(tmp_path: Path) -> None:
    samples = load_benchmark("V-Star", _v_star(tmp_path))
    assert [s.uid for s in samples] == ["sa_1", "sa_2"]
    assert samples[0].question == "What is the colour of the cup?\n(A) red\n(B) blue"  # suffix removed
    assert [s.category for s in samples] == ["attribute", "spatial"]
    assert samples[0].letters == "ABCD" and samples[0].form is AnswerForm.MCA
    assert samples[1].image.load().getpixel((0, 0)) == (0, 0, 255)
    # the reference's default and thinking prompts (p2r-method.md, Reference details)
    assert direct_prompt(samples[0]) == (
        "Question: What is the colour of the cup?\n(A) red\n(B) blue\n"
        "Answer the question with the option's letter from the given choices (e.g., A, B, etc.) directly.\n")
    assert thinking_prompt(samples[0]) == (
        "Question: What is the colour of the cup?\n(A) red\n(B) blue\nThink step by step. \n"
        "Provide your detailed reasoning between the <think> </think> tags, and then answer the question with the "
        "option's letter from the given choices (e.g., A, B, etc.) within the <answer> </answer> tags.\n")


def test_v_star_jsonl_with_image_paths(tmp_path: Path) -> None:
    (tmp_path / "direct_attributes").mkdir()
    (tmp_path / "direct_attributes" / "a.png").write_bytes(_png("green"))
    (tmp_path / "test.jsonl").write_text(json.dumps(
        {"question_id": 1, "text": f"Q?\n(A) x\n(B) y\n{SUFFIX}", "image": "direct_attributes/a.png",
         "label": "b", "category": "direct_attributes"}) + "\n")
    [s] = load_benchmark("V-Star", tmp_path)
    assert s.answer == "B" and s.image.path == tmp_path / "direct_attributes" / "a.png"


def test_hr_bench_subsets_options_and_categories(tmp_path: Path) -> None:
    samples = load_benchmark("HR-Bench", _hr_bench(tmp_path))
    assert [(s.uid, s.subset, s.category, s.answer) for s in samples] == [
        ("4K-0", "4K", "FSP", "B"), ("4K-1", "4K", "FCP", "C"), ("8K-0", "8K", "FSP", "B")]
    assert samples[0].question == "Which sign is shown 0?\nOptions:\nA. stop\nB. yield\nC. exit\nD. none"
    assert samples[0].image.load().size == (64, 48)


def test_mme_realworld_options_letters_and_bytes(tmp_path: Path) -> None:
    samples = load_benchmark("MME-RealWorld-lite", _mme(tmp_path))
    assert samples[0].question == ("What is written on the board?\nOptions:\n(A) OPEN\n(B) CLOSED\n(C) EXIT\n"
                                   "(D) PUSH\n(E) PULL")
    assert samples[0].letters == "ABCDEF" and samples[0].answer == "E"
    assert samples[1].question.endswith("Options:\n(A) 1\n(B) 2") and samples[1].answer == "B"


def test_malformed_row_is_named_and_skipped_only_on_request(tmp_path: Path) -> None:
    d = _v_star(tmp_path)
    bad = [{"question_id": "x", "text": "Q?", "image": {"bytes": _png(), "path": None}, "label": "Z",
            "category": "direct_attributes"},
           {"question_id": "y", "text": "Q?", "image": None, "label": "A", "category": "direct_attributes"}]
    pq.write_table(pa.Table.from_pylist(bad), d / "data" / "test-bad.parquet")
    with pytest.raises(DataError, match=r"test-bad.parquet: row 0: field 'label'"):
        load_benchmark("V-Star", d)
    skipped: list[str] = []
    samples = load_benchmark("V-Star", d, skip_bad=True, on_skip=skipped.append)
    assert len(samples) == 2
    assert len(skipped) == 2 and "row 1: field 'image'" in skipped[1]


def test_hr_bench_file_without_subset_is_refused(tmp_path: Path) -> None:
    d = _hr_bench(tmp_path)
    (d / "hr_bench_4k.tsv").rename(d / "bench.tsv")
    with pytest.raises(DataError, match="cannot tell the HR-Bench subset"):
        load_benchmark("HR-Bench", d)


def _rows(samples, replies, regions=None, mode="default"):  # type: ignore[no-untyped-def]
    perceived = json.dumps([r.to_json() for r in regions]) if regions else None
    return [result_row(s, Output("p", r, perceived, regions or []), mode)
            for s, r in zip(samples, replies, strict=True)]


def test_scoring_and_aggregation_by_hand(tmp_path: Path) -> None:
    samples = load_benchmark("HR-Bench", _hr_bench(tmp_path))  # truths: 4K B (FSP), 4K C (FCP), 8K B (FSP)
    rows = _rows(samples, ["The answer is B", "<think>hmm</think><answer>Answer: D</answer>", "B"])
    grade_rows(rows, None)
    assert [r["correct"] for r in rows] == [True, False, True]
    summary = summarize(rows, {"task": "HR-Bench", "mode": "default"})
    assert summary["subsets"]["4K"]["categories"] == {"FCP": 0.0, "FSP": 100.0}
    assert summary["subsets"]["4K"]["overall"] == 50.0
    assert summary["subsets"]["8K"]["overall"] == 100.0
    assert summary["overall"] == pytest.approx(66.67) and summary["categories"]["FSP"] == 100.0
    header, body = table_rows(summary)
    assert header == ["subset", "FCP", "FSP", "overall", "n"]
    assert body[0] == ["4K", "0.0", "100.0", "50.0", "2"] and body[-1][0] == "all"


def test_scoring_rejects_what_the_rule_rejects(tmp_path: Path) -> None:
    v = load_benchmark("V-Star", _v_star(tmp_path))  # truths A, B; letters A-D
    mme = load_benchmark("MME-RealWorld-lite", _mme(tmp_path))  # truths E, B; letters A-F
    rows = _rows([v[0], v[1], v[0], mme[0], mme[1]], [
        "E",  # not an option letter of V*: no letter found
        "I think that the second option is the right one here for sure, it is",  # > 10 words, no letter
        "the answer: A",  # lower-case prose with the letter later on: first capital letter found is A
        "E",  # a valid letter for MME-RealWorld
        "The best answer is (C)",  # prefix stripped, C != B
    ])
    grade_rows(rows, None)
    assert [r["correct"] for r in rows] == [False, False, True, True, False]


def test_free_form_without_verifier_is_ungraded_not_wrong(synthetic_dir: Path) -> None:
    samples = load_benchmark("synthetic", synthetic_dir)
    free = [s for s in samples if s.form is AnswerForm.FREE_FORM]
    assert free, "the synthetic set has free-form questions"
    rows = _rows(free, ["anything"] * len(free))
    grade_rows(rows, None)
    assert all(r["correct"] is None for r in rows)
    summary = summarize(rows, {"task": "synthetic", "mode": "thinking"})
    assert summary["ungraded"] == len(free) and summary["overall"] is None


def test_reports_and_resume_file(tmp_path: Path) -> None:
    samples = load_benchmark("V-Star", _v_star(tmp_path / "data"))
    rows = _rows(samples, ["<answer>A</answer>", "<answer>A</answer>"], regions=[Region(100, 100, 500, 500, "cup")],
                 mode="p2r")
    grade_rows(rows, None)
    meta = {"task": "V-Star", "mode": "p2r", "model": "m", "perceiver_model": None}
    out = tmp_path / "out"
    results = ResultsFile(out / "results.jsonl", meta)
    results.append(rows[:1])
    with (out / "results.jsonl").open("a") as f:
        f.write('{"uid": "sa_2", "trunc')  # a crash mid-line
    again = ResultsFile(out / "results.jsonl", meta)
    assert again.done == {"sa_1"}
    with pytest.raises(ValueError, match="holds results of mode='p2r'"):
        ResultsFile(out / "results.jsonl", {**meta, "mode": "default"})
    summary = summarize(rows, meta)
    write_reports(out, summary, samples, rows)
    assert json.loads((out / "summary.json").read_text())["categories"] == {"attribute": 100.0, "spatial": 0.0}
    assert summary["mean_bbox_count"] == 1.0
    md = (out / "report.md").read_text()
    assert "| V* | 100.0 | 0.0 | 50.0 | 2 |" in md
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 2 and "<td>50.0</td>" in page


def test_synthetic_bad_row_named_with_file_and_skippable(synthetic_dir: Path, tmp_path: Path) -> None:
    import shutil

    rows = pq.read_table(synthetic_dir / "train.parquet").to_pylist()
    rows[2]["extra_info"]["answer_form"] = "essay"
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "train.parquet")
    if (synthetic_dir / "images").is_dir():
        shutil.copytree(synthetic_dir / "images", tmp_path / "images")
    with pytest.raises(DataError, match=r"train.parquet: row 2: field 'extra_info.answer_form'"):
        load_benchmark("synthetic", tmp_path)
    assert len(load_benchmark("synthetic", tmp_path, skip_bad=True)) == len(rows) - 1


def test_ray_run_checks_local_models_before_starting_ray(tmp_path: Path) -> None:
    import ray

    from p2r.eval.inference import BackendSpec, EvalSettings
    from p2r.eval.runner import evaluate, spec_meta
    from p2r.services.checkpoints import CheckpointError

    samples = load_benchmark("V-Star", _v_star(tmp_path))
    spec = BackendSpec(EvalSettings(), model=str(tmp_path / "missing-model"))
    with pytest.raises(CheckpointError, match="missing-model: no such directory"):
        evaluate(samples, spec, {"p2r": tmp_path / "out"}, spec_meta(spec, "V-Star"), ray_workers=2)
    assert not ray.is_initialized()


# ------------------------------------------------ reference details (issue 15, items 2, 9, 11)


def test_eval_extraction_by_mode_tags_required_in_thinking_and_p2r(tmp_path: Path) -> None:
    """Reference: ``default`` grades the whole reply, stripped; ``thinking`` and ``p2r`` only the
    first closed ``<answer>...</answer>`` - none, or an empty one, is no answer, scored wrong. So
    "... the answer is b." with truth A is right in default mode and wrong in thinking mode, and
    a tagless "A" is wrong there too, where training's rule would grade the whole text."""
    v = load_benchmark("V-Star", _v_star(tmp_path))  # truth of v[0] is A
    reply = "After looking closely, the answer is b."
    default = _rows([v[0]], [reply])
    grade_rows(default, None)
    assert default[0]["extracted_answer"] == reply and default[0]["correct"] is True  # the 'A' of "After"
    for mode in ("thinking", "p2r"):
        rows = _rows([v[0]] * 5, [reply, "A", "<answer> </answer>", "<answer>A", "<think>B</think><answer> A </answer>"
                                  "<answer>B</answer>"], mode=mode)
        grade_rows(rows, None)
        assert [r["extracted_answer"] for r in rows] == [None, None, None, None, "A"], mode
        assert [r["correct"] for r in rows] == [False, False, False, False, True], mode


def test_v_star_suffix_removed_by_the_reference_regex(tmp_path: Path) -> None:
    """Reference: ``\\s*Answer with the option'?s letter from the given choices directly\\.?\\s*$``
    removed, then ``strip()``: without the apostrophe, without the full stop, with trailing space."""
    rows = [{"question_id": str(i), "text": text, "image": {"bytes": _png(), "path": None}, "label": "A",
             "category": "direct_attributes"} for i, text in enumerate([
                 "  Q one?\n(A) x  \nAnswer with the options letter from the given choices directly  \n",
                 "Q two?\n(A) x\nAnswer with the option's letter from the given choices directly.",
                 "Q three? Answer with the option's letter from the given choices directly. Then explain."])]
    d = tmp_path / "v"
    d.mkdir()
    pq.write_table(pa.Table.from_pylist(rows), d / "test.parquet")
    assert [s.question for s in load_benchmark("V-Star", d)] == [
        "Q one?\n(A) x", "Q two?\n(A) x",
        "Q three? Answer with the option's letter from the given choices directly. Then explain."]


def test_hr_bench_blank_options_left_out_and_any_answer_scored(tmp_path: Path) -> None:
    """Reference: only letters A-D whose value is not None and not blank are listed; every row is
    scored, an answer outside A-D (here "E") simply never matches."""
    rows = [{"index": 0, "question": "Which?", "A": "stop", "B": "  ", "C": None, "D": "exit", "answer": "E",
             "category": "single", "image": base64.b64encode(_png()).decode()}]
    d = tmp_path / "hr"
    d.mkdir()
    pq.write_table(pa.Table.from_pylist(rows), d / "hr_bench_4k.parquet")
    [sample] = load_benchmark("HR-Bench", d)
    assert sample.question == "Which?\nOptions:\nA. stop\nD. exit" and sample.answer == "E"
    graded = _rows([sample], ["E"])
    grade_rows(graded, None)
    assert graded[0]["correct"] is False


def test_mme_options_joined_as_given(tmp_path: Path) -> None:
    """Reference: the ``multi-choice options`` list joined with "\\n" as is, no option stripped."""
    d = tmp_path / "mme"
    d.mkdir()
    pq.write_table(pa.Table.from_pylist([{
        "index": 1, "question": "Q?", "multi-choice options": [" (A) one ", "(B) two\t"], "answer": "A",
        "category": "OCR", "bytes": _png()}]), d / "mme_realworld_lite.parquet")
    [sample] = load_benchmark("MME-RealWorld-lite", d)
    assert sample.question == "Q?\nOptions:\n (A) one \n(B) two\t"


def test_short_base64_image_is_not_mistaken_for_a_long_path(tmp_path: Path) -> None:
    """A base64 string under 1,024 characters but over the OS's 255-byte name limit made
    ``Path.is_file`` raise OSError (name too long) and abort the load; it is decoded instead."""
    noise = Image.frombytes("RGB", (10, 10), bytes(((i * i * 7919) >> 3) % 256 for i in range(300)))
    buf = io.BytesIO()
    noise.save(buf, format="PNG")
    data = buf.getvalue()
    text = base64.b64encode(data).decode()
    assert 255 < len(text) < 1024
    d = tmp_path / "hr"
    d.mkdir()
    pq.write_table(pa.Table.from_pylist([{"index": 0, "question": "Q?", "A": "x", "B": "y", "C": "z", "D": "w",
                                          "answer": "A", "category": "single", "image": text}]),
                   d / "hr_bench_8k.parquet")
    [sample] = load_benchmark("HR-Bench", d)
    assert sample.image.data == data


def test_bbox_count_averaged_over_nonempty_perceiver_outputs_per_category(tmp_path: Path) -> None:
    """Reference: ``bbox_count`` in summaries is the mean over samples whose perceiver output was
    non-empty, per category and overall (a sample with an empty output is left out, not 0)."""
    v = load_benchmark("V-Star", _v_star(tmp_path))  # categories attribute, spatial
    boxes = [Region(0, 0, 10, 10, "a"), Region(20, 20, 30, 30, "b")]
    rows = [result_row(v[0], Output("p", "<answer>A</answer>", json.dumps([b.to_json() for b in boxes]), boxes),
                       "p2r"),
            result_row(v[0], Output("p", "<answer>A</answer>", "[]", []), "p2r"),
            result_row(v[1], Output("p", "<answer>B</answer>", "", []), "p2r")]
    rows[1]["uid"] = "sa_1b"
    grade_rows(rows, None)
    summary = summarize(rows, {"task": "V-Star", "mode": "p2r"})
    assert summary["mean_bbox_count"] == 1.0  # (2 + 0) / 2: the empty output is not counted
    assert summary["category_bbox_count"] == {"attribute": 1.0, "spatial": None}
    assert summary["subsets"]["V*"]["category_bbox_count"] == {"attribute": 1.0, "spatial": None}


@pytest.mark.parametrize(("extra", "message"), [
    (["--row", "a", "default", "m", "m", "--mode", "p2r"], "--row names each row's mode and models: drop --mode"),
    (["--row", "a", "default", "m", "m", "--model", "m"], "drop --model"),
    (["--row", "a/b", "default", "m", "m"], "--row a/b: a row name is letters"),
    (["--row", "a", "nope", "m", "m"], "--row a: mode 'nope' is not one of default, thinking, p2r"),
    (["--row", "a", "p2r", "m", "m", "--row", "a", "default", "m", "m"], "--row a: given twice"),
])
def test_matrix_rows_are_checked_before_any_engine(synthetic_dir: Path, tmp_path: Path, extra: list[str],
                                                   message: str) -> None:
    """``p2r eval --row``: a row that cannot run fails in one line before an engine starts."""
    from click.testing import CliRunner

    from p2r.eval.cli import eval_command

    result = CliRunner().invoke(eval_command, ["--task", "synthetic", "--data", str(synthetic_dir),
                                               "--out", str(tmp_path / "out"), *extra])
    assert result.exit_code != 0 and message in str(result.exception), result.output
    assert not (tmp_path / "out").exists()

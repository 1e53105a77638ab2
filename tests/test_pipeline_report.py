"""The pipeline report (controller/report.py): built from a trainer's ``metrics.jsonl`` written by
the trainer's own writer and from evaluation summaries written by the evaluation's own writer,
read back the way the report step reads them; the table's numbers, both claims on each side of
their thresholds, the PNG, the pages and the sparkline."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from p2r.controller.config import MATRIX_ROWS
from p2r.controller.graph import _row_summary
from p2r.controller.report import (
    P2R_GAIN_POINTS,
    SPARK,
    STAGE1_REWARD_GAIN,
    build_report,
    format_outputs,
    sparkline,
    write_report,
)
from p2r.eval.report import summarize, write_reports
from p2r.trainer.state import append_metrics, read_metrics, trim_metrics

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _metrics(workdir: Path, rewards: list[float | None], dropped: list[int], skipped_at: set[int]) -> Path:
    """A metrics.jsonl as the trainer writes it: a row per step (the trainer's keys), a validation
    row, and a step past the checkpoint that a resume trims; through the trainer's writer."""
    workdir.mkdir(parents=True, exist_ok=True)  # the trainer's workdir exists before its first step
    path = workdir / "metrics.jsonl"
    skipped = 0
    for step, (reward, drop) in enumerate(zip(rewards, dropped, strict=True), start=1):
        skipped += step in skipped_at
        append_metrics(path, {"step": step, "epoch": 0, "prompts": 3, "rollouts": 12, "kept": 12 - drop,
                              "dropped": drop, "reward_mean": reward, "skipped_steps": skipped, "kl": 0.0})
        if step == 2:
            append_metrics(path, {"step": 2, "val/accuracy": 0.5, "val/samples": 4})
    append_metrics(path, {"step": len(rewards) + 1, "reward_mean": 99.0, "dropped": 0, "skipped_steps": skipped})
    assert trim_metrics(path, len(rewards)) == 1  # the resumed run's view: the step past the checkpoint goes
    return path


def _eval_out(root: Path, accuracy: dict[str, int], n: int = 20) -> dict[str, dict[str, Any]]:
    """Each matrix row's summary.json through the evaluation's writer (``accuracy`` in 5 % steps
    of ``n`` questions), read back as the eval step records it."""
    rows = {}
    for name, percent in accuracy.items():
        right = percent * n // 100
        results = [{"uid": str(i), "subset": "synthetic", "category": "dot-colour", "correct": i < right,
                    "bbox_count": 1, "perceiver_output": "[]", "with_evidence": True} for i in range(n)]
        out = root / name
        out.mkdir(parents=True)
        write_reports(out, summarize(results, {"task": "synthetic", "mode": MATRIX_ROWS[name][1]}), [], results)
        rows[name] = _row_summary(str(root), name)
    return rows


STAGE1 = [0.2, 0.3, 0.25, 0.35, 0.4, 0.5, 0.55, 0.6, None, 0.65, 0.7, 0.55]  # 12 steps, one all-dropped
STAGE2 = [0.5, 0.5, 0.6]


def test_report_from_trainer_metrics_and_eval_summaries(tmp_path: Path) -> None:
    s1 = _metrics(tmp_path / "s1", STAGE1, [0, 1, 0, 0, 2, 0, 0, 0, 12, 0, 0, 0], skipped_at={4, 11})
    s2 = _metrics(tmp_path / "s2", STAGE2, [0, 0, 3], skipped_at=set())
    rows = _eval_out(tmp_path / "eval", {"base-default": 25, "base-p2r": 30, "stage1-base-p2r": 45,
                                         "final-default": 30, "final-p2r": 55})
    report = build_report(rows, {"stage1": read_metrics(s1), "stage2": read_metrics(s2)})

    # The table: each row's accuracy and n as the evaluation summarised them.
    out = report.outputs()
    assert {k: (r["label"], r["n"], r["overall"]) for k, r in out["rows"].items()} == {
        "base-default": ("base / default", 20, 25.0), "base-p2r": ("base / p2r", 20, 30.0),
        "stage1-base-p2r": ("stage-1 perceiver + base reasoner / p2r", 20, 45.0),
        "final-default": ("final / default", 20, 30.0), "final-p2r": ("final / p2r", 20, 55.0)}
    # Rewards: validation rows and the trimmed step left out; an all-dropped step (None) skipped.
    r1 = out["rewards"]["stage1"]
    assert r1["steps"] == 12
    assert r1["first5"] == pytest.approx((0.2 + 0.3 + 0.25 + 0.35 + 0.4) / 5)
    assert r1["last5"] == pytest.approx((0.6 + 0.65 + 0.7 + 0.55) / 4)
    assert r1["diff"] == pytest.approx(r1["last5"] - r1["first5"])
    assert out["rewards"]["stage2"]["first5"] == out["rewards"]["stage2"]["last5"] == pytest.approx(1.6 / 3)
    # Per step: dropped as recorded, skipped from the trainer's running count.
    curve = report.curves["stage1"]
    assert curve.dropped == [0, 1, 0, 0, 2, 0, 0, 0, 12, 0, 0, 0]
    assert curve.skipped == [0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 1, 0]
    assert (r1["dropped"], r1["skipped"]) == (15, 2)
    assert out["claims"]["stage1_reward"]["met"] is True  # +0.325
    assert out["claims"]["p2r_accuracy"]["met"] is True  # 55 >= 30 + 15 and >= 30

    files = write_report(report, tmp_path / "staging", str(tmp_path / "eval"))
    png = Path(files["curves"]).read_bytes()
    assert png.startswith(PNG_MAGIC) and len(png) > 5000
    md, page = Path(files["report"]).read_text(), Path(files["report_html"]).read_text()
    assert "![reward curves](reward-curves.png)" in md
    assert "| stage-1 perceiver + base reasoner / p2r | 20 | 45.0 |" in md
    assert "| 9 | - | 12 | 0 |" in md and "| 11 | 0.700 | 0 | 1 |" in md  # stage 1's per-step table
    assert "data:image/png;base64," in page and "<td class='met'>met</td>" in page

    text = format_outputs(out)
    assert f"stage1 reward {curve.sparkline()} {r1['first5']:.3f} -> {r1['last5']:.3f}" in text
    assert "final / p2r" in text and "55.0" in text and text.count(": met - ") == 2


@pytest.mark.parametrize(("last", "met"), [(0.35, True), (0.349, False)])
def test_stage1_claim_at_its_threshold(tmp_path: Path, last: float, met: bool) -> None:
    """Five steps at 0.2, five at ``last``: a gain of exactly 0.15 meets the claim, less does not."""
    path = _metrics(tmp_path, [0.2] * 5 + [last] * 5, [0] * 10, set())
    report = build_report({}, {"stage1": read_metrics(path)})
    claim = report.outputs()["claims"]["stage1_reward"]
    assert claim["met"] is met and claim["detail"].startswith(f"0.200 -> {last:.3f}")
    assert STAGE1_REWARD_GAIN == 0.15


@pytest.mark.parametrize(("accuracy", "met"), [
    ({"final-p2r": 45, "final-default": 30, "base-p2r": 45}, True),  # exactly +15, equal to base p2r
    ({"final-p2r": 40, "final-default": 30, "base-p2r": 20}, False),  # +10 over default only
    ({"final-p2r": 50, "final-default": 30, "base-p2r": 55}, False),  # +20, but below base p2r
    ({"final-p2r": 50, "base-p2r": 20}, None),  # final default not evaluated: not measured
])
def test_p2r_claim_on_both_sides(tmp_path: Path, accuracy: dict[str, int], met: bool | None) -> None:
    report = build_report(_eval_out(tmp_path, accuracy), {})
    assert report.outputs()["claims"]["p2r_accuracy"]["met"] is met
    assert P2R_GAIN_POINTS == 15.0
    assert report.outputs()["claims"]["stage1_reward"]["met"] is None  # no stage-1 metrics: not measured


def test_sparkline() -> None:
    assert sparkline([0.0, 1.0, 0.5, None, 1.0]) == "▁█▅ █"
    assert sparkline([0.41, 0.41]) == "▁▁"
    assert sparkline([]) == ""
    assert sparkline([float(i) for i in range(100)], width=8) == SPARK  # averaged in 8 buckets, still rising
    assert json.dumps(sparkline([1.0]))  # one value: one (lowest) bar, serialisable into the state

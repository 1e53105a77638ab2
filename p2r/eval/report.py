"""Scoring, aggregation and the evaluation's outputs: ``results.jsonl``, ``summary.json``,
``report.md`` and ``report.html``.

Accuracy is the ``mca`` rule (benchmark letters) on the extracted answer, × 100, per category
and overall, per subset (HR-Bench 4K / 8K) - the paper's table. A row the verifier could not
grade (``correct`` null) is counted as ungraded and left out of the accuracy, never scored 0.
"""

from __future__ import annotations

import base64
import html
import io
import json
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from p2r.core.answers import extract_closed_answer
from p2r.core.bbox import Region
from p2r.core.evidence import highlight
from p2r.core.grading import GradeItem, grade_batch
from p2r.core.prompts import AnswerForm
from p2r.eval.benchmarks import EvalSample
from p2r.eval.inference import Output

RESULTS = "results.jsonl"
SUMMARY = "summary.json"
REPORT_MD = "report.md"
REPORT_HTML = "report.html"


def eval_answer(reply: str, mode: str) -> str | None:
    """The answer the reference grades: in ``default`` mode the whole reply, stripped; in
    ``thinking`` and ``p2r`` the first closed ``<answer>`` only (None: no answer, scored wrong),
    so "... the answer is b." without tags is wrong whatever the truth."""
    if mode == "default":
        return reply.strip()
    return extract_closed_answer(reply)


def result_row(sample: EvalSample, out: Output, mode: str) -> dict[str, Any]:
    """One ``results.jsonl`` row before grading (``correct`` is filled by ``grade_rows``);
    ``extracted_answer`` is null when the reply has no answer under the mode's rule."""
    return {
        "uid": sample.uid, "subset": sample.subset, "category": sample.category,
        "answer_form": sample.form.value, "question": sample.question, "prompt": out.prompt,
        "ground_truth": sample.answer, "raw_output": out.reply, "extracted_answer": eval_answer(out.reply, mode),
        "perceiver_output": out.perceiver_output, "bbox_count": len(out.regions),
        "regions": [[r.x1, r.y1, r.x2, r.y2, r.label] for r in out.regions],
        "with_evidence": out.with_evidence, "letters": sample.letters, "correct": None,
    }


def grade_rows(rows: Sequence[dict[str, Any]], verifier: Any | None) -> None:
    """Fill ``correct`` from each row's ``extracted_answer``: a row without one is wrong; else
    rules for mca/na (the row's letters), the verifier for free_form (left null without one)."""
    by_letters: dict[str, list[int]] = defaultdict(list)
    for i, row in enumerate(rows):
        if row["extracted_answer"] is None:
            row["correct"] = False
        elif row["answer_form"] != AnswerForm.FREE_FORM.value or verifier is not None:
            by_letters[row["letters"]].append(i)
    for letters, idx in by_letters.items():
        items = [GradeItem(rows[i]["raw_output"], rows[i]["ground_truth"], AnswerForm(rows[i]["answer_form"]),
                           rows[i]["question"], answer=rows[i]["extracted_answer"]) for i in idx]
        for i, verdict in zip(idx, grade_batch(items, verifier, letters), strict=True):
            rows[i]["correct"] = verdict


def _accuracy(rows: Iterable[dict[str, Any]]) -> float | None:
    graded = [r["correct"] for r in rows if r["correct"] is not None]
    return round(100.0 * sum(graded) / len(graded), 2) if graded else None


def _mean_bbox_count(rows: Iterable[dict[str, Any]]) -> float | None:
    """The reference's figure: mean boxes over the samples whose perceiver output was non-empty."""
    counts = [r["bbox_count"] for r in rows if r.get("perceiver_output")]
    return round(sum(counts) / len(counts), 3) if counts else None


def _block(rows: list[dict[str, Any]], p2r: bool = False) -> dict[str, Any]:
    by_cat: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        by_cat[r["category"]].append(r)
    block = {
        "n": len(rows),
        "graded": sum(r["correct"] is not None for r in rows),
        "overall": _accuracy(rows),
        "categories": {c: _accuracy(rs) for c, rs in sorted(by_cat.items())},
        "category_n": {c: len(rs) for c, rs in sorted(by_cat.items())},
    }
    if p2r:
        block["mean_bbox_count"] = _mean_bbox_count(rows)
        block["category_bbox_count"] = {c: _mean_bbox_count(rs) for c, rs in sorted(by_cat.items())}
    return block


def summarize(rows: list[dict[str, Any]], meta: dict[str, Any]) -> dict[str, Any]:
    """The aggregated table: overall, per category, and per subset; in p2r mode also the mean
    bbox count (overall and per category, over samples with a non-empty perceiver output)."""
    p2r = meta.get("mode") == "p2r"
    by_subset: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        by_subset[r["subset"]].append(r)
    summary = {**meta, **_block(rows, p2r), "ungraded": sum(r["correct"] is None for r in rows),
               "subsets": {s: _block(rs, p2r) for s, rs in sorted(by_subset.items())}}
    if p2r:
        summary["with_evidence_fraction"] = round(sum(bool(r["with_evidence"]) for r in rows) / max(1, len(rows)), 3)
    return summary


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def table_rows(summary: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """The paper-style table: one row per subset, one column per category, then overall."""
    categories = sorted({c for s in summary["subsets"].values() for c in s["categories"]})
    header = ["subset", *categories, "overall", "n"]
    body = [[name, *(_fmt(s["categories"].get(c)) for c in categories), _fmt(s["overall"]), str(s["n"])]
            for name, s in summary["subsets"].items()]
    if len(summary["subsets"]) > 1:
        body.append(["all", *(_fmt(summary["categories"].get(c)) for c in categories), _fmt(summary["overall"]),
                     str(summary["n"])])
    return header, body


def text_table(summary: dict[str, Any]) -> str:
    header, body = table_rows(summary)
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True)))
             for row in [header, *body]]
    return "\n".join([lines[0], "-" * len(lines[0]), *lines[1:]])


def _markdown(summary: dict[str, Any]) -> str:
    header, body = table_rows(summary)
    lines = [f"# {summary['task']} — {summary['mode']} mode", "",
             f"Model: `{summary.get('model')}`" + (f", perceiver `{summary['perceiver_model']}`"
                                                  if summary.get("perceiver_model") else ""), "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    lines += ["", f"Samples: {summary['n']} (graded {summary['graded']}, ungraded {summary['ungraded']}). "
              "Accuracy × 100 with the benchmark's multiple-choice rule on the extracted answer."]
    if "mean_bbox_count" in summary:
        lines.append(f"Mean boxes per sample with perceiver output: {summary['mean_bbox_count']}; "
                     f"with evidence: {100 * summary['with_evidence_fraction']:.1f} %.")
    lines += ["", "Settings: `" + json.dumps(summary.get("settings", {})) + "`", ""]
    return "\n".join(lines)


def _thumbnail(sample: EvalSample, row: dict[str, Any]) -> str:
    """The sample's image with the predicted boxes drawn, as an inline PNG data URI."""
    image = sample.image.load()
    regions = [Region(*r[:4], r[4]) for r in row["regions"]]
    image = highlight(image, regions) if regions else image.convert("RGB")
    image.thumbnail((480, 480))
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _html(summary: dict[str, Any], examples: list[tuple[EvalSample, dict[str, Any]]]) -> str:
    header, body = table_rows(summary)
    esc = html.escape
    table = ("<table><tr>" + "".join(f"<th>{esc(h)}</th>" for h in header) + "</tr>"
             + "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in body) + "</table>")
    cards = []
    for sample, row in examples:
        verdict = {True: "correct", False: "wrong", None: "ungraded"}[row["correct"]]
        cards.append(
            f'<div class="card"><img src="{_thumbnail(sample, row)}" alt="{esc(sample.uid)}">'
            f"<p><b>{esc(sample.uid)}</b> ({esc(sample.category)}) — {verdict}</p>"
            f"<p>{esc(sample.question)}</p><p>truth <b>{esc(row['ground_truth'])}</b>, "
            f"answer <b>{esc((row['extracted_answer'] or '-')[:200])}</b>, boxes {row['bbox_count']}</p></div>")
    return ("<!doctype html><html><head><meta charset='utf-8'>"
            f"<title>{esc(summary['task'])} {esc(summary['mode'])}</title><style>"
            "body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
            "td,th{border:1px solid #999;padding:4px 10px;text-align:right}"
            ".card{display:inline-block;vertical-align:top;width:500px;margin:8px}</style></head><body>"
            f"<h1>{esc(summary['task'])} — {esc(summary['mode'])} mode</h1>"
            f"<p>Model <code>{esc(str(summary.get('model')))}</code>; {summary['n']} samples.</p>"
            f"{table}<h2>Examples</h2>{''.join(cards)}</body></html>")


def write_reports(out_dir: Path, summary: dict[str, Any], samples: Sequence[EvalSample],
                  rows: Sequence[dict[str, Any]], examples: int = 4) -> None:
    """summary.json, report.md and report.html (a few examples, preferring ones with boxes)."""
    (out_dir / SUMMARY).write_text(json.dumps(summary, indent=1) + "\n")
    (out_dir / REPORT_MD).write_text(_markdown(summary))
    by_uid = {s.uid: s for s in samples}
    chosen = sorted((r for r in rows if r["uid"] in by_uid), key=lambda r: -r["bbox_count"])[:examples]
    (out_dir / REPORT_HTML).write_text(_html(summary, [(by_uid[r["uid"]], r) for r in chosen]))

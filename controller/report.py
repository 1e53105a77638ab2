"""The pipeline report: does this run show the P2R claim? (``report`` step, after an eval matrix)

From the evaluation matrix (one summary per row, graph.py ``_eval``) and the two stages'
per-step training records (the trainer's ``metrics.jsonl``, ``p2r.trainer.state.read_metrics``)
it builds the accuracy table, each stage's reward trend (the mean reward of its first and last
``WINDOW`` steps), per-step dropped and skipped counts, and the two claims the pipeline is
meant to demonstrate, each met or not with its numbers:

(i)  stage 1 learns: the last-5 mean reward >= the first-5 mean + ``STAGE1_REWARD_GAIN``;
(ii) P2R pays: final p2r accuracy >= final default + ``P2R_GAIN_POINTS`` and >= base p2r.

``write_report`` puts ``report.md``, ``report.html`` (the curves embedded as a data URI, so the
page stands alone in S3) and ``reward-curves.png`` into the eval output; ``format_outputs``
renders the recorded numbers as text for ``p2r pipeline run`` (with one sparkline per stage).
"""

from __future__ import annotations

import base64
import html
import io
import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

WINDOW = 5
STAGE1_REWARD_GAIN = 0.15
P2R_GAIN_POINTS = 15.0  # accuracy is x100 (p2r.eval.report)
TOLERANCE = 1e-9  # 0.35 - 0.2 is 0.1499...: a gain of exactly the threshold meets it
STAGES = ("stage1", "stage2")
SPARK = "▁▂▃▄▅▆▇█"
SPARK_WIDTH = 40
REPORT_MD, REPORT_HTML, CURVES_PNG = "report.md", "report.html", "reward-curves.png"


# ------------------------------------------------------------------------------- numbers


def _mean(values: Sequence[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return sum(known) / len(known) if known else None


@dataclass
class Curve:
    """One stage's training steps, from its ``metrics.jsonl`` rows (training steps only)."""

    stage: str
    steps: list[int] = field(default_factory=list)
    rewards: list[float | None] = field(default_factory=list)
    dropped: list[int] = field(default_factory=list)  # reward items dropped at that step
    skipped: list[int] = field(default_factory=list)  # 1 where the update was skipped (non-finite)

    @classmethod
    def from_metrics(cls, stage: str, rows: Sequence[dict[str, Any]]) -> Curve:
        curve, before = cls(stage), 0
        for row in rows:
            curve.steps.append(int(row["step"]))
            reward = row.get("reward_mean")
            curve.rewards.append(float(reward) if reward is not None else None)
            curve.dropped.append(int(row.get("dropped") or 0))
            total = int(row.get("skipped_steps") or 0)  # the trainer counts skipped steps cumulatively
            curve.skipped.append(max(0, total - before))
            before = total
        return curve

    @property
    def first(self) -> float | None:
        return _mean(self.rewards[:WINDOW])

    @property
    def last(self) -> float | None:
        return _mean(self.rewards[-WINDOW:])

    @property
    def diff(self) -> float | None:
        return None if self.first is None or self.last is None else self.last - self.first

    def sparkline(self, width: int = SPARK_WIDTH) -> str:
        return sparkline(self.rewards, width)

    def summary(self) -> dict[str, Any]:
        return {"steps": len(self.steps), "first5": self.first, "last5": self.last, "diff": self.diff,
                "dropped": sum(self.dropped), "skipped": sum(self.skipped), "sparkline": self.sparkline()}


def sparkline(values: Sequence[float | None], width: int = SPARK_WIDTH) -> str:
    """One character per value (▁ lowest .. █ highest of the curve; a gap for an unknown one),
    values averaged in equal buckets when there are more than ``width``."""
    if len(values) > width:
        edges = [round(i * len(values) / width) for i in range(width + 1)]
        values = [_mean(values[a:b]) for a, b in itertools.pairwise(edges)]
    known = [v for v in values if v is not None]
    if not known:
        return " " * len(values)
    low, span = min(known), max(known) - min(known)
    top = len(SPARK) - 1
    return "".join(" " if v is None else SPARK[0 if span == 0 else min(top, int((v - low) / span * top + 0.5))]
                   for v in values)


@dataclass
class Claim:
    key: str
    text: str
    met: bool | None  # None: not measured (a row or a stage's metrics missing)
    detail: str

    @property
    def verdict(self) -> str:
        return "not measured" if self.met is None else "met" if self.met else "not met"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _num(value: float | None, sign: bool = False) -> str:
    return "-" if value is None else f"{value:+.3f}" if sign else f"{value:.3f}"


def stage1_claim(curve: Curve | None) -> Claim:
    text = f"stage 1: last-{WINDOW} mean reward >= first-{WINDOW} mean + {STAGE1_REWARD_GAIN}"
    if curve is None or curve.diff is None:
        return Claim("stage1_reward", text, None, "no stage-1 rewards recorded")
    assert curve.first is not None and curve.last is not None
    met = curve.diff >= STAGE1_REWARD_GAIN - TOLERANCE
    return Claim("stage1_reward", text, met,
                 f"{_num(curve.first)} -> {_num(curve.last)} ({_num(curve.diff, sign=True)})")


def p2r_claim(rows: dict[str, dict[str, Any]]) -> Claim:
    text = (f"final p2r accuracy >= final default + {P2R_GAIN_POINTS:g} points and >= base p2r")
    acc = {name: (rows.get(name) or {}).get("overall") for name in ("final-p2r", "final-default", "base-p2r")}
    missing = [name for name, value in acc.items() if value is None]
    if missing:
        return Claim("p2r_accuracy", text, None, f"no accuracy for {', '.join(missing)}")
    final, default, base = acc["final-p2r"], acc["final-default"], acc["base-p2r"]
    met = final >= default + P2R_GAIN_POINTS - TOLERANCE and final >= base - TOLERANCE
    return Claim("p2r_accuracy", text, met,
                 f"final p2r {_pct(final)}, final default {_pct(default)} ({final - default:+.1f}), "
                 f"base p2r {_pct(base)} ({final - base:+.1f})")


@dataclass
class Report:
    rows: dict[str, dict[str, Any]]  # row name -> label, n, overall, ... (graph.py _row_summary)
    curves: dict[str, Curve]
    claims: list[Claim]

    def outputs(self) -> dict[str, Any]:
        """What the run state records (small: no per-step lists, a sparkline instead)."""
        return {
            "rows": {name: {"label": r["label"], "n": r["n"], "overall": r["overall"]}
                     for name, r in self.rows.items()},
            "rewards": {stage: c.summary() for stage, c in self.curves.items()},
            "claims": {c.key: {"text": c.text, "met": c.met, "detail": c.detail} for c in self.claims},
        }


def build_report(rows: dict[str, dict[str, Any]], metrics: dict[str, Sequence[dict[str, Any]]]) -> Report:
    """``rows``: the eval step's matrix rows; ``metrics``: stage -> its training-step rows."""
    curves = {stage: Curve.from_metrics(stage, metrics.get(stage, ())) for stage in STAGES}
    return Report(rows, curves, [stage1_claim(curves["stage1"]), p2r_claim(rows)])


# ------------------------------------------------------------------------------ rendering


def format_outputs(outputs: dict[str, Any]) -> str:
    """The report step's recorded outputs as text: the table, the reward trends with their
    sparklines, the claims. ``p2r pipeline run`` prints it at the end of a run."""
    rows, rewards, claims = outputs.get("rows") or {}, outputs.get("rewards") or {}, outputs.get("claims") or {}
    width = max([len("ROW"), *(len(r["label"]) for r in rows.values())]) + 2
    lines = [f"{'ROW':<{width}}{'N':>5}  ACCURACY"]
    lines += [f"{r['label']:<{width}}{r['n']:>5}  {_pct(r['overall'])}" for r in rows.values()]
    for stage, r in rewards.items():
        if r["steps"]:
            lines.append(f"{stage} reward {r['sparkline']} {_num(r['first5'])} -> {_num(r['last5'])} "
                         f"(first/last {WINDOW} steps, {_num(r['diff'], sign=True)}; {r['steps']} steps, "
                         f"{r['dropped']} dropped, {r['skipped']} skipped)")
        else:
            lines.append(f"{stage} reward: no per-step metrics recorded")
    for c in claims.values():
        verdict = "not measured" if c["met"] is None else "met" if c["met"] else "NOT met"
        lines.append(f"claim: {c['text']}: {verdict} - {c['detail']}")
    return "\n".join(lines)


def curves_png(curves: dict[str, Curve]) -> bytes:
    """Both stages' reward per step, side by side, with the first/last-window means dashed."""
    import matplotlib

    matplotlib.use("Agg")  # no display: controllers run in pods and terminals
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(10, 3.6), dpi=100)
    for i, (stage, curve) in enumerate(curves.items()):
        ax = fig.add_subplot(1, len(curves), i + 1)
        points = [(s, r) for s, r in zip(curve.steps, curve.rewards, strict=True) if r is not None]
        if points:
            ax.plot([s for s, _ in points], [r for _, r in points], marker="o", markersize=3, linewidth=1.2)
            for value, style, name in ((curve.first, "--", f"first {WINDOW}"), (curve.last, ":", f"last {WINDOW}")):
                if value is not None:
                    ax.axhline(value, linestyle=style, color="grey", linewidth=1, label=f"{name}: {value:.3f}")
            ax.legend(loc="best", fontsize=8)
        else:
            ax.text(0.5, 0.5, "no per-step metrics", ha="center", va="center", transform=ax.transAxes)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole
        ax.set_title(f"{stage} reward")
        ax.set_xlabel("step")
        ax.set_ylabel("mean reward")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _steps_table(curve: Curve) -> tuple[list[str], list[list[str]]]:
    return (["step", "reward", "dropped", "skipped"],
            [[str(s), _num(r), str(d), str(k)]
             for s, r, d, k in zip(curve.steps, curve.rewards, curve.dropped, curve.skipped, strict=True)])


def _tables(report: Report) -> list[tuple[str, list[str], list[list[str]]]]:
    """(title, header, rows) of every table, shared by the Markdown and the HTML."""
    tables = [("Accuracy", ["row", "n", "accuracy"],
               [[r["label"], str(r["n"]), _pct(r["overall"])] for r in report.rows.values()])]
    tables.append(("Training reward", ["stage", "steps", f"first {WINDOW}", f"last {WINDOW}", "difference"],
                   [[stage, str(len(c.steps)), _num(c.first), _num(c.last), _num(c.diff, sign=True)]
                    for stage, c in report.curves.items()]))
    tables.append(("Claims", ["claim", "verdict", "measured"], [[c.text, c.verdict, c.detail] for c in report.claims]))
    for stage, curve in report.curves.items():
        tables.append((f"{stage}: per step", *_steps_table(curve)))
    return tables


def markdown(report: Report) -> str:
    out = ["# P2R pipeline report", ""]
    for title, header, rows in _tables(report):
        if title.endswith("per step"):
            continue
        out += [f"## {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        out += ["| " + " | ".join(cells) + " |" for cells in rows] + [""]
        if title == "Training reward":
            out += [f"![reward curves]({CURVES_PNG})", ""]
    for title, header, rows in _tables(report):
        if title.endswith("per step"):
            out += [f"## {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            out += ["| " + " | ".join(cells) + " |" for cells in rows] if rows else ["| - | - | - | - |"]
            out.append("")
    return "\n".join(out)


def html_page(report: Report, png: bytes) -> str:
    esc = html.escape
    parts = ["<!doctype html><meta charset='utf-8'><title>P2R pipeline report</title>",
             "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;margin-bottom:1.5em}"
             "td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}.met{color:#080}.no{color:#b00}</style>",
             "<h1>P2R pipeline report</h1>"]
    for title, header, rows in _tables(report):
        parts.append(f"<h2>{esc(title)}</h2><table><tr>" + "".join(f"<th>{esc(h)}</th>" for h in header) + "</tr>")
        for cells in rows:
            css = {"met": " class='met'", "not met": " class='no'"}
            parts.append("<tr>" + "".join(f"<td{css.get(c, '') if title == 'Claims' else ''}>{esc(c)}</td>"
                                          for c in cells) + "</tr>")
        parts.append("</table>")
        if title == "Training reward":
            data = base64.b64encode(png).decode()
            parts.append(f"<img alt='reward curves' src='data:image/png;base64,{data}'>")
    return "\n".join(parts) + "\n"


def write_report(report: Report, staging: Path, out: str) -> dict[str, str]:
    """Write the three files into ``staging`` and copy them to ``out`` (a path, file:// or
    s3://, as the evaluation's outputs); returns their URIs."""
    from p2r.services.checkpoints import put_files

    staging.mkdir(parents=True, exist_ok=True)
    png = curves_png(report.curves)
    (staging / CURVES_PNG).write_bytes(png)
    (staging / REPORT_MD).write_text(markdown(report))
    (staging / REPORT_HTML).write_text(html_page(report, png))
    put_files(staging, [CURVES_PNG, REPORT_MD, REPORT_HTML], out)
    out = out.rstrip("/")
    return {"report": f"{out}/{REPORT_MD}", "report_html": f"{out}/{REPORT_HTML}", "curves": f"{out}/{CURVES_PNG}"}


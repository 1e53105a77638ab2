"""Evaluation through real vLLM engines on a tiny model: the three modes in one process and
through local Ray Data (identical per-sample results), resume, s3:// data and outputs, and the
role services as the backend."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from p2r.core.images import PixelBounds
from p2r.eval.benchmarks import load_benchmark
from p2r.eval.inference import BackendSpec, EvalSettings
from p2r.eval.runner import evaluate, spec_meta

pytestmark = pytest.mark.engine

MODES = ("default", "thinking", "p2r")
# Small budgets: the tiny model never stops by itself, and the token counts change nothing here.
# (The same numbers as the CLI flags below, so the CLI run must reproduce the in-process one.)
SETTINGS = EvalSettings(bounds=PixelBounds(16384, 65536), default_max_tokens=16, thinking_max_tokens=16,
                        perceive_max_tokens=24, reason_max_tokens=16)
CLI_SETTINGS = ["--max-new-tokens", "16", "--perceive-max-tokens", "24", "--max-pixels", "65536",
                "--max-model-len", "8192", "--max-num-seqs", "8", "--batch-size", "2"]


@pytest.fixture(scope="module")
def lively_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny model whose greedy replies depend on the image and question (init std 0.2), so
    that mixing up samples between workers would show."""
    from p2r.models.tiny import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("lively"), init_std=0.2)


def _spec(model: Path) -> BackendSpec:
    from p2r.services.engine import EngineLimits

    return BackendSpec(SETTINGS, model=str(model), limits=EngineLimits(max_model_len=8192, max_num_seqs=8))


def _rows(path: Path) -> dict[str, dict]:
    lines = path.read_text().splitlines()
    return {r["uid"]: r for r in map(json.loads, lines[1:])}


@pytest.fixture(scope="module")
def local_run(lively_model: Path, synthetic_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    out = tmp_path_factory.mktemp("eval-local")
    samples = load_benchmark("synthetic", synthetic_dir)
    spec = _spec(lively_model)
    evaluate(samples, spec, {m: out / m for m in MODES}, spec_meta(spec, "synthetic"), batch_size=2)
    yield out


def test_modes_in_one_process(local_run: Path, synthetic_dir: Path) -> None:
    n = len(load_benchmark("synthetic", synthetic_dir))
    rows = {m: _rows(local_run / m / "results.jsonl") for m in MODES}
    assert all(len(r) == n for r in rows.values())
    uid = next(iter(rows["p2r"]))
    # each mode sent its own prompt; p2r kept the perceiver output and its box count
    assert rows["default"][uid]["prompt"].endswith("from the given choices (e.g., A, B, etc.) directly.\n") \
        or rows["default"][uid]["answer_form"] != "mca"
    assert rows["thinking"][uid]["prompt"].startswith("Question: ")
    assert "\nThink step by step. \n" in rows["thinking"][uid]["prompt"]
    assert all(r["perceiver_output"] is not None and r["bbox_count"] == len(r["regions"])
               for r in rows["p2r"].values())
    assert all(r["perceiver_output"] is None for r in rows["default"].values())
    # the replies depend on the sample (otherwise the identity check below would prove little)
    assert len({r["raw_output"] for r in rows["thinking"].values()}) > 1
    for m in MODES:
        summary = json.loads((local_run / m / "summary.json").read_text())
        assert summary["mode"] == m and summary["n"] == n
        graded = [r for r in rows[m].values() if r["correct"] is not None]
        expected = round(100 * sum(r["correct"] for r in graded) / len(graded), 2)
        assert summary["overall"] == expected
        assert (local_run / m / "report.html").is_file()


def test_rerun_skips_what_is_done(local_run: Path, lively_model: Path, synthetic_dir: Path) -> None:
    samples = load_benchmark("synthetic", synthetic_dir)
    spec = _spec(lively_model)
    before = (local_run / "p2r" / "results.jsonl").read_text()
    summary = evaluate(samples, spec, {"p2r": local_run / "p2r"}, spec_meta(spec, "synthetic"))["p2r"]
    assert summary["evaluated_now"] == 0 and summary["n"] == len(samples)
    assert (local_run / "p2r" / "results.jsonl").read_text() == before


def test_cli_over_ray_from_s3_gives_identical_results(local_run: Path, lively_model: Path, synthetic_dir: Path,
                                                      s3_server: dict[str, str], tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """``p2r eval`` with data and outputs on S3, all three modes sharded over local Ray Data with
    two engine replicas: every per-sample row equals the single-process run's."""
    from p2r.services.checkpoints import download_prefix, put_files

    names = [str(p.relative_to(synthetic_dir)) for p in sorted(synthetic_dir.rglob("*")) if p.is_file()]
    for key, value in s3_server.items():  # for this test only: later tests must not inherit credentials
        monkeypatch.setenv(key, value)
    put_files(synthetic_dir, names, "s3://evaldata/synthetic")
    env = {**os.environ, "P2R_CACHE": str(tmp_path / "cache"), "VLLM_CPU_KVCACHE_SPACE": "1"}
    cmd = [sys.executable, "-m", "p2r.cli", "eval", "--task", "synthetic", "--data", "s3://evaldata/synthetic",
           "--mode", "default", "--mode", "thinking", "--mode", "p2r", "--model", str(lively_model),
           "--out", "s3://evalout/run1", "--ray-workers", "2", *CLI_SETTINGS]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [json.loads(x) for x in done.stdout.strip().splitlines()]
    assert [x["mode"] for x in lines] == list(MODES)
    download_prefix("s3://evalout/run1", tmp_path / "got")
    for m in MODES:
        assert sorted(p.name for p in (tmp_path / "got" / m).iterdir()) == [
            "report.html", "report.md", "results.jsonl", "summary.json"]
        assert _rows(tmp_path / "got" / m / "results.jsonl") == _rows(local_run / m / "results.jsonl"), m
        assert json.loads((tmp_path / "got" / m / "summary.json").read_text())["ray_workers"] == 2
    # bad input: one line, exit 2
    bad = subprocess.run([*cmd[:7], "s3://evaldata/nothing-here", *cmd[8:]], env=env, capture_output=True,
                         text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.strip().startswith("p2r: error: --data s3://evaldata/nothing-here")


def test_role_services_as_backend(role_server, synthetic_dir: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    samples = load_benchmark("synthetic", synthetic_dir)[:3]
    spec = BackendSpec(SETTINGS, reasoner_endpoint=role_server.target, perceiver_endpoint=role_server.target,
                       verifier_endpoint=role_server.target)
    summaries = evaluate(samples, spec, {"p2r": tmp_path / "p2r"}, spec_meta(spec, "synthetic"))
    rows = _rows(tmp_path / "p2r" / "results.jsonl")
    assert len(rows) == 3 and all(r["perceiver_output"] is not None for r in rows.values())
    # free-form answers went to the verifier service: graded, not left null
    assert summaries["p2r"]["ungraded"] == 0
    # the baseline modes' prompts are not the services' (thinking's pre has its own space)
    for mode in ("default", "thinking"):
        with pytest.raises(ValueError, match="--mode default and --mode thinking run in process"):
            evaluate(samples, spec, {mode: tmp_path / mode}, spec_meta(spec, "synthetic"))


def test_matrix_rows_share_one_engine_and_match_fresh_engines(engine, lively_model: Path,  # type: ignore[no-untyped-def]
                                                              tiny_model_dir: Path, local_run: Path,
                                                              synthetic_dir: Path, tmp_path: Path) -> None:
    """``p2r eval --row``'s evaluation matrix on the session's running engine: its weights are
    reloaded in place between checkpoints, and a row on reloaded weights gives, per sample, the
    rows a fresh engine on that checkpoint gave (``local_run``); a row whose perceiver and
    reasoner differ perceives with the one and answers with the other."""
    from p2r.eval.matrix import MATRIX, evaluate_rows, parse_rows
    from p2r.services.engine import EngineLimits

    lively, tiny = str(lively_model), str(tiny_model_dir)
    rows = parse_rows([("lively-default", "default", lively, lively), ("lively-p2r", "p2r", lively, lively),
                       ("mixed-p2r", "p2r", tiny, lively), ("tiny-default", "default", tiny, tiny)])
    samples = load_benchmark("synthetic", synthetic_dir)
    try:
        summaries = evaluate_rows(samples, rows, tmp_path, "synthetic", SETTINGS,
                                  EngineLimits(max_model_len=8192, max_num_seqs=8), batch_size=2, engine=engine)
    finally:
        engine.reload_weights(tiny)  # the session's engine goes back to its own weights whatever happened
    got = {r.name: _rows(tmp_path / r.name / "results.jsonl") for r in rows}
    assert got["lively-default"] == _rows(local_run / "default" / "results.jsonl")
    assert got["lively-p2r"] == _rows(local_run / "p2r" / "results.jsonl")
    assert {u: r["perceiver_output"] for u, r in got["mixed-p2r"].items()} == \
        {u: r["perceiver_output"] for u, r in got["lively-p2r"].items()}
    assert {u: r["raw_output"] for u, r in got["tiny-default"].items()} != \
        {u: r["raw_output"] for u, r in got["lively-default"].items()}  # the weights did change
    record = json.loads((tmp_path / MATRIX).read_text())
    # tiny -> lively once; the mixed row's 3 chunks perceive (lively) then answer (tiny): 5 more.
    assert (record["reloads"], record["engine_start_s"]) == (6, 0.0)
    assert [(r["out"], r["n"]) for r in record["rows"]] == [(r.name, len(samples)) for r in rows]
    assert all(summaries[r.name]["n"] == len(samples) for r in rows)
    meta = json.loads((tmp_path / "mixed-p2r" / "results.jsonl").read_text().splitlines()[0])["meta"]
    assert (meta["model"], meta["perceiver_model"]) == (tiny, lively)

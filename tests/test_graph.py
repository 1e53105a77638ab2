"""The controller's step loop (``controller/graph.py``): which failures it retries, and that a bug
fails the run at once with its traceback in the log at ERROR."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes.client.exceptions import ApiException
from urllib3.exceptions import ProtocolError

from p2r.controller.config import ConfigError, load_pipeline_config
from p2r.controller.graph import Context, Step, StepFailed, _walk, prepare_state, transient
from p2r.controller.local import LocalBackend
from p2r.controller.state import FAILED, SUCCEEDED, FileStore

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "pipeline-local.yaml"


@pytest.mark.parametrize(("error", "retried"), [
    (StepFailed("stage1: p2r train exited with 1"), True),
    (ConnectionRefusedError("connection refused"), True),
    (TimeoutError("timed out"), True),
    (FileNotFoundError("s3://b/k: no such object"), True),
    (ProtocolError("connection aborted"), True),
    (ApiException(status=503, reason="Service Unavailable"), True),
    (ApiException(status=429, reason="Too Many Requests"), True),
    (ApiException(status=403, reason="Forbidden"), False),
    (ApiException(status=422, reason="Unprocessable Entity"), False),
    (KeyError("outputs"), False),
    (TypeError("unsupported operand"), False),
    (AttributeError("'NoneType' object has no attribute 'name'"), False),
    (ConfigError("stage1.model is set by the pipeline"), False),
])
def test_transient(error: Exception, retried: bool) -> None:
    assert transient(error) is retried


def _context(tmp_path: Path) -> Context:
    config = yaml.safe_load(EXAMPLE.read_text())
    config.update(workdir=str(tmp_path / "work"), storage=str(tmp_path / "storage"),
                  base_model=str(tmp_path / "work" / "tiny-model"), data=str(tmp_path / "work" / "d.parquet"),
                  retry={"max_attempts": 3, "backoff_s": 0, "backoff_max_s": 0})
    config["eval"]["data"] = str(tmp_path / "work" / "eval")
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(config))
    pipeline = load_pipeline_config(path)
    store = FileStore(pipeline.workdir_path)
    return Context(pipeline, {}, store, LocalBackend(pipeline))


def _run(tmp_path: Path, fn: Any) -> tuple[str, dict[str, Any]]:
    ctx = _context(tmp_path)
    steps = [Step("work", fn)]
    ctx.state = prepare_state(ctx.config, ctx.store, steps)
    return _walk(ctx, steps), ctx.state


def test_a_bug_is_not_retried_and_its_traceback_is_logged_at_error(tmp_path: Path,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    calls: list[int] = []

    def buggy(ctx: Context) -> dict[str, Any]:
        calls.append(ctx.attempt)
        return {"model": ctx.outputs("no-such-step")}  # KeyError: a programming error

    with caplog.at_level(logging.ERROR, logger="p2r.pipeline"):
        outcome, state = _run(tmp_path, buggy)
    assert outcome == FAILED and calls == [1]
    assert state["reason"] == "work failed (not transient, not retried): KeyError: 'no-such-step'"
    [record] = [r for r in caplog.records if r.exc_info and r.exc_info[0] is KeyError]
    assert record.levelno == logging.ERROR and "not retried" in record.getMessage()


def test_transient_failures_are_retried_up_to_max_attempts(tmp_path: Path) -> None:
    calls: list[int] = []

    def flaky(ctx: Context) -> dict[str, Any]:
        calls.append(ctx.attempt)
        if len(calls) < 3:
            raise ConnectionResetError("connection reset by peer")
        return {"done": True}

    outcome, state = _run(tmp_path, flaky)
    assert outcome == SUCCEEDED and calls == [1, 2, 3] and state["steps"]["work"]["outputs"] == {"done": True}

    def failing(ctx: Context) -> dict[str, Any]:
        raise StepFailed("p2r train exited with 1")

    outcome, state = _run(tmp_path / "again", failing)
    assert outcome == FAILED and state["reason"] == "work failed after 3 attempts: p2r train exited with 1"

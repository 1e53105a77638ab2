"""The local pipeline: the whole graph on the tiny model and synthetic data with real services,
trainers and evaluation (a controller SIGKILL in the middle), cancel, retries, and config errors.

The full-graph test is the README's main command (examples/pipeline-local.yaml) with test paths and
smoke sizes (``SMOKE``); the sizes of the measurement itself run in the main command.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml

from p2r.controller.local import pid_alive
from p2r.controller.storage import verify_checkpoint
from p2r.services.checkpoints import complete_checkpoints

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "pipeline-local.yaml"


# The example's sizes are the README main job's, a measurement of minutes; these tests check the
# controller's wiring (kills, cancel, S3, retries), so they run every step at smoke size on the
# session's random tiny model and objects data. The method's signal is tested on the pretrained base
# in test_signal.py.
SMOKE = {
    "prepare": {"tiny_model": True, "train_samples": 6, "eval_samples": 6},
    "stage1": {"max_steps": 2, "rollouts_per_prompt": 4, "prompts_per_step": 3, "max_response_tokens": 16,
               "frozen_max_tokens": 8},
    "stage2": {"max_steps": 2, "rollouts_per_prompt": 2, "prompts_per_step": 3, "max_response_tokens": 8,
               "frozen_max_tokens": 8},
    "eval": {"limit": 6},
}


def local_config(tmp_path: Path, tiny_model_dir: Path | None, synthetic_dir: Path | None, **over: Any) -> Path:
    """The README example with its paths moved under tmp_path and its sizes at ``SMOKE`` (the
    session's tiny model and data are reused when given; otherwise the prepare step builds them)."""
    config = yaml.safe_load(EXAMPLE.read_text())
    for key, smaller in SMOKE.items():
        config[key] = smaller if key == "prepare" else {**config[key], **smaller}
    work = tmp_path / "work"
    config.update(workdir=str(work), storage=str(tmp_path / "storage"))
    config["base_model"] = str(tiny_model_dir) if tiny_model_dir else str(work / "tiny-model")
    config["data"] = str(synthetic_dir / "train.parquet") if synthetic_dir else str(work / "synthetic/train.parquet")
    config["eval"]["data"] = str(work / "synthetic-eval")
    config.update(over)
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def start(config: Path, log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as f:
        return subprocess.Popen([sys.executable, "-m", "p2r.cli", "pipeline", "run", "--config", str(config)],
                                stdout=f, stderr=subprocess.STDOUT, cwd=ROOT,
                                env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"})


def p2r(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    """``p2r ARGS`` in ``cwd``: the example config's relative paths resolve against it."""
    return subprocess.run([sys.executable, "-m", "p2r.cli", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=120)


def read_state(work: Path) -> dict[str, Any]:
    try:
        return json.loads((work / "state.json").read_text())  # type: ignore[no-any-return]
    except (FileNotFoundError, json.JSONDecodeError):
        return {"steps": {}, "services": {}}


def wait_state(work: Path, what: str, probe: Any, proc: subprocess.Popen[bytes], timeout: float = 400) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = probe(read_state(work))
        if value:
            return value
        assert proc.poll() is None, f"controller exited (rc {proc.returncode}) before {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.3)


def serve_pids(work: Path) -> list[int]:
    """Live p2r serve processes of this workdir."""
    marker = f"--config {work / 'serve.yaml'}"
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if "p2r.cli serve" in cmd and marker in cmd and pid_alive(int(proc.name)):
                pids.append(int(proc.name))
    return pids


def cleanup(work: Path, *procs: subprocess.Popen[bytes]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    for pid in serve_pids(work):
        os.kill(pid, signal.SIGKILL)


@pytest.mark.engine
def test_full_graph_on_the_tiny_model_through_s3_with_a_controller_kill(
        tmp_path: Path, tiny_model_dir: Path, synthetic_dir: Path, s3_server: dict[str, str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Checkpoints and the evaluation go to a real S3 server (moto, through minio): stage 1's
    checkpoint is uploaded, verified there, downloaded by the perceiver server and stage 2."""
    for key, value in s3_server.items():
        monkeypatch.setenv(key, value)  # for the controller and this test's own reads
    bucket = f"pipeline-{uuid.uuid4().hex[:8]}"
    config = local_config(tmp_path, tiny_model_dir, synthetic_dir, storage=f"s3://{bucket}")
    work, log = tmp_path / "work", tmp_path / "controller.log"
    proc = start(config, log)
    second = proc
    try:
        # Kill the controller while stage 2 trains: the trainer must die with it, the servers
        # survive and are adopted, and nothing before stage 2 runs again.
        trainer = wait_state(work, "stage 2's trainer", lambda s: s["steps"].get("stage2", {}).get("outputs", {})
                             .get("pid"), proc)
        services_before = {k: v["pid"] for k, v in read_state(work)["services"].items()}
        assert set(services_before) == {"reasoner+verifier", "perceiver"}
        time.sleep(3)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        deadline = time.monotonic() + 15
        while pid_alive(trainer) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not pid_alive(trainer), "the trainer outlived its controller"
        assert sorted(serve_pids(work)) == sorted(services_before.values())

        second = start(config, log)
        assert second.wait(timeout=420) == 0, log.read_text()[-4000:]
    finally:
        cleanup(work, proc, second)
    output = log.read_text()
    state = read_state(work)
    assert state["status"] == "succeeded", output[-3000:]
    attempts = {name: r["attempts"] for name, r in state["steps"].items()}
    assert attempts == dict.fromkeys(state["steps"], 1), attempts
    assert output.count("starting p2r serve") == 2  # both servers adopted after the kill
    assert sorted(p.name for p in (work / "logs").glob("stage1-*.log")) == ["stage1-attempt-1.log"]
    assert serve_pids(work) == [] and state["services"] == {}  # everything stopped at the end
    assert s3_server["AWS_SECRET_ACCESS_KEY"] not in (work / "state.json").read_text() + (config.read_text())

    # Checkpoints: complete in S3, verified file by file, and loaded by vLLM (serve_perceiver
    # served stage 1 from S3, the evaluation ran on stage 2).
    stage1 = state["steps"]["verify_stage1"]["outputs"]["checkpoint"]
    stage2 = state["steps"]["verify_stage2"]["outputs"]["checkpoint"]
    assert stage1 == f"s3://{bucket}/tiny-demo/stage1/step-2"
    assert [s for s, _ in complete_checkpoints(f"s3://{bucket}/tiny-demo/stage2")] == [2]
    for uri in (stage1, stage2):
        assert verify_checkpoint(uri)["files"] >= 5
    assert state["steps"]["serve_perceiver"]["outputs"]["models"] == {"perceiver": stage1}
    train2 = yaml.safe_load((work / "stage2" / "train.yaml").read_text())
    assert train2["model"] == stage1 and train2["role"] == "reasoner"

    # The evaluation matrix (the local default): every row's questions answered by its models,
    # in one p2r eval (one engine), each row's outputs in its own folder.
    out = tmp_path / "eval-copy"
    files = {str(p.relative_to(out)) for p in download_prefix(f"s3://{bucket}/tiny-demo/eval", out)}
    assert {"report.md", "report.html", "reward-curves.png", "matrix.json"} <= files
    base = str(tiny_model_dir)
    models = {"base-default": (base, None), "base-p2r": (base, base), "stage1-base-p2r": (base, stage1),
              "final-default": (stage2, None), "final-p2r": (stage2, stage2)}
    evaluated = state["steps"]["eval"]["outputs"]["rows"]
    assert list(evaluated) == list(models)
    for name, (model, perceiver) in models.items():
        assert {f"{name}/{f}" for f in ("summary.json", "results.jsonl", "report.md", "report.html")} <= files
        summary = json.loads((out / name / "summary.json").read_text())
        assert (summary["n"], summary["model"], summary["perceiver_model"]) == (6, model, perceiver), name
        assert summary["mode"] == evaluated[name]["mode"] == name.rsplit("-", 1)[1]
        assert evaluated[name]["overall"] == summary["overall"]
        rows = [json.loads(line) for line in (out / name / "results.jsonl").read_text().splitlines()]
        assert len([r for r in rows if "meta" not in r]) == 6  # a header line, then one row per question
    printed = (work / "logs" / "eval-attempt-1.out").read_text().splitlines()  # one p2r eval, a line per row
    assert [json.loads(line)["row"] for line in printed] == list(models)
    # The report: the final p2r row's numbers in the state, the table and both stages' curves.
    final = json.loads((out / "final-p2r" / "summary.json").read_text())
    report = state["steps"]["report"]["outputs"]
    assert report["categories"] == final["categories"] and set(report["categories"]) >= {"attribute", "count"}
    assert {r: v["overall"] for r, v in report["rows"].items()} == {r: v["overall"] for r, v in evaluated.items()}
    assert {s: r["steps"] for s, r in report["rewards"].items()} == {"stage1": 2, "stage2": 2}
    assert set(report["claims"]) == {"stage1_reward", "p2r_accuracy"}
    assert (out / "reward-curves.png").read_bytes().startswith(b"\x89PNG")
    assert "stage1 reward " in output and "stage-1 perceiver + base reasoner / p2r" in output  # printed at the end
    status = p2r("pipeline", "status", "--config", str(config))
    assert status.returncode == 0 and "succeeded" in status.stdout and f"overall={final['overall']:.1f}" \
        in status.stdout


def download_prefix(uri: str, target: Path) -> list[Path]:
    """Every object under an s3:// prefix, copied into ``target``."""
    from p2r.services.checkpoints import s3_client

    bucket, prefix = uri[5:].split("/", 1)
    client = s3_client()
    files = []
    for obj in client.list_objects(bucket, prefix=prefix + "/", recursive=True):
        local = target / obj.object_name[len(prefix) + 1:]
        client.fget_object(bucket, obj.object_name, str(local))
        files.append(local)
    return files


@pytest.mark.engine
def test_cancel_stops_the_trainer_and_the_servers(tmp_path: Path, tiny_model_dir: Path, synthetic_dir: Path) -> None:
    config = local_config(tmp_path, tiny_model_dir, synthetic_dir)
    work, log = tmp_path / "work", tmp_path / "controller.log"
    proc = start(config, log)
    try:
        trainer = wait_state(work, "stage 1's trainer",
                             lambda s: s["steps"].get("stage1", {}).get("outputs", {}).get("pid"), proc)
        servers = serve_pids(work)
        assert len(servers) == 1
        cancel = p2r("pipeline", "cancel", "--config", str(config))
        assert cancel.returncode == 0, cancel.stderr
        assert cancel.stdout.strip() == "run tiny-demo cancelled: cancelled at stage1"
        assert proc.wait(timeout=60) == 1
    finally:
        cleanup(work, proc)
    assert log.read_text().strip().splitlines()[-1] == "p2r: error: run tiny-demo cancelled: cancelled at stage1"
    assert not pid_alive(trainer) and serve_pids(work) == []
    state = read_state(work)
    assert state["status"] == "cancelled" and state["steps"]["stage1"]["status"] == "cancelled"
    assert state["steps"]["verify_stage1"]["status"] == "pending"


def test_a_failing_step_is_retried_with_backoff_then_the_run_stops(tmp_path: Path) -> None:
    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "config.json").write_text("{}")  # no weights: p2r serve refuses it
    (tmp_path / "train.parquet").write_bytes(b"never read: the run stops before stage 1")
    config = local_config(tmp_path, None, None, base_model=str(broken), prepare=None,
                          data=str(tmp_path / "train.parquet"),
                          retry={"max_attempts": 2, "backoff_s": 1.5, "backoff_max_s": 10})
    run = p2r("pipeline", "run", "--config", str(config))
    assert run.returncode == 1
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith("p2r: error: run tiny-demo failed: serve_reasoner failed after 2 attempts: p2r serve "
                           "reasoner verifier did not start:"), last
    assert "no *.safetensors" in last
    state = read_state(tmp_path / "work")
    history = state["steps"]["serve_reasoner"]["history"]
    assert [h["attempt"] for h in history] == [1, 2]
    assert history[1]["started"] - history[0]["finished"] >= 1.5  # the backoff was waited
    assert state["steps"]["stage1"]["status"] == "pending" and serve_pids(tmp_path / "work") == []
    status = p2r("pipeline", "status", "--config", str(config))
    assert status.returncode == 0 and "serve_reasoner  failed" in status.stdout and "no *.safetensors" in status.stdout


def visible_entries(folder: Path) -> list[str]:
    """A folder's entries without the hidden ones (.venv, .pytest_cache, .ruff_cache), which tools
    other than the code under test create."""
    return sorted(name for name in os.listdir(folder) if not name.startswith("."))


@pytest.mark.parametrize(("change", "message"), [
    ({"stage1": {"aws_secret_access_key": "x"}}, "stage1.aws_secret_access_key: credentials do not belong in the "
                                                 "pipeline config"),
    ({"kubernetes": {"token": "abc"}}, "kubernetes.token: credentials do not belong"),
    ({"stage1": {"model": "other"}}, "stage1.model is set by the pipeline, remove it"),
    ({"stage2": {"rollouts": 3}}, "stage2.rollouts: unknown setting"),
    ({"stage1": {"learning_rate": -1}}, "stage1.learning_rate: Input should be greater than 0"),
    ({"name": "Bad_Name"}, "name: must be lower-case letters"),
    ({"storage": "gs://bucket"}, "storage: use a directory, file:// or s3://"),
    ({"retries": 3}, "retries: Extra inputs are not permitted"),
    ({"prepare": None, "base_model": "/nonexistent/model"}, "base_model: no such directory /nonexistent/model"),
    ({"backend": "kubernetes", "storage": "s3://bucket"}, "prepare builds local files: use it with backend: local"),
    ({"backend": "kubernetes", "prepare": None, "storage": "/tmp/x"}, "backend: kubernetes needs storage: s3://"),
])
def test_config_errors_are_one_line_and_exit_2(tmp_path: Path, change: dict[str, Any], message: str) -> None:
    config = yaml.safe_load(EXAMPLE.read_text())
    for key, value in change.items():
        if isinstance(value, dict) and isinstance(config.get(key), dict):
            config[key].update(value)
        else:
            config[key] = value
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(config))
    checkout = visible_entries(ROOT)
    for command in ("run", "status", "cancel") if "credentials" in message else ("run",):
        # Run where the example's relative paths (workdir: p2r-pipeline, ...) land: tmp_path.
        result = p2r("pipeline", command, "--config", str(path), cwd=tmp_path)
        assert result.returncode == 2
        assert result.stderr.count("\n") == 1 and result.stderr.startswith(f"p2r: error: {message}"), result.stderr
    # A bad config writes nothing: no workdir, state or storage where they would land, nor in the checkout.
    assert os.listdir(tmp_path) == ["p.yaml"]
    assert visible_entries(ROOT) == checkout


def test_status_of_a_run_never_started(tmp_path: Path) -> None:
    config = local_config(tmp_path, None, None)
    result = p2r("pipeline", "status", "--config", str(config))
    assert result.returncode == 2
    assert result.stderr == f"p2r: error: run tiny-demo has no state in {tmp_path}/work/state.json (not started)\n"
    missing = p2r("pipeline", "run", "--config", str(tmp_path / "nope.yaml"))
    assert missing.returncode == 2 and missing.stderr == f"p2r: error: --config: no such file {tmp_path}/nope.yaml\n"

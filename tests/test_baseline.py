"""The plain GRPO baseline role (issue 15 item 12): ``p2r train --role baseline`` as the reference
trains it - the original image, the no-evidence reasoner prompt, the role's own answer graded -
its optional controller steps, its manifests, and a short real run on the tiny model."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import yaml

from p2r.core import prompts
from p2r.core.images import MIN_PIXELS, PixelBounds, resize_for_model
from p2r.data.dataset import load_samples
from p2r.trainer.config import ROLE_LENGTHS, TrainConfig

ROOT = Path(__file__).resolve().parent.parent


def test_baseline_prompt_is_the_original_image_and_the_no_evidence_prompt_in_the_policy_layout(
        synthetic_dir: Path) -> None:
    """Reference baseline: the original image only and ``"Question: {q}\\nThink step by step.\\n"`` +
    post, laid out as the trained policy's prompt ([image, "\\n" + text]); no frozen perceiver."""
    from p2r.trainer.loop import Trainer

    samples = load_samples(synthetic_dir / "train.parquet")[:3]
    bounds = PixelBounds(MIN_PIXELS, 65536)
    me = SimpleNamespace(cfg=SimpleNamespace(role="baseline", max_prompt_tokens=10**6), perceiver=None,
                         bounds=bounds, counter=None)
    requests = Trainer.requests(me, samples, None)  # type: ignore[arg-type]
    for sample, request in zip(samples, requests, strict=True):
        text = prompts.reasoner_text(sample.question, sample.form, with_evidence=False)
        assert text.startswith(f"Question: {sample.question}\nThink step by step.\nProvide your detailed")
        assert request.messages == prompts.policy_messages(text, 1)
        assert request.messages[1]["content"] == [{"type": "image"}, {"type": "text", "text": "\n" + text}]
        [image] = request.images
        assert image.tobytes() == resize_for_model(sample.load_image(), bounds).tobytes()


def test_baseline_config_needs_no_frozen_role_and_has_the_reasoner_lengths(tmp_path: Path) -> None:
    cfg = TrainConfig(role="baseline", model="m", data=tmp_path / "d.parquet", output=str(tmp_path / "o"))
    assert cfg.reasoner_endpoint is None and cfg.perceiver_endpoint is None
    lengths = ROLE_LENGTHS["baseline"]
    assert (cfg.max_prompt_tokens, cfg.max_response_tokens, cfg.max_model_len) == (
        lengths["max_prompt_tokens"], lengths["max_response_tokens"], lengths["max_model_len"]) == (8704, 2048, 12288)


# ------------------------------------------------------------------------------- controller


def _pipeline(tmp_path: Path, tiny_model_dir: Path, synthetic_dir: Path, **over: Any) -> Path:
    config = yaml.safe_load((ROOT / "examples" / "pipeline-local.yaml").read_text())
    config.pop("prepare", None)
    config.update(workdir=str(tmp_path / "work"), storage=str(tmp_path / "storage"), base_model=str(tiny_model_dir),
                  data=str(synthetic_dir / "train.parquet"), **over)
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_baseline_is_an_optional_step_of_the_graph(tmp_path: Path, tiny_model_dir: Path,
                                                   synthetic_dir: Path) -> None:
    """Without ``baseline:`` the graph is the P2R run; with it, ``baseline`` trains from the base
    model with only the verifier served, and ``verify_baseline`` checks its checkpoint, before
    the evaluation. Its settings are validated with the trainer's own model at load time."""
    from p2r.controller.config import ConfigError, load_pipeline_config
    from p2r.controller.graph import build_graph

    plain = load_pipeline_config(_pipeline(tmp_path, tiny_model_dir, synthetic_dir))
    assert plain.baseline is None and "baseline" not in [s.name for s in build_graph(plain)]
    config = load_pipeline_config(_pipeline(tmp_path, tiny_model_dir, synthetic_dir,
                                            baseline={"max_steps": 1, "max_model_len": 2048,
                                                      "max_response_tokens": 8}))
    steps = build_graph(config)
    names = [s.name for s in steps]
    assert names[names.index("verify_stage2") + 1 : names.index("eval")] == ["baseline", "verify_baseline"]
    assert steps[names.index("baseline")].needs == frozenset({"verifier"})
    values = config.train_config("baseline", "baseline", config.base_model, {"verifier": "v:1"}, "w")
    assert values["role"] == "baseline" and values["model"] == config.base_model
    assert values["output"] == f"{config.run_root}/baseline" and "reasoner_endpoint" not in values
    with pytest.raises(ConfigError, match=r"^baseline.rollouts: unknown setting"):
        load_pipeline_config(_pipeline(tmp_path, tiny_model_dir, synthetic_dir, baseline={"rollouts": 3}))
    with pytest.raises(ConfigError, match=r"^baseline.role is set by the pipeline"):
        load_pipeline_config(_pipeline(tmp_path, tiny_model_dir, synthetic_dir, baseline={"role": "perceiver"}))


# -------------------------------------------------------------------------------- manifests


def test_baseline_manifests_build_validate_and_run_the_baseline_role(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """``kubectl kustomize manifests/baseline``: only the baseline PyTorchJob (stage 1's pod
    template, renamed) and its ConfigMap; both validate strictly, the command parses with the
    real CLI and the config loads in the real TrainConfig as role baseline, with the pod's
    ``P2R_TRAIN_*`` env (the S3 paths come from the release's bucket and runs prefix there), and
    writes under the runs prefix the writer user may write."""
    from tests.k8s_support import (
        KUBE_VERSIONS,
        KUBECTL,
        MANIFESTS,
        containers,
        one,
        parse_p2r_command,
        pod_security_errors,
        pod_specs,
        pytorchjob_errors,
        validation_errors,
    )

    out = subprocess.run([str(KUBECTL), "kustomize", str(MANIFESTS / "baseline")], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    docs = [d for d in yaml.safe_load_all(out.stdout) if d]
    assert sorted((d["kind"], d["metadata"]["name"]) for d in docs) == [
        ("ConfigMap", "p2r-baseline-config"), ("PyTorchJob", "p2r-baseline")]
    errors = [e for v in KUBE_VERSIONS for d in docs for e in validation_errors(d, v)]
    job = one(docs, "PyTorchJob", "p2r-baseline")
    errors += pytorchjob_errors(job)
    errors += [e for name, spec in pod_specs(docs) for e in pod_security_errors(name, spec)]
    assert not errors, "\n".join(errors)
    assert job["spec"]["runPolicy"]["suspend"] is False
    config = one(docs, "ConfigMap", "p2r-baseline-config")["data"]["baseline.yaml"]
    (tmp_path / "baseline.yaml").write_text(config)
    [master] = containers(job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"])
    for env in master.get("env", []):
        if env["name"].startswith("P2R_TRAIN_") and "value" in env:
            monkeypatch.setenv(env["name"], env["value"])
    cfg = TrainConfig.load(tmp_path / "baseline.yaml")
    assert cfg.role == "baseline" and cfg.output.startswith("s3://p2r/runs/")
    for replica in job["spec"]["pytorchReplicaSpecs"].values():
        pod = replica["template"]
        assert pod["metadata"]["labels"]["p2r.io/stage"] == "baseline"
        assert pod["spec"]["volumes"][0] == {"name": "config", "configMap": {"name": "p2r-baseline-config"}}
        for c in containers(pod["spec"]):
            ctx = parse_p2r_command([*c["command"], *c.get("args", [])])
            assert ctx.command.name == "train" and ctx.params["role"] == "baseline"
            assert ctx.params["config_path"] == Path("/etc/p2r/baseline.yaml")


# ------------------------------------------------------------------------------ a real run


@pytest.mark.engine
def test_baseline_role_trains_against_the_verifier_only(tmp_path: Path, role_server: Any, tiny_model_dir: Path,
                                                        synthetic_dir: Path) -> None:
    """A short real run of the baseline role on the tiny model: rewards are its own graded
    answers (free_form by the verifier service, none dropped), no frozen perceiver is called, and
    the checkpoint is recorded as role baseline."""
    from p2r.services.checkpoints import MANIFEST
    from tests.test_trainer import metrics, train, write_config

    config = write_config(
        tmp_path / "baseline.yaml", role="baseline", model=tiny_model_dir, data=synthetic_dir / "train.parquet",
        output=tmp_path / "out", workdir=tmp_path / "work", verifier_endpoint=role_server.target,
        rollouts_per_prompt=2, prompts_per_step=3, learning_rate=1e-4, max_response_tokens=8, max_steps=2,
        dump_rollouts_every=1, seed=3)
    result = train(config, "--role", "baseline")
    rows = [r for r in metrics(tmp_path / "work") if "rollouts" in r]
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert r["rollouts"] == 6 and r["kept"] == 6 and r["dropped"] == 0
        assert 0.0 <= r["reward_mean"] <= 1.0 and "perceiver_calls" not in r and "bbox_count" not in r
    dumped = [json.loads(line) for line in (tmp_path / "work" / "rollouts" / "step-1.rank0.jsonl").open()]
    assert len(dumped) == 6 and all(d["reward"] in (0.0, 1.0) and d["bbox_count"] is None for d in dumped)
    manifest = json.loads((Path(result["checkpoint"]) / MANIFEST).read_text())
    assert manifest["role"] == "baseline" and manifest["step"] == 2

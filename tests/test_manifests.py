"""manifests/: the PyTorchJobs, eval Job and examples, as files and through both kustomize
overlays (built by the real kubectl). Built-in kinds validate strictly against the Kubernetes
OpenAPI schemas; PyTorchJobs against the Kubeflow CRD (closed to unknown keys) plus the operator
webhook's rules. The commands the pods run are parsed by the real ``p2r`` command line and the
trainer configs loaded by the real ``TrainConfig``, so the manifests cannot drift from the code."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import click
import pytest
import yaml

from tests.k8s_support import (
    KUBE_VERSIONS,
    MANIFESTS,
    containers,
    find,
    kustomize,
    one,
    parse_p2r_command,
    plaintext_credentials,
    pod_specs,
    pytorchjob_errors,
    render,
    validation_errors,
)

OVERLAYS = ("cpu-smoke", "gpu-production")


@pytest.fixture(scope="module")
def built() -> dict[str, list[dict[str, Any]]]:
    return {overlay: kustomize(overlay) for overlay in OVERLAYS}


def test_every_overlay_builds(built: dict[str, list[dict[str, Any]]]) -> None:
    overlays = sorted(p.name for p in (MANIFESTS / "overlays").iterdir() if p.is_dir())
    assert overlays == sorted(OVERLAYS)
    for docs in built.values():
        kinds = sorted((d["kind"], d["metadata"]["name"]) for d in docs)
        assert ("PyTorchJob", "p2r-stage1") in kinds and ("PyTorchJob", "p2r-stage2") in kinds
        assert ("Job", "p2r-eval") in kinds and ("ConfigMap", "p2r-train-config") in kinds


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_objects_validate_strictly(overlay: str, built: dict[str, list[dict[str, Any]]]) -> None:
    errors = [f"{v} {d['kind']}/{d['metadata']['name']}: {e}"
              for v in KUBE_VERSIONS for d in built[overlay] for e in validation_errors(d, v)]
    assert not errors, "\n".join(errors)


def _files() -> list[Path]:
    """Whole-object manifests (not kustomizations, patches or trainer configs)."""
    out = []
    for p in sorted(MANIFESTS.rglob("*.yaml")):
        docs = [d for d in yaml.safe_load_all(p.read_text()) if d]
        if docs and all(isinstance(d, dict) and "apiVersion" in d and d.get("kind") != "Kustomization"
                        for d in docs):
            out.append(p)
    return out


@pytest.mark.parametrize("path", _files(), ids=lambda p: str(p.relative_to(MANIFESTS)))
def test_manifest_files_validate_strictly(path: Path) -> None:
    """Each file on its own, as `kubectl apply -f` would send it."""
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    errors = [f"{d['kind']}: {e}" for v in KUBE_VERSIONS for d in docs for e in validation_errors(d, v)]
    assert not errors, "\n".join(errors)


def test_manifest_files_are_all_checked() -> None:
    names = {p.name for p in _files()}
    assert {"stage1-pytorchjob.yaml", "stage2-pytorchjob.yaml", "eval-job.yaml", "p2r-s3-secret.example.yaml",
            "data-pvc.yaml"} <= names


def test_pytorchjob_validation_catches_mistakes(built: dict[str, list[dict[str, Any]]]) -> None:
    """The PyTorchJob check is not a silent pass: typos and webhook rule violations are reported."""
    job = one(built["gpu-production"], "PyTorchJob", "p2r-stage1")
    assert pytorchjob_errors(job) == []
    bad = copy.deepcopy(job)
    bad["spec"]["pytorchReplicaSpecs"]["Master"]["restartPolicyy"] = "OnFailure"
    assert any("restartPolicyy" in e for e in pytorchjob_errors(bad))
    bad = copy.deepcopy(job)
    bad["spec"]["runPolicy"]["backoffLimit"] = "three"
    assert any("backoffLimit" in e for e in pytorchjob_errors(bad))
    bad = copy.deepcopy(job)
    bad["spec"]["pytorchReplicaSpecs"]["Master"]["replicas"] = 2
    assert "Master.replicas must be 1" in pytorchjob_errors(bad)
    bad = copy.deepcopy(job)
    bad["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0]["name"] = "trainer"
    assert any("named 'pytorch'" in e for e in pytorchjob_errors(bad))
    bad = copy.deepcopy(job)
    bad["spec"]["pytorchReplicaSpecs"]["Chief"] = bad["spec"]["pytorchReplicaSpecs"].pop("Worker")
    assert any("Chief" in e for e in pytorchjob_errors(bad))
    bad = copy.deepcopy(job)  # a misspelt key deep in the pod template
    bad["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0]["volumeMount"] = []
    assert any("volumeMount" in e and "containers/0" in e for e in pytorchjob_errors(bad))
    bad = copy.deepcopy(job)  # a wrong type in the pod template
    bad["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["terminationGracePeriodSeconds"] = "long"
    assert any("terminationGracePeriodSeconds" in e for e in pytorchjob_errors(bad))
    bad = copy.deepcopy(job)  # a required field of the spec
    del bad["spec"]["runPolicy"]
    assert any("runPolicy" in e for e in pytorchjob_errors(bad))
    bad = copy.deepcopy(job)
    bad["spec"]["pytorchReplicaSpecs"]["Master"]["restartPolicy"] = "Sometimes"
    assert any("restartPolicy" in e for e in pytorchjob_errors(bad))


def _gpus(c: dict[str, Any], kind: str) -> int:
    return int(c["resources"].get(kind, {}).get("nvidia.com/gpu", 0))


@pytest.mark.parametrize(("overlay", "per_job"), [("gpu-production", 4), ("cpu-smoke", 0)])
def test_gpu_resources_and_shared_memory(overlay: str, per_job: int, built: dict[str, list[dict[str, Any]]]) -> None:
    for job in find(built[overlay], "PyTorchJob"):
        total = 0
        for replica, spec in job["spec"]["pytorchReplicaSpecs"].items():
            pod = spec["template"]["spec"]
            c = pod["containers"][0]
            assert _gpus(c, "requests") == _gpus(c, "limits")
            total += spec["replicas"] * _gpus(c, "limits")
            shm = next(v for v in pod["volumes"] if v["name"] == "dshm")
            assert shm["emptyDir"]["medium"] == "Memory"
            assert {"name": "dshm", "mountPath": "/dev/shm"} in c["volumeMounts"], replica
            if per_job:
                assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
                assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])
        assert total == per_job, job["metadata"]["name"]
    eval_pod = one(built[overlay], "Job", "p2r-eval")["spec"]["template"]["spec"]
    assert all(_gpus(c, "limits") == 0 for c in containers(eval_pod))  # eval calls the deployed services


def _config(docs: list[dict[str, Any]], stage: str, tmp: Path) -> Any:
    from p2r.trainer.config import load_train_config

    path = tmp / f"{stage}.yaml"
    path.write_text(one(docs, "ConfigMap", "p2r-train-config")["data"][f"{stage}.yaml"])
    return load_train_config(path)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_trainer_pods_match_config_and_chart(overlay: str, built: dict[str, list[dict[str, Any]]],
                                             tmp_path: Path) -> None:
    """Configs load in the real TrainConfig; endpoints, Secret and S3 endpoint are the names a
    `helm install p2r charts/p2r` release creates; rank 0 exposes the metrics port the config
    serves, labelled for the chart's PodMonitor; stage 2 and eval wait suspended."""
    docs = built[overlay]
    chart = render({})
    chart_services = {s["metadata"]["name"]: {p["port"] for p in s["spec"]["ports"]} for s in find(chart, "Service")}
    chart_secret = one(chart, "Secret", "p2r-s3")
    for stage, role in (("stage1", "perceiver"), ("stage2", "reasoner")):
        cfg = _config(docs, stage, tmp_path)
        assert cfg.role == role
        for endpoint in filter(None, (cfg.reasoner_endpoint, cfg.perceiver_endpoint, cfg.verifier_endpoint)):
            host, port = endpoint.split(":")
            assert int(port) in chart_services[host], endpoint
        assert cfg.output.startswith("s3://p2r/")
        if stage == "stage2":  # stage 2 trains the stage-1 checkpoint, whatever its step
            stage1 = _config(docs, "stage1", tmp_path)
            assert cfg.model == f"latest:{stage1.output}"
        assert cfg.max_prompt_tokens + cfg.max_response_tokens <= cfg.max_model_len
        job = one(docs, "PyTorchJob", f"p2r-{stage}")
        assert job["spec"]["runPolicy"]["suspend"] is (stage == "stage2")
        for replica, spec in job["spec"]["pytorchReplicaSpecs"].items():
            pod = spec["template"]
            assert pod["metadata"]["labels"]["app.kubernetes.io/component"] == "trainer"
            assert pod["metadata"]["labels"]["app.kubernetes.io/part-of"] == "p2r"  # NetworkPolicy peer
            c = pod["spec"]["containers"][0]
            assert c["command"][:4] == ["p2r", "train", "--role", role]
            assert c["command"][5] == f"/etc/p2r/{stage}.yaml"
            env = {e["name"]: e for e in c["env"]}
            host, port = env["P2R_S3_ENDPOINT"]["value"].split(":")
            assert int(port) in chart_services[host]
            for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
                ref = env[key]["valueFrom"]["secretKeyRef"]
                assert ref["name"] == "p2r-s3" and ref["key"] in chart_secret["data"]
            ports = {p["name"]: p["containerPort"] for p in c.get("ports", [])}
            assert ports.get("metrics") == (cfg.metrics_port if replica == "Master" else None), replica
            assert cfg.metrics_host == "0.0.0.0"  # reachable from Prometheus, not only inside the pod
    assert one(docs, "Job", "p2r-eval")["spec"]["suspend"] is True


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_command_parses_with_the_real_cli(overlay: str, built: dict[str, list[dict[str, Any]]]) -> None:
    seen = set()
    for name, spec in pod_specs(built[overlay]):
        for c in containers(spec):
            argv = [*c["command"], *c.get("args", [])]
            assert argv[0] == "p2r", name
            ctx = parse_p2r_command(argv)
            seen.add(ctx.command.name)
            if ctx.command.name == "eval":
                modes = ctx.params.get("modes") or (ctx.params.get("mode"),)  # --mode may be repeated
                assert tuple(modes) == ("p2r",) and ctx.params["out_uri"].startswith("s3://p2r/")
    expected = {"train", "eval"} | ({"tiny", "synth"} if overlay == "cpu-smoke" else set())
    assert seen == expected


def test_cli_parse_check_rejects_a_bad_command() -> None:
    with pytest.raises(click.UsageError):
        parse_p2r_command(["p2r", "eval", "--task=V-Star-typo", "--data=/d", "--out=/o"])
    with pytest.raises(click.UsageError):
        parse_p2r_command(["p2r", "train", "--role", "verifier", "--config", "/c.yaml"])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_security_and_no_plaintext_credentials(overlay: str, built: dict[str, list[dict[str, Any]]]) -> None:
    docs = built[overlay]
    assert not plaintext_credentials(docs)
    assert not find(docs, "Secret")
    for name, spec in pod_specs(docs):
        assert spec["securityContext"]["runAsNonRoot"] is True and spec["automountServiceAccountToken"] is False
        assert spec["enableServiceLinks"] is False, name  # P2R_<SERVICE>_PORT would reach P2R_* settings
        for c in containers(spec):
            sc = c["securityContext"]
            assert sc["readOnlyRootFilesystem"] and not sc["allowPrivilegeEscalation"], (name, c["name"])
            assert sc["capabilities"]["drop"] == ["ALL"], (name, c["name"])


def test_example_secret_holds_only_placeholders() -> None:
    for path in (MANIFESTS / "examples").glob("*.yaml"):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc["kind"] == "Secret":
                assert set(doc["stringData"].values()) == {"REPLACE_ME"}, path

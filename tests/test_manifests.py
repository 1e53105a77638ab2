"""manifests/: the PyTorchJobs, eval Job and examples, as files and through both kustomize
overlays (built by the real kubectl). Built-in kinds validate strictly against the Kubernetes
OpenAPI schemas; PyTorchJobs against the Kubeflow CRD (closed to unknown keys) plus the operator
webhook's rules. The commands the pods run are parsed by the real ``p2r`` command line and the
trainer configs loaded by the real ``TrainConfig``, so the manifests cannot drift from the code."""

from __future__ import annotations

import copy
import re
import shutil
import sys
from pathlib import Path
from typing import Any

import click
import pytest
import yaml

from p2r.controller import pods
from tests.k8s_support import (
    KUBE_VERSIONS,
    KUBECTL,
    MANIFESTS,
    ROOT,
    _chart,
    containers,
    find,
    kustomize,
    merged_values,
    one,
    operator_env,
    parse_p2r_command,
    plaintext_credentials,
    pod_security_errors,
    pod_specs,
    pytorchjob_errors,
    render,
    torchrun_launch,
    validation_errors,
)

OVERLAYS = ("cpu-smoke", "gpu-multinode", "gpu-production")
RELEASE_FILE = {"cpu-smoke": "cpu-smoke", "gpu-production": "gpu-production",
                "gpu-multinode": "gpu-production"}  # gpu-multinode builds on gpu-production
# The release the manifests run beside: the chart's defaults with the verifier (the trainers'
# rewards and eval grade with it) and MinIO (their checkpoints) on, which the chart deploys by
# default only with its controller.
MANIFEST_RELEASE: dict[str, Any] = {"roles": {"verifier": {"enabled": True}}, "minio": {"enabled": True}}
# overlay -> (pods, processes per pod, GPUs per pod) of each stage's PyTorchJob
LAYOUTS = {"gpu-production": (1, 4, 4),  # the reference run: one pod with 4 GPUs under torchrun
           "gpu-multinode": (2, 4, 4),   # N pods x G GPUs
           "cpu-smoke": (2, 1, 0)}       # two one-process CPU pods (gloo)


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
        if docs and all(isinstance(d, dict) and "apiVersion" in d
                        and d.get("kind") not in ("Kustomization", "Component") for d in docs):
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
    job = one(built["gpu-multinode"], "PyTorchJob", "p2r-stage1")
    assert pytorchjob_errors(job) == []
    bad = copy.deepcopy(job)  # nprocPerNode is a string in the CRD ("4", "auto", "gpu")
    bad["spec"]["nprocPerNode"] = 4
    assert any("nprocPerNode" in e for e in pytorchjob_errors(bad))
    bad = copy.deepcopy(job)
    bad["spec"]["nprocPerNod"] = "4"
    assert any("nprocPerNod" in e for e in pytorchjob_errors(bad))
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


def _gib(quantity: str) -> float:
    units = {"Mi": 1 / 1024, "Gi": 1, "Ti": 1024}
    return float(quantity[:-2]) * units[quantity[-2:]]


def _pods(job: dict[str, Any]) -> list[tuple[str, int, dict[str, Any]]]:
    """(replica, index, pod spec) of every pod the operator creates for ``job``."""
    return [(replica, i, spec["template"]["spec"]) for replica, spec in job["spec"]["pytorchReplicaSpecs"].items()
            for i in range(spec["replicas"])]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_gpu_resources_and_shared_memory(overlay: str, built: dict[str, list[dict[str, Any]]]) -> None:
    """Every pod holds nprocPerNode GPUs (requests = limits) or none, and a memory-backed
    /dev/shm of at least 16Gi per rank on GPU pods (NCCL between the pod's local ranks)."""
    n_pods, nproc, gpus = LAYOUTS[overlay]
    for job in find(built[overlay], "PyTorchJob"):
        total = 0
        for replica, _, pod in _pods(job):
            c = pod["containers"][0]
            assert _gpus(c, "requests") == _gpus(c, "limits") == gpus, replica
            total += _gpus(c, "limits")
            shm = next(v for v in pod["volumes"] if v["name"] == "dshm")
            assert shm["emptyDir"]["medium"] == "Memory"
            assert {"name": "dshm", "mountPath": "/dev/shm"} in c["volumeMounts"], replica
            if gpus:
                assert _gib(shm["emptyDir"]["sizeLimit"]) >= 16 * nproc
                assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
                assert pod["priorityClassName"] == "p2r-training"
                assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])
        assert total == n_pods * gpus, job["metadata"]["name"]
    eval_pod = one(built[overlay], "Job", "p2r-eval")["spec"]["template"]["spec"]
    assert all(_gpus(c, "limits") == 0 for c in containers(eval_pod))  # eval calls the deployed services


def _env(c: dict[str, Any]) -> dict[str, str]:
    """A container's literal env values."""
    return {e["name"]: e["value"] for e in c.get("env", []) if "value" in e}


def _expand(argv: list[str], env: dict[str, str]) -> list[str]:
    """Kubernetes' ``$(VAR)`` expansion of command and args from the container's env."""
    return [re.sub(r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), a) for a in argv]


def _config(docs: list[dict[str, Any]], stage: str, tmp: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    """The stage's trainer config as ``p2r train`` loads it in the Master pod: the file plus the
    pod's ``P2R_TRAIN_*`` env (the role endpoints)."""
    from p2r.trainer.config import load_train_config

    path = tmp / f"{stage}.yaml"
    path.write_text(one(docs, "ConfigMap", "p2r-train-config")["data"][f"{stage}.yaml"])
    master = one(docs, "PyTorchJob", f"p2r-{stage}")["spec"]["pytorchReplicaSpecs"]["Master"]
    with monkeypatch.context() as m:
        for name, value in _env(master["template"]["spec"]["containers"][0]).items():
            if name.startswith("P2R_TRAIN_"):
                m.setenv(name, value)
        return load_train_config(path)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_trainer_pods_match_config_and_chart(overlay: str, built: dict[str, list[dict[str, Any]]],
                                             tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Configs load in the real TrainConfig; endpoints, Secret and S3 endpoint are the names a
    `helm install p2r charts/p2r` release creates; rank 0 exposes the metrics port the config
    serves, labelled for the chart's PodMonitor; stage 2 and eval wait suspended."""
    docs = built[overlay]
    chart = render(MANIFEST_RELEASE)
    chart_services = {s["metadata"]["name"]: {p["port"] for p in s["spec"]["ports"]} for s in find(chart, "Service")}
    chart_secrets = {s["metadata"]["name"]: s for s in find(chart, "Secret")}
    for stage, role in (("stage1", "perceiver"), ("stage2", "reasoner")):
        cfg = _config(docs, stage, tmp_path, monkeypatch)
        assert cfg.role == role
        for endpoint in filter(None, (cfg.reasoner_endpoint, cfg.perceiver_endpoint, cfg.verifier_endpoint)):
            host, port = endpoint.split(":")
            assert int(port) in chart_services[host], endpoint
        assert cfg.output.startswith("s3://p2r/")
        if stage == "stage2":  # stage 2 trains the stage-1 checkpoint, whatever its step
            stage1 = _config(docs, "stage1", tmp_path, monkeypatch)
            assert cfg.model == f"latest:{stage1.output}"
        assert cfg.max_prompt_tokens + cfg.max_response_tokens <= cfg.max_model_len
        job = one(docs, "PyTorchJob", f"p2r-{stage}")
        assert job["spec"]["runPolicy"]["suspend"] is (stage == "stage2")
        for replica, spec in job["spec"]["pytorchReplicaSpecs"].items():
            pod = spec["template"]
            assert pod["metadata"]["labels"]["app.kubernetes.io/component"] == "trainer"
            assert pod["metadata"]["labels"]["app.kubernetes.io/part-of"] == "p2r"  # NetworkPolicy peer
            c = pod["spec"]["containers"][0]
            assert c["command"] == pods.TORCHRUN  # torchrun starts nprocPerNode ranks of p2r train
            assert c["args"][:3] == ["train", "--role", role]
            assert c["args"][4] == f"/etc/p2r/{stage}.yaml"
            env = {e["name"]: e for e in c["env"]}
            host, port = env["P2R_S3_ENDPOINT"]["value"].split(":")
            assert int(port) in chart_services[host]
            for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
                ref = env[key]["valueFrom"]["secretKeyRef"]
                assert ref["name"] == "p2r-s3-writer" and ref["key"] in chart_secrets[ref["name"]]["data"]
            ports = {p["name"]: p["containerPort"] for p in c.get("ports", [])}
            assert ports.get("metrics") == (cfg.metrics_port if replica == "Master" else None), replica
            assert cfg.metrics_host == "0.0.0.0"  # reachable from Prometheus, not only inside the pod
    assert one(docs, "Job", "p2r-eval")["spec"]["suspend"] is True


def _pod_env(docs: list[dict[str, Any]], name: str, c: dict[str, Any]) -> dict[str, str]:
    """A container's env as its pod sees it: its own, plus the training operator's for a
    PyTorchJob (checked per pod by :func:`test_torchrun_places_the_ranks`; the Master's here)."""
    kind, job_name = name.split("/")[:2]
    if kind != "PyTorchJob":
        return _env(c)
    return {**_env(c), **operator_env(one(docs, "PyTorchJob", job_name), "Master", 0)}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_command_parses_with_the_real_cli(overlay: str, built: dict[str, list[dict[str, Any]]]) -> None:
    seen = set()
    for name, spec in pod_specs(built[overlay]):
        for c in containers(spec):
            argv = _expand([*c["command"], *c.get("args", [])], _pod_env(built[overlay], name, c))
            assert not any("$(" in a for a in argv), argv  # every $(VAR) is set in the pod
            if argv[0] == "torchrun":  # the trainers: torch's own parser, then the p2r part
                assert name.startswith("PyTorchJob/"), name
                argv = torchrun_launch(argv)[1]
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
    errors = [e for name, spec in pod_specs(docs) for e in pod_security_errors(name, spec)]
    assert not errors, "\n".join(errors)  # the chart's and the controller's pods pass the same check
    for name, spec in pod_specs(docs):
        assert spec["automountServiceAccountToken"] is False, name


def test_example_secret_holds_only_placeholders() -> None:
    for path in (MANIFESTS / "examples").glob("*.yaml"):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc["kind"] == "Secret":
                assert set(doc["stringData"].values()) == {"REPLACE_ME"}, path


def _generator() -> Any:
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import manifests  # type: ignore[import-not-found]
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    return manifests


def test_base_is_the_controller_pod_template() -> None:
    """manifests/base's workloads and the release component are exactly what scripts/manifests.py
    writes from controller/pods.py, the functions the controller builds its pods with."""
    for path, text in _generator().render().items():
        assert path.read_text() == text, f"{path.relative_to(ROOT)} is stale: run scripts/manifests.py"


def test_pod_security_check_is_not_a_silent_pass(built: dict[str, list[dict[str, Any]]]) -> None:
    name, spec = next(pod_specs(built["gpu-production"]))
    assert pod_security_errors(name, spec) == []
    for path, value in ((("securityContext", "runAsNonRoot"), False), (("securityContext", "seccompProfile"), None),
                        (("enableServiceLinks",), True)):
        bad = copy.deepcopy(spec)
        node = bad
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
        assert pod_security_errors(name, bad), path
    for key, value in (("readOnlyRootFilesystem", False), ("allowPrivilegeEscalation", True),
                       ("capabilities", {"drop": ["ALL"], "add": ["NET_ADMIN"]})):
        bad = copy.deepcopy(spec)
        bad["containers"][0]["securityContext"][key] = value
        assert any(key.split("Root")[0] in e or "capabilities" in e for e in pod_security_errors(name, bad)), key
    bad = copy.deepcopy(spec)
    bad["containers"][0]["volumeMounts"] = [m for m in bad["containers"][0]["volumeMounts"] if m["mountPath"] != "/tmp"]
    assert any("/tmp" in e for e in pod_security_errors(name, bad))


def _release_values(docs: list[dict[str, Any]]) -> set[str]:
    """Every endpoint, S3 endpoint and Secret name the jobs use."""
    found = set()
    for _, spec in pod_specs(docs):
        for c in containers(spec):
            for e in c.get("env", []):
                if e["name"].endswith("_ENDPOINT"):
                    found.add(e["value"])
                if "secretKeyRef" in e.get("valueFrom", {}):
                    found.add(e["valueFrom"]["secretKeyRef"]["name"])
    return found


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_any_release_name(overlay: str, tmp_path: Path) -> None:
    """An overlay for `helm install prod charts/p2r` changes only release.yaml; every Service,
    the S3 endpoint and the Secret the jobs use then exist in that release, none of the default
    release's names is left, and the configs name no release at all."""
    import subprocess

    shutil.copytree(MANIFESTS, tmp_path / "manifests")
    release = tmp_path / "manifests" / "overlays" / RELEASE_FILE[overlay] / "release.yaml"
    doc = yaml.safe_load(release.read_text())
    doc["data"] = {"fullname": "prod-p2r", "s3Endpoint": "prod-p2r-minio:9000", "s3Secret": "prod-p2r-s3-writer",
                   "bucket": "prod-bucket", "runs": "prod-runs"}
    release.write_text(yaml.safe_dump(doc))
    out = subprocess.run([str(KUBECTL), "kustomize", str(tmp_path / "manifests" / "overlays" / overlay)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    docs = [d for d in yaml.safe_load_all(out.stdout) if d]
    assert not find(docs, "ConfigMap", "p2r-release")  # local to kustomize, never applied
    rendered = _chart().render(MANIFEST_RELEASE, name="prod", namespace="p2r", is_install=True)
    chart = [d for path, text in rendered.items() if not path.endswith("NOTES.txt") for d in yaml.safe_load_all(text)
             if d]
    services = {s["metadata"]["name"]: {p["port"] for p in s["spec"]["ports"]} for s in find(chart, "Service")}
    secrets = {s["metadata"]["name"] for s in find(chart, "Secret")}
    used = _release_values(docs)
    assert len(used) >= 5, used
    for value in used:
        if ":" in value:
            host, port = value.split(":")
            assert int(port) in services.get(host, set()), value
        else:
            assert value in secrets, value
    assert not any(v.startswith("p2r-") for v in used), used
    # every S3 URI of the jobs is in the release's bucket (s3.bucket), outputs under its runs prefix
    uris = [e["value"] for _, spec in pod_specs(docs) for c in containers(spec) for e in c.get("env", [])
            if "s3://" in e.get("value", "")]
    assert len(uris) >= 4, uris
    for uri in uris:
        assert uri.split("s3://", 1)[1].startswith("prod-bucket/"), uri
    assert sum("s3://prod-bucket/prod-runs/kustomize/" in u for u in uris) >= 3, uris
    for cm in find(docs, "ConfigMap"):
        text = "".join(cm["data"].values())  # no service of any release in a trainer config
        assert not re.search(r"[\w-]+-(perceiver|reasoner|verifier|minio):\d+", text), cm["metadata"]["name"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_outputs_are_the_writers_and_apart_from_the_controller_runs(
        overlay: str, built: dict[str, list[dict[str, Any]]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The manifests write with the chart's writer user, so under the one prefix it may write
    (s3://BUCKET/<s3.layout.runs>/, the chart's default release), as the run "kustomize": never
    under the controller's STORAGE/NAME of the chart's default pipeline, so a hand-applied run and
    the controller's run cannot overwrite each other's checkpoints or choose the other's as latest.
    (tests/test_chart_storage.py checks every path against the rendered IAM policy.)"""
    values = merged_values({})
    chart_run, bucket, runs = values["controller"]["config"], values["s3"]["bucket"], values["s3"]["layout"]["runs"]
    controller_root = f"{(chart_run['storage'] or f's3://{bucket}/{runs}').rstrip('/')}/{chart_run['name']}/"
    outputs = [_config(built[overlay], stage, tmp_path, monkeypatch).output for stage in ("stage1", "stage2")]
    for name, spec in pod_specs(built[overlay]):
        for c in containers(spec):
            argv = _expand(c.get("args", []), _pod_env(built[overlay], name, c))
            outputs += [a.split("=", 1)[1] for a in argv if a.startswith("--out=")]
    assert len(outputs) == 3, outputs
    for out in outputs:
        assert out.startswith(f"s3://{bucket}/{runs}/kustomize/"), out
        assert not f"{out}/".startswith(controller_root), out


# ----------------------------------------------------------------------------- layout


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_torchrun_places_the_ranks(overlay: str, built: dict[str, list[dict[str, Any]]]) -> None:
    """Each stage runs as N pods x G processes: spec.nprocPerNode G (a string in the CRD), one
    Master and N-1 Workers, and in every pod torchrun (the operator's env expanded into its flags,
    parsed by torch's own parser) starts G ranks of `p2r train` as node N_i of N against the
    Master's rendezvous port. gpu-production is the reference run: one pod, 4 GPUs, no Workers."""
    n_pods, nproc, gpus = LAYOUTS[overlay]
    for stage in ("stage1", "stage2"):
        job = one(built[overlay], "PyTorchJob", f"p2r-{stage}")
        assert pytorchjob_errors(job) == []
        specs = job["spec"]["pytorchReplicaSpecs"]
        assert job["spec"]["nprocPerNode"] == str(nproc)
        assert specs["Master"]["replicas"] == 1
        assert sorted(specs) == (["Master"] if n_pods == 1 else ["Master", "Worker"])
        ranks = []
        for replica, index, pod in _pods(job):
            c = pod["containers"][0]
            opts, argv = torchrun_launch(_expand([*c["command"], *c["args"]], {**_env(c),
                                                                              **operator_env(job, replica, index)}))
            assert (int(opts.nnodes), int(opts.nproc_per_node)) == (n_pods, nproc)
            assert (opts.master_addr, opts.master_port) == (f"p2r-{stage}-master-0", pods.MASTER_PORT)
            assert argv[:2] == ["p2r", "train"]
            ranks += [opts.node_rank * nproc + local for local in range(nproc)]
            assert _gpus(c, "limits") == gpus
        assert sorted(ranks) == list(range(n_pods * nproc))  # every global rank once
    if overlay == "gpu-production":  # the reference run, as the done-when reads
        job = one(built[overlay], "PyTorchJob", "p2r-stage1")
        assert list(job["spec"]["pytorchReplicaSpecs"]) == ["Master"] and job["spec"]["nprocPerNode"] == "4"
        assert _gpus(job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0], "limits") == 4


def test_multinode_component_is_the_controller_worker(tmp_path: Path) -> None:
    """base + components/multinode builds exactly the PyTorchJobs controller/pods.py builds for
    two pods (the Worker a copy of the Master less the metrics port), so a multi-node overlay
    runs the controller's pod template too."""
    import subprocess

    shutil.copytree(MANIFESTS, tmp_path / "manifests")
    overlay = tmp_path / "manifests" / "overlays" / "multinode-check"
    overlay.mkdir()
    shutil.copy(MANIFESTS / "overlays" / "gpu-production" / "release.yaml", overlay)
    (overlay / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
        "resources": ["../../base", "release.yaml"],
        "components": ["../../components/release", "../../components/multinode"]}))
    out = subprocess.run([str(KUBECTL), "kustomize", str(overlay)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    docs = [d for d in yaml.safe_load_all(out.stdout) if d]
    generator = _generator()
    for stage in ("stage1", "stage2"):
        job = one(docs, "PyTorchJob", f"p2r-{stage}")
        assert job == generator.stage_job(stage, 2), stage
        assert pytorchjob_errors(job) == []


def test_controller_settings_place_n_pods_of_g_gpus() -> None:
    """pipeline.yaml's kubernetes.workers / nproc_per_node / gpu_resource are the only place
    of the layout: the GPUs follow nproc_per_node, and a GPU count in resources is refused."""
    from p2r.controller.config import Kubernetes, PipelineConfig

    def job(**k: Any) -> dict[str, Any]:
        settings = Kubernetes(**k)
        return pods.pytorchjob(
            settings.pod, name="r-stage1-1", namespace="p2r", labels={}, pod_labels={}, image="p2r:1",
            pull_policy="IfNotPresent", role="perceiver", config_map="c", config_file="train.yaml", env=[],
            resources=settings.resources or None, workers=settings.workers, nproc_per_node=settings.nproc_per_node,
            gpu_resource=settings.gpu_resource, data_pvc=None, data_mount="/data", metrics_port=9090,
            restart_policy="Never", backoff_limit=0)

    reference = job(nproc_per_node=4, gpu_resource="nvidia.com/gpu",
                    resources={"requests": {"cpu": "32", "memory": "384Gi"}, "limits": {"memory": "512Gi"}})
    assert pytorchjob_errors(reference) == []
    assert list(reference["spec"]["pytorchReplicaSpecs"]) == ["Master"] and reference["spec"]["nprocPerNode"] == "4"
    master = reference["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]
    # (ephemeral-storage, sized from the pod's scratch volumes by pods.py, is checked where it is set)
    resources = {kind: {k: v for k, v in values.items() if k != "ephemeral-storage"}
                 for kind, values in master["containers"][0]["resources"].items()}
    assert resources == {"requests": {"cpu": "32", "memory": "384Gi", "nvidia.com/gpu": 4},
                         "limits": {"memory": "512Gi", "nvidia.com/gpu": 4}}
    assert next(v for v in master["volumes"] if v["name"] == "dshm")["emptyDir"]["sizeLimit"] == "64Gi"
    multi = job(workers=3, nproc_per_node=8, gpu_resource="nvidia.com/gpu")
    assert pytorchjob_errors(multi) == []
    specs = multi["spec"]["pytorchReplicaSpecs"]
    assert specs["Worker"]["replicas"] == 2 and multi["spec"]["nprocPerNode"] == "8"
    for spec in specs.values():
        assert spec["template"]["spec"]["containers"][0]["resources"]["limits"] == {"nvidia.com/gpu": 8}
    cpu = job(workers=2)  # the defaults: one process per pod, no GPU
    assert cpu["spec"]["nprocPerNode"] == "1" and pytorchjob_errors(cpu) == []
    for s in cpu["spec"]["pytorchReplicaSpecs"].values():  # no GPU, CPU or memory (scratch space only)
        res = s["template"]["spec"]["containers"][0].get("resources", {})
        assert all(set(v) <= {"ephemeral-storage"} for v in res.values()), res
    with pytest.raises(ValueError, match=r"resources.limits.nvidia.com/gpu: a trainer pod's GPUs are set by "
                                         r"nproc_per_node"):
        Kubernetes(nproc_per_node=4, gpu_resource="nvidia.com/gpu", resources={"limits": {"nvidia.com/gpu": 1}})
    with pytest.raises(ValueError, match="nproc_per_node"):
        Kubernetes(nproc_per_node=0)
    assert PipelineConfig.model_fields["kubernetes"].annotation is Kubernetes  # pipeline.yaml's kubernetes section

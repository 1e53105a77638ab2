"""The Kubernetes backend's state machine, end to end through the official client against an
emulated API server over HTTP (kmock), with a real S3 server (moto) for checkpoints.

The controller runs as the real ``p2r pipeline run`` process; the test plays the cluster: it
makes Deployments ready once they point at the expected model, uploads checkpoints and sets
PyTorchJob conditions as the training pods and the operator would, and completes the eval Job.
Every object the controller creates is validated strictly (PyTorchJobs against the Kubeflow CRD and
the operator webhook's rules, the eval Job with kubernetes-validate) and its pods must pass the same
security assertions as the chart's pods (``tests/k8s_support.pod_security_errors``).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from p2r.services.checkpoints import upload_checkpoint, write_manifest
from tests.k8s_emulator import (
    HELM_LABELS,
    PYTORCHJOBS,
    Cluster,
    Emulated,
    emulator,
    validate_created,
    validate_pytorchjob,
    wait_for,
    write_kubeconfig,
)

ROOT = Path(__file__).resolve().parent.parent
NS = "p2r"
DEPLOYMENTS = {"reasoner": "p2r-reasoner", "perceiver": "p2r-perceiver", "verifier": "p2r-verifier"}
OWNER, OWNER_UID = "p2r-pipeline", "6f1c2e0a-0000-4000-8000-00000000c0de"
MODELS = ("s3://models/qwen3-vl-tiny", "s3://models/verifier")


def seed_models(tmp_path: Path, env: dict[str, str], uris: tuple[str, ...] = MODELS) -> None:
    """The models the run starts from, in object storage with their manifests (what
    ``p2r models upload`` writes)."""
    for i, uri in enumerate(uris):
        upload_as_trainer(tmp_path, uri, 0, f"model{i}-{uuid.uuid4().hex[:6]}", env)


TEST_AGENT = "p2r-tests/cluster"
"""User-Agent of the test's own API calls (playing the cluster); every other request is the controller's."""


@pytest.fixture()
def cluster(tmp_path: Path, s3_server: dict[str, str]) -> Iterator[tuple[Cluster, Path]]:
    """A cluster with every input the run needs: the PyTorchJob CRD, the data claim, the role
    Deployments, the chart's pipeline ConfigMap (the owner) and the models in S3. After the
    test: the controller never wrote a Deployment Helm manages (every request is checked)."""
    seed_models(tmp_path, s3_server)
    with emulator() as em:
        c = Cluster(em.url, NS)
        c.api.user_agent = TEST_AGENT
        c.em = em  # type: ignore[attr-defined]
        for role, name in DEPLOYMENTS.items():
            c.create_deployment(name, role)
        c.create_pvc("p2r-data")
        c.create_owner(OWNER, OWNER_UID)
        yield c, write_kubeconfig(tmp_path / "kubeconfig", em.url)
        assert chart_writes(em) == []


def chart_writes(em: Emulated) -> list[dict[str, Any]]:
    """The controller's requests that create, patch, update or delete one of the chart's
    (Helm-managed) role Deployments: Helm upgrades and Argo CD self-heal own those."""
    writes = [r for r in em.requests() if r["user_agent"] != TEST_AGENT and r["resource"] == "apps/v1/deployments"
              and r["method"] in ("POST", "PUT", "PATCH", "DELETE")]
    assert writes, "the controller wrote no Deployment at all: the guard would see nothing"
    return [r for r in writes if r["name"] in DEPLOYMENTS.values()
            or (r["data"] or {}).get("metadata", {}).get("labels", {}).get("app.kubernetes.io/managed-by")
            == HELM_LABELS["app.kubernetes.io/managed-by"]]


def owned(obj: dict[str, Any]) -> bool:
    """Owned by the chart's pipeline ConfigMap, so deleting it (helm uninstall) collects ``obj``."""
    return obj["metadata"].get("ownerReferences") == [
        {"apiVersion": "v1", "kind": "ConfigMap", "name": OWNER, "uid": OWNER_UID, "controller": False,
         "blockOwnerDeletion": False}]


def write_config(tmp_path: Path, kubeconfig: Path, name: str, bucket: str, **over: Any) -> Path:
    config = {
        "name": name, "backend": "kubernetes", "base_model": "s3://models/qwen3-vl-tiny",
        "verifier_model": "s3://models/verifier", "data": "/data/p2r-10k/train.parquet", "storage": f"s3://{bucket}",
        "workdir": str(tmp_path / "work"),
        "stage1": {"max_steps": 3, "rollouts_per_prompt": 4}, "stage2": {"max_steps": 2},
        "eval": {"task": "synthetic", "data": "/data/synthetic-eval", "limit": 6, "args": ["--max-new-tokens", "32"]},
        "retry": {"max_attempts": 2, "backoff_s": 0.2, "backoff_max_s": 1},
        "kubernetes": {"namespace": NS, "kubeconfig": str(kubeconfig), "image": "registry.local/p2r:1", "workers": 2,
                       "s3_secret": "p2r-s3", "s3_access_key_ref": "access-key",
                       "s3_secret_key_ref": "secret-key", "s3_endpoint": "minio.p2r.svc:9000", "poll_s": 0.1,
                       "trainer_metrics_port": 9100,
                       "env": {"VLLM_CPU_KVCACHE_SPACE": "1"},
                       "resources": {"limits": {"cpu": "2", "memory": "8Gi"}}, "data_pvc": "p2r-data",
                       "owner_config_map": OWNER, "inputs_poll_s": 0.2, **over.pop("kubernetes", {})},
        **over,
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def scrape(port: int) -> dict[str, float]:
    """The controller's Prometheus samples, ``name{labels}`` -> value."""
    import urllib.request

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
            if line.startswith("p2r_pipeline_")}


def controller(config: Path, env: dict[str, str], *cmd: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "p2r.cli", "pipeline", *(cmd or ("run",)), "--config", str(config)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            env={**os.environ, **env})


def p2r(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "p2r.cli", *args], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, **env}, timeout=120)


def fake_checkpoint(path: Path, step: int, tag: str) -> Path:
    """The files a training pod uploads (HF layout, manifest written last)."""
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"step": step, "tag": tag}))
    (path / "model.safetensors").write_bytes(tag.encode() * 1000)
    write_manifest(path, step=step)
    return path


def upload_as_trainer(tmp_path: Path, uri: str, step: int, tag: str, env: dict[str, str]) -> None:
    saved = dict(os.environ)
    os.environ.update(env)
    try:
        upload_checkpoint(fake_checkpoint(tmp_path / f"ckpt-{tag}-{step}", step, tag), uri)
    finally:
        os.environ.clear()
        os.environ.update(saved)


def put_object(bucket: str, key: str, data: bytes, env: dict[str, str]) -> None:
    import io

    from minio import Minio

    client = Minio(env["P2R_S3_ENDPOINT"], access_key=env["AWS_ACCESS_KEY_ID"],
                   secret_key=env["AWS_SECRET_ACCESS_KEY"], secure=False)
    if not client.bucket_exists(bucket):
        client.make_bucket(bucket)
    client.put_object(bucket, key, io.BytesIO(data), len(data))


def run_deployment(c: Cluster, name: str) -> dict[str, Any] | None:
    return next((d for d in c.deployments() if d["metadata"]["name"] == name), None)


def ready_when_pointing_at(c: Cluster, run: str, role: str, model: str, proc: subprocess.Popen[str]) -> None:
    """Play the Deployment controller and the kubelet: once the run's own Deployment for
    ``role`` exists, on ``model``, its pods start (Ready, from its template)."""
    name = f"{run}-{role}"
    dep = wait_for(f"Deployment {name}", lambda: run_deployment(c, name), alive=lambda: proc.poll() is None)
    chart = c.deployment(DEPLOYMENTS[role])
    template = dep["spec"]["template"]
    assert c.model_env(dep) == model and template["metadata"]["annotations"]["p2r.io/model"] == model
    assert c.model_env(chart) is None  # the chart's is untouched
    # the chart's pod template: the other container, the env and the ports are kept
    containers = {x["name"]: x for x in template["spec"]["containers"]}
    assert set(containers) == {"serve", "sidecar"}
    assert {"name": "P2R_LIMITS__MAX_MODEL_LEN", "value": "8192"} in containers["serve"]["env"]
    assert containers["serve"]["ports"] == chart["spec"]["template"]["spec"]["containers"][0]["ports"]
    assert dep["spec"]["strategy"] == chart["spec"]["strategy"]
    # its own selector and component: the chart's Service, PDB and HPA never pick its pods
    select = {"p2r.io/run": run, "p2r.io/role": role}
    assert dep["spec"]["selector"]["matchLabels"] == select
    labels = template["metadata"]["labels"]
    assert labels["app.kubernetes.io/component"] == f"{role}-run" and select.items() <= labels.items()
    # the release's name and instance labels stay: its NetworkPolicies select these pods
    assert labels["app.kubernetes.io/name"] == "p2r" and labels["app.kubernetes.io/instance"]
    assert labels["app.kubernetes.io/managed-by"] == "p2r-pipeline"
    assert "helm.sh/chart" not in labels and "helm.sh/chart" not in dep["metadata"]["labels"]
    assert dep["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "p2r-pipeline"
    # owned by the release's pipeline ConfigMap: collected with it
    assert owned(dep)
    service = next(s for s in c.services() if s["metadata"]["name"] == name)
    assert owned(service) and service["spec"]["clusterIP"] == "None" and service["spec"]["selector"] == select
    assert {"name": "grpc", "port": 50051, "targetPort": "grpc", "protocol": "TCP"} in service["spec"]["ports"]
    c.run_pods(name)


def run_objects(c: Cluster, run: str) -> list[str]:
    """The run's own role Deployments and Services still in the cluster."""
    names = [*(f"Deployment/{d['metadata']['name']}" for d in c.deployments()),
             *(f"Service/{s['metadata']['name']}" for s in c.services())]
    return sorted(n for n in names if n.split("/", 1)[1].startswith(f"{run}-"))


def stage_job(c: Cluster, name: str, proc: subprocess.Popen[str]) -> dict[str, Any]:
    job = wait_for(f"PyTorchJob {name}", lambda: next((j for j in c.pytorchjobs()
                                                      if j["metadata"]["name"] == name), None),
                   alive=lambda: proc.poll() is None)
    validate_pytorchjob(job)
    return job  # type: ignore[no-any-return]


def expand(argv: list[str], env: dict[str, str]) -> list[str]:
    """Kubernetes' ``$(VAR)`` expansion of a command line from the pod's env."""
    return [re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], a) for a in argv]


def assert_layout(job: dict[str, Any], n_pods: int, nproc: int, gpus: int) -> None:
    """``job`` runs N pods x G ranks: nprocPerNode G, one Master and N-1 Workers, and in every pod
    torchrun (the training operator's env expanded into its flags, parsed by torch's own parser)
    starts G ranks of ``p2r train`` as its node of N, each pod holding G GPUs (or none)."""
    from p2r.controller import pods
    from tests.k8s_support import operator_env, torchrun_launch

    specs = job["spec"]["pytorchReplicaSpecs"]
    assert job["spec"]["nprocPerNode"] == str(nproc)
    assert sorted(specs) == (["Master"] if n_pods == 1 else ["Master", "Worker"])
    assert sum(s["replicas"] for s in specs.values()) == n_pods and specs["Master"]["replicas"] == 1
    ranks = []
    for replica, spec in specs.items():
        c = spec["template"]["spec"]["containers"][0]
        assert c["command"] == pods.TORCHRUN
        for kind in ("requests", "limits"):
            assert c.get("resources", {}).get(kind, {}).get("nvidia.com/gpu", 0) == gpus, (replica, kind)
        for index in range(spec["replicas"]):
            opts, p2r_argv = torchrun_launch(expand([*c["command"], *c["args"]], operator_env(job, replica, index)))
            assert (int(opts.nnodes), int(opts.nproc_per_node)) == (n_pods, nproc)
            assert (opts.master_addr, opts.master_port) == (f"{job['metadata']['name']}-master-0", pods.MASTER_PORT)
            assert p2r_argv[:4] == ["p2r", "train", "--role", c["args"][2]]
            ranks += [opts.node_rank * nproc + local for local in range(nproc)]
    assert sorted(ranks) == list(range(n_pods * nproc))  # every global rank exactly once


def state_of(c: Cluster, run: str) -> dict[str, Any]:
    data = c.config_map(f"p2r-pipeline-{run}")
    assert data is not None
    return json.loads(data["state.json"])  # type: ignore[no-any-return]


def test_full_graph_with_a_controller_restart(tmp_path: Path, cluster: tuple[Cluster, Path],
                                              s3_server: dict[str, str]) -> None:
    c, kubeconfig = cluster
    run, bucket, port = "kube-ok", f"runs-{uuid.uuid4().hex[:8]}", free_port()
    gpu_nodes = {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    pod_template = {"trainer": {"node_selector": gpu_nodes, "priority_class_name": "p2r-training",
                                "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists",
                                                 "effect": "NoSchedule"}]},
                    "image_pull_secrets": [{"name": "regcred"}], "labels": {"app.kubernetes.io/instance": "rel"},
                    "hugging_face": {"endpoint": "https://hf-mirror.corp", "token_secret": "hf-token"}}
    # multi-node: 2 pods x 4 GPUs, torchrun starting 4 ranks in each
    layout = {"workers": 2, "nproc_per_node": 4, "gpu_resource": "nvidia.com/gpu"}
    config = write_config(tmp_path, kubeconfig, run, bucket, metrics_port=port,
                          kubernetes={"pod": pod_template, **layout})
    proc = controller(config, s3_server)
    try:
        # serve_reasoner: the frozen reasoner on the base model, the verifier on its own model
        ready_when_pointing_at(c, run, "reasoner", "s3://models/qwen3-vl-tiny", proc)
        ready_when_pointing_at(c, run, "verifier", "s3://models/verifier", proc)

        job = stage_job(c, f"{run}-stage1-1", proc)
        specs = job["spec"]["pytorchReplicaSpecs"]
        assert specs["Master"]["replicas"] == 1 and specs["Worker"]["replicas"] == 1
        assert_layout(job, n_pods=2, nproc=4, gpus=4)
        assert job["spec"]["runPolicy"]["backoffLimit"] == 0
        pod = specs["Master"]["template"]["spec"]
        container = pod["containers"][0]
        assert container["args"] == ["train", "--role", "perceiver", "--config", "/etc/p2r/train.yaml",
                                     "--resume", "auto"]
        assert container["resources"] == {"limits": {"cpu": "2", "memory": "8Gi", "nvidia.com/gpu": 4},
                                          "requests": {"ephemeral-storage": "210Gi", "nvidia.com/gpu": 4}}
        assert next(v for v in pod["volumes"] if v["name"] == "dshm")["emptyDir"]["sizeLimit"] == "64Gi"
        env = {e["name"]: e for e in container["env"]}
        assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"] == {"secretKeyRef": {"name": "p2r-s3", "key": "secret-key"}}
        assert env["AWS_ACCESS_KEY_ID"]["valueFrom"] == {"secretKeyRef": {"name": "p2r-s3", "key": "access-key"}}
        assert env["P2R_S3_ENDPOINT"]["value"] == "minio.p2r.svc:9000" and "envFrom" not in container
        assert [v["name"] for v in pod["volumes"]] == ["config", "data", "work", "tmp", "dshm"]
        assert {"name": "data", "persistentVolumeClaim": {"claimName": "p2r-data", "readOnly": True}} in pod["volumes"]
        # the one pod template: security, no token, placement and pull secrets from kubernetes.pod
        assert pod["enableServiceLinks"] is False and pod["automountServiceAccountToken"] is False
        assert pod["securityContext"]["runAsUser"] == 10001 and pod["imagePullSecrets"] == [{"name": "regcred"}]
        assert pod["nodeSelector"] == gpu_nodes and pod["priorityClassName"] == "p2r-training"
        assert pod["tolerations"][0]["key"] == "nvidia.com/gpu"
        assert env["HOME"]["value"].startswith("/work/") and env["TMPDIR"]["value"] == "/tmp"
        # an hf:// base model: the Hub mirror, the token by reference from its Secret
        assert env["HF_ENDPOINT"]["value"] == "https://hf-mirror.corp"
        assert env["HF_TOKEN"]["valueFrom"] == {"secretKeyRef": {"name": "hf-token", "key": "HF_TOKEN"}}
        # helm uninstall deletes the owner ConfigMap: the garbage collector then deletes the job
        assert owned(job) and owned(c.raw_config_map(f"{run}-stage1-1-config"))
        assert owned(c.raw_config_map(f"p2r-pipeline-{run}"))
        assert job["metadata"]["labels"]["app.kubernetes.io/instance"] == "rel"
        assert "kueue.x-k8s.io/queue-name" not in job["metadata"]["labels"]
        assert job["spec"]["runPolicy"]["suspend"] is False
        train = yaml.safe_load(c.config_map(f"{run}-stage1-1-config")["train.yaml"])  # type: ignore[index]
        assert train["role"] == "perceiver" and train["model"] == "s3://models/qwen3-vl-tiny"
        # dns:/// of the headless role Services: the trainers' round_robin reaches every pod
        assert train["reasoner_endpoint"] == f"dns:///{run}-reasoner.p2r.svc.cluster.local:50051"
        assert train["verifier_endpoint"] == f"dns:///{run}-verifier.p2r.svc.cluster.local:50051"
        assert train["output"] == f"s3://{bucket}/{run}/stage1" and train["max_steps"] == 3
        # the chart's PodMonitor finds rank 0: component label, a "metrics" port, bound to the pod IP
        assert train["metrics_port"] == 9100 and train["metrics_host"] == "0.0.0.0"
        for replica in ("Master", "Worker"):
            labels = specs[replica]["template"]["metadata"]["labels"]
            assert labels["app.kubernetes.io/component"] == "trainer" and labels["app.kubernetes.io/part-of"] == "p2r"
        rendezvous = {"name": "pytorchjob-port", "containerPort": 23456, "protocol": "TCP"}
        assert container["ports"] == [rendezvous, {"name": "metrics", "containerPort": 9100, "protocol": "TCP"}]
        assert specs["Worker"]["template"]["spec"]["containers"][0]["ports"] == [rendezvous]
        samples = scrape(port)  # what the Pipeline dashboard reads
        assert samples["p2r_pipeline_running"] == 1.0
        assert samples['p2r_pipeline_current_step{step="stage1"}'] == 1.0
        assert samples['p2r_pipeline_current_step{step="serve_reasoner"}'] == 0.0
        assert samples['p2r_pipeline_step_attempts{step="stage1"}'] == 1.0
        assert samples['p2r_pipeline_step_duration_seconds_count{outcome="succeeded",step="serve_reasoner"}'] == 1.0

        # The controller dies mid-stage; a new one must re-attach, not create a second job.
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert state_of(c, run)["steps"]["stage1"]["status"] == "running"
        proc = controller(config, s3_server)
        wait_for("the new controller", lambda: state_of(c, run)["controller"]["pid"] == proc.pid,
                 alive=lambda: proc.poll() is None)
        # The job starts running; once the state shows that, only the new controller (the old
        # one is dead) can have polled it: it has re-attached, past where it would create a job.
        c.set_pytorchjob_condition(f"{run}-stage1-1", "Running")
        wait_for("the new controller to see the job running",
                 lambda: "Running" in state_of(c, run)["steps"]["stage1"]["outputs"].get("conditions", []),
                 alive=lambda: proc.poll() is None)
        assert [j["metadata"]["name"] for j in c.pytorchjobs()] == [f"{run}-stage1-1"]

        # The trainer uploads steps 2 and 3; step 4's upload is torn (no manifest): step 3 wins.
        upload_as_trainer(tmp_path, f"s3://{bucket}/{run}/stage1/step-2", 2, "s1", s3_server)
        upload_as_trainer(tmp_path, f"s3://{bucket}/{run}/stage1/step-3", 3, "s1", s3_server)
        put_object(bucket, f"{run}/stage1/step-4/model.safetensors", b"half", s3_server)
        c.set_pytorchjob_condition(f"{run}-stage1-1", "Succeeded")

        stage1 = f"s3://{bucket}/{run}/stage1/step-3"
        ready_when_pointing_at(c, run, "perceiver", stage1, proc)
        job2 = stage_job(c, f"{run}-stage2-1", proc)
        assert job2["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]["args"][2] \
            == "reasoner"
        train2 = yaml.safe_load(c.config_map(f"{run}-stage2-1-config")["train.yaml"])  # type: ignore[index]
        assert train2["model"] == stage1
        assert train2["perceiver_endpoint"] == f"dns:///{run}-perceiver.p2r.svc.cluster.local:50051"
        # stage 2 needs no reasoner service: the run's reasoner Deployment is gone (its GPUs freed)
        assert run_deployment(c, f"{run}-reasoner") is None
        assert run_deployment(c, f"{run}-verifier") is not None
        upload_as_trainer(tmp_path, f"s3://{bucket}/{run}/stage2/step-2", 2, "s2", s3_server)
        c.set_pytorchjob_condition(f"{run}-stage2-1", "Succeeded")

        final = f"s3://{bucket}/{run}/stage2/step-2"
        eval_job = wait_for("eval Job", lambda: next((j for j in c.jobs()
                                                     if j["metadata"]["name"] == f"{run}-eval-1"), None),
                            alive=lambda: proc.poll() is None)
        command = eval_job["spec"]["template"]["spec"]["containers"][0]["command"]
        assert command == ["p2r", "eval", "--model", final, "--perceiver-model", final, "--task", "synthetic",
                           "--data", "/data/synthetic-eval", "--mode", "p2r", "--out", f"s3://{bucket}/{run}/eval",
                           "--limit", "6", "--verifier-endpoint", f"dns:///{run}-verifier.p2r.svc.cluster.local:50051",
                           "--max-new-tokens", "32"]
        assert eval_job["spec"]["backoffLimit"] == 0
        validate_created(eval_job)
        eval_pod = eval_job["spec"]["template"]["spec"]
        assert owned(eval_job) and "nodeSelector" not in eval_pod  # eval needs no GPU node
        assert eval_pod["automountServiceAccountToken"] is False
        assert eval_pod["imagePullSecrets"] == [{"name": "regcred"}]
        eval_env = {e["name"]: e for e in eval_pod["containers"][0]["env"]}  # eval loads hf:// models too
        assert eval_env["HF_ENDPOINT"] == env["HF_ENDPOINT"] and eval_env["HF_TOKEN"] == env["HF_TOKEN"]
        summary = {"task": "synthetic", "mode": "p2r", "n": 6, "overall": 50.0,
                   "categories": {"colour": 66.7, "count": 33.3}}
        put_object(bucket, f"{run}/eval/summary.json", json.dumps(summary).encode(), s3_server)
        c.set_job_condition(f"{run}-eval-1", "Complete")
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-3000:]
    state = state_of(c, run)
    assert state["status"] == "succeeded"
    assert {s: r["attempts"] for s, r in state["steps"].items()} == {s: 1 for s in state["steps"]}
    assert state["steps"]["verify_stage1"]["outputs"]["checkpoint"] == stage1
    assert state["steps"]["verify_stage2"]["outputs"]["checkpoint"] == final
    assert state["steps"]["report"]["outputs"]["categories"] == {"colour": 66.7, "count": 33.3}
    assert len(c.pytorchjobs()) == 2 and len(c.jobs()) == 1
    created = [cm for cm in c.config_maps() if cm["metadata"]["name"] != OWNER]
    assert len(created) == 3  # the run state and one trainer config per stage
    for cm in created:  # strict, and collected with the release
        validate_created(cm)
        assert owned(cm) and cm["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "p2r-pipeline"
    # Credentials never reach the cluster objects or the state.
    assert s3_server["AWS_SECRET_ACCESS_KEY"] not in c.everything()
    status = p2r("pipeline", "status", "--config", str(config), env=s3_server)
    assert status.returncode == 0, status.stderr
    assert "succeeded" in status.stdout and "overall=50.0" in status.stdout and stage1 in status.stdout
    # the run's own role Deployments and Services were deleted when it ended; the chart's stay
    assert run_objects(c, run) == []
    assert sorted(d["metadata"]["name"] for d in c.deployments()) == sorted(DEPLOYMENTS.values())
    deleted = {(r["resource"], r["name"]) for r in c.em.requests()  # type: ignore[attr-defined]
               if r["method"] == "DELETE" and r["user_agent"] != TEST_AGENT}
    for role in ("reasoner", "verifier", "perceiver"):
        assert {("apps/v1/deployments", f"{run}-{role}"), ("v1/services", f"{run}-{role}")} <= deleted
    # what each role served is in the state until it was released
    assert state["services"] == {}


def test_failed_job_is_retried_with_a_new_name_then_the_run_stops(tmp_path: Path, cluster: tuple[Cluster, Path],
                                                                  s3_server: dict[str, str]) -> None:
    c, kubeconfig = cluster
    run, port = "kube-fail", free_port()
    config = write_config(tmp_path, kubeconfig, run, f"runs-{uuid.uuid4().hex[:8]}", metrics_port=port,
                          kubernetes={"pod": {"queue_name": "gpu-queue"}, "cluster_domain": "corp.internal"})
    proc = controller(config, s3_server)
    try:
        for role, model in (("reasoner", "s3://models/qwen3-vl-tiny"), ("verifier", "s3://models/verifier")):
            ready_when_pointing_at(c, run, role, model, proc)
        job = stage_job(c, f"{run}-stage1-1", proc)
        # Kueue: the queue label, created suspended so Kueue admits the whole gang at once
        assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "gpu-queue"
        assert job["spec"]["runPolicy"]["suspend"] is True
        # the cluster's own DNS domain in the role targets
        train = yaml.safe_load(c.config_map(f"{run}-stage1-1-config")["train.yaml"])  # type: ignore[index]
        assert train["reasoner_endpoint"] == f"dns:///{run}-reasoner.p2r.svc.corp.internal:50051"
        assert train["verifier_endpoint"] == f"dns:///{run}-verifier.p2r.svc.corp.internal:50051"
        # no Hugging Face settings configured: no HF_* variables
        env = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]["env"]
        assert not [e for e in env if e["name"].startswith("HF_")]
        c.set_pytorchjob_condition(f"{run}-stage1-1", "Failed", "OOMKilled", "master-0 was OOM-killed")
        stage_job(c, f"{run}-stage1-2", proc)  # the retry: a new, valid job
        state = state_of(c, run)["steps"]["stage1"]
        assert state["attempts"] == 2 and "OOMKilled" in state["history"][0]["error"]
        samples = scrape(port)
        assert samples['p2r_pipeline_step_failures_total{step="stage1"}'] == 1.0
        assert samples['p2r_pipeline_step_attempts{step="stage1"}'] == 2.0
        assert samples['p2r_pipeline_step_duration_seconds_count{outcome="failed",step="stage1"}'] == 1.0
        c.set_pytorchjob_condition(f"{run}-stage1-2", "Failed", "Error", "exit code 1")
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1
    assert err.strip().splitlines()[-1] == (f"p2r: error: run {run} failed: stage1 failed after 2 attempts: "
                                            f"PyTorchJob {run}-stage1-2 failed: Error: exit code 1")
    state = state_of(c, run)
    assert state["status"] == "failed" and state["steps"]["verify_stage1"]["status"] == "pending"
    assert sorted(j["metadata"]["name"] for j in c.pytorchjobs()) == [f"{run}-stage1-1", f"{run}-stage1-2"]


def test_a_torn_checkpoint_never_reaches_stage2(tmp_path: Path, cluster: tuple[Cluster, Path],
                                                s3_server: dict[str, str]) -> None:
    c, kubeconfig = cluster
    run, bucket = "kube-torn", f"runs-{uuid.uuid4().hex[:8]}"
    config = write_config(tmp_path, kubeconfig, run, bucket, retry={"max_attempts": 1})
    proc = controller(config, s3_server)
    try:
        for role, model in (("reasoner", "s3://models/qwen3-vl-tiny"), ("verifier", "s3://models/verifier")):
            ready_when_pointing_at(c, run, role, model, proc)
        stage_job(c, f"{run}-stage1-1", proc)
        put_object(bucket, f"{run}/stage1/step-3/model.safetensors", b"half", s3_server)  # no manifest
        c.set_pytorchjob_condition(f"{run}-stage1-1", "Succeeded")
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1, err[-2000:]
    assert ("verify_stage1 failed after 1 attempts: no complete checkpoint (with manifest.json) under "
            f"s3://{bucket}/{run}/stage1") in err
    assert [j["metadata"]["name"] for j in c.pytorchjobs()] == [f"{run}-stage1-1"]
    assert c.model_env(c.deployment("p2r-perceiver")) is None  # never rolled
    assert run_objects(c, run) == []  # the failed run's role Deployments are gone


def test_cancel_deletes_the_running_job(tmp_path: Path, cluster: tuple[Cluster, Path],
                                        s3_server: dict[str, str]) -> None:
    c, kubeconfig = cluster
    run = "kube-cancel"
    config = write_config(tmp_path, kubeconfig, run, f"runs-{uuid.uuid4().hex[:8]}")
    proc = controller(config, s3_server)
    try:
        for role, model in (("reasoner", "s3://models/qwen3-vl-tiny"), ("verifier", "s3://models/verifier")):
            ready_when_pointing_at(c, run, role, model, proc)
        stage_job(c, f"{run}-stage1-1", proc)
        cancel = p2r("pipeline", "cancel", "--config", str(config), env=s3_server)
        assert cancel.returncode == 0, cancel.stderr
        assert cancel.stdout.strip() == f"run {run} cancelled: cancelled at stage1"
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1 and "cancelled" in err.strip().splitlines()[-1]
    assert c.pytorchjobs() == [] and run_objects(c, run) == []
    state = state_of(c, run)
    assert state["status"] == "cancelled" and state["steps"]["stage1"]["status"] == "cancelled"


def test_controller_places_the_reference_run_as_one_pod_with_4_gpus(tmp_path: Path, cluster: tuple[Cluster, Path],
                                                                     s3_server: dict[str, str]) -> None:
    """The reference layout through the real controller: one PyTorchJob pod (the Master, no
    Workers) with 4 GPUs and nprocPerNode 4, torchrun starting 4 ranks of `p2r train`; it
    validates strictly against the CRD (``stage_job``) and the run is then cancelled."""
    c, kubeconfig = cluster
    run = "kube-ref"
    resources = {"requests": {"cpu": "32", "memory": "384Gi"}, "limits": {"memory": "512Gi"}}
    config = write_config(tmp_path, kubeconfig, run, f"runs-{uuid.uuid4().hex[:8]}", kubernetes={
        "workers": 1, "nproc_per_node": 4, "gpu_resource": "nvidia.com/gpu", "resources": resources})
    proc = controller(config, s3_server)
    try:
        for role, model in (("reasoner", "s3://models/qwen3-vl-tiny"), ("verifier", "s3://models/verifier")):
            ready_when_pointing_at(c, run, role, model, proc)
        job = stage_job(c, f"{run}-stage1-1", proc)
        assert_layout(job, n_pods=1, nproc=4, gpus=4)
        master = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]
        assert master["containers"][0]["resources"] == {
            "requests": {"cpu": "32", "memory": "384Gi", "ephemeral-storage": "210Gi", "nvidia.com/gpu": 4},
            "limits": {"memory": "512Gi", "nvidia.com/gpu": 4}}
        # NCCL between the pod's 4 local ranks: a memory-backed /dev/shm of 16Gi per rank
        assert next(v for v in master["volumes"] if v["name"] == "dshm") == {
            "name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "64Gi"}}
        cancel = p2r("pipeline", "cancel", "--config", str(config), env=s3_server)
        assert cancel.returncode == 0, cancel.stderr
        proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert c.pytorchjobs() == []


def test_sigterm_keeps_the_run_and_cancel_without_a_controller_deletes_the_job(
        tmp_path: Path, cluster: tuple[Cluster, Path], s3_server: dict[str, str]) -> None:
    c, kubeconfig = cluster
    run = "kube-orphan"
    config = write_config(tmp_path, kubeconfig, run, f"runs-{uuid.uuid4().hex[:8]}")
    proc = controller(config, s3_server)
    for role, model in (("reasoner", "s3://models/qwen3-vl-tiny"), ("verifier", "s3://models/verifier")):
        ready_when_pointing_at(c, run, role, model, proc)
    stage_job(c, f"{run}-stage1-1", proc)
    # SIGTERM (a controller pod being rescheduled) stops the controller, not the run.
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 1
    assert err.strip().splitlines()[-1] == (f"p2r: error: run {run} interrupted: controller stopped at stage1; "
                                            "run again to resume")
    assert [j["metadata"]["name"] for j in c.pytorchjobs()] == [f"{run}-stage1-1"]  # the job keeps running
    assert state_of(c, run)["steps"]["stage1"]["status"] == "running"
    # the job still calls the run's role services: they stay for the controller that resumes
    assert run_objects(c, run) == [f"Deployment/{run}-reasoner", f"Deployment/{run}-verifier",
                                   f"Service/{run}-reasoner", f"Service/{run}-verifier"]
    # Nobody resumes it: cancel finds no live controller and deletes the job and the services itself.
    cancel = p2r("pipeline", "cancel", "--config", str(config), "--wait", "1", env=s3_server)
    assert cancel.returncode == 0, cancel.stderr
    assert c.pytorchjobs() == [] and state_of(c, run)["status"] == "cancelled"
    assert run_objects(c, run) == []


def test_missing_inputs_are_reported_until_they_exist(tmp_path: Path, s3_server: dict[str, str]) -> None:
    """A fresh cluster: no training operator, no verifier Deployment, no data claim, no model
    uploaded. The controller creates nothing and rolls nothing; it says what is missing in its
    state (``p2r pipeline status``) and as a Warning Event, and starts by itself once all exist."""
    run, model = "kube-inputs", f"s3://models/absent-{uuid.uuid4().hex[:8]}"
    with emulator(without=(PYTORCHJOBS,)) as em:
        c = Cluster(em.url, NS)
        for role, name in DEPLOYMENTS.items():
            if role != "verifier":  # a release without the verifier role
                c.create_deployment(name, role)
        c.create_owner(OWNER, OWNER_UID)
        kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", em.url)
        seed_models(tmp_path, s3_server, ("s3://models/verifier",))
        config = write_config(tmp_path, kubeconfig, run, f"runs-{uuid.uuid4().hex[:8]}", base_model=model)
        proc = controller(config, s3_server)
        try:
            def reason() -> str:
                data = c.config_map(f"p2r-pipeline-{run}")
                return str(json.loads(data["state.json"]).get("reason") or "") if data else ""

            wait_for("the missing inputs in the state", lambda: "base_model" in reason(),
                     alive=lambda: proc.poll() is None)
            text = reason()
            assert text.startswith("waiting for inputs: ")
            assert "the PyTorchJob CRD (kubeflow.org/v1)" in text
            assert f"PersistentVolumeClaim {NS}/p2r-data" in text
            assert f"base_model {model}: no manifest.json (upload it: p2r models upload DIR {model})" in text
            assert f"Deployment {NS}/p2r-verifier (kubernetes.deployments.verifier)" in text
            assert "verifier_model" not in text  # that one is there
            state = state_of(c, run)
            assert state["status"] == "running" and state["current"] == "inputs"
            assert len(state["steps"]["inputs"]["outputs"]["missing"]) == 4
            events = [e for e in c.events() if e["reason"] == "InputsMissing"]
            assert events and events[0]["type"] == "Warning" and events[0]["message"] == text
            validate_created(events[0])
            assert events[0]["involvedObject"]["name"] == f"p2r-pipeline-{run}"
            status = p2r("pipeline", "status", "--config", str(config), env=s3_server)
            assert status.returncode == 0 and text in status.stdout, status.stdout + status.stderr
            # nothing was started or rolled while the inputs are missing
            assert all(c.model_env(c.deployment(name)) is None for role, name in DEPLOYMENTS.items()
                       if role != "verifier")
            assert c.jobs() == [] and run_objects(c, run) == []

            # The platform team installs the operator, enables the role, creates the claim, uploads the model.
            em.install(PYTORCHJOBS)
            c.create_deployment(DEPLOYMENTS["verifier"], "verifier")
            c.create_pvc("p2r-data")
            seed_models(tmp_path, s3_server, (model,))
            ready_when_pointing_at(c, run, "reasoner", model, proc)  # the run goes on by itself
            assert any(e["reason"] == "InputsReady" and e["type"] == "Normal" for e in c.events())
            state = state_of(c, run)
            assert state["steps"]["inputs"]["status"] == "succeeded" and state["steps"]["inputs"]["attempts"] == 1
            assert state["steps"]["inputs"]["outputs"]["missing"] == []
            cancel = p2r("pipeline", "cancel", "--config", str(config), env=s3_server)
            assert cancel.returncode == 0, cancel.stderr
            proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()


def test_chart_values_reach_the_pods_the_controller_builds(tmp_path: Path) -> None:
    """The chart's controller.jobs values, release-wide security settings, Hugging Face settings
    and cluster domain become the pods the controller creates and the targets they call (through
    pipeline.yaml's kubernetes section), and the chart's default security contexts are the pod
    template's own (one fact, checked equal)."""
    from p2r.controller import pods
    from p2r.controller.config import load_pipeline_config
    from p2r.controller.kube import KubeBackend
    from tests.k8s_support import merged_values, one, render

    defaults = merged_values({})
    assert defaults["podSecurityContext"] == pods.POD_SECURITY_CONTEXT
    assert defaults["containerSecurityContext"] == pods.CONTAINER_SECURITY_CONTEXT
    assert defaults["controller"]["jobs"]["trainer"]["tolerations"] == pods.GPU_TOLERATIONS
    gpu = {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    values = {"controller": {"enabled": True, "jobs": {
        "queueName": "team-a", "trainer": {"nodeSelector": gpu, "priorityClassName": "p2r-training"},
        "eval": {"tolerations": [{"key": "spot", "operator": "Exists"}]}}},
        "imagePullSecrets": [{"name": "regcred"}], "podSecurityContext": {"runAsUser": 20001},
        "clusterDomain": "corp.internal",
        "models": {"huggingFace": {"endpoint": "https://hf-mirror.corp", "tokenSecret": "hf", "tokenSecretKey": "tok"}},
        "security": {"tls": {"secretName": "p2r-tls", "requireClientCert": True}}}
    path = tmp_path / "pipeline.yaml"
    path.write_text(one(render(values), "ConfigMap", "p2r-pipeline")["data"]["pipeline.yaml"])
    config = load_pipeline_config(path)
    assert config.kubernetes.owner_config_map == "p2r-pipeline"
    assert config.kubernetes.cluster_domain == "corp.internal"
    config.kubernetes.kubeconfig = str(write_kubeconfig(tmp_path / "kubeconfig", "http://127.0.0.1:9"))
    backend = KubeBackend(config)
    backend._owner = {"apiVersion": "v1", "kind": "ConfigMap", "name": "p2r-pipeline", "uid": OWNER_UID,
                      "controller": False, "blockOwnerDeletion": False}  # read from the API at run time
    job = backend.pytorchjob("run1-stage1-1", "stage1", "perceiver", 1, 9090)
    evaluation = backend.eval_job("run1-eval-1", ["--model", "s3://p2r/m", "--task", "synthetic",
                                                  "--data", "/data/e", "--out", "s3://p2r/o"], 1)
    for obj in (job, evaluation):
        validate_created(obj)
        assert obj["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a"
        assert obj["metadata"]["labels"]["app.kubernetes.io/instance"] == "p2r"
        assert obj["metadata"]["ownerReferences"][0]["uid"] == OWNER_UID
    assert job["spec"]["runPolicy"]["suspend"] is True and evaluation["spec"]["suspend"] is True
    for replica in job["spec"]["pytorchReplicaSpecs"].values():
        pod = replica["template"]["spec"]
        assert pod["nodeSelector"] == gpu and pod["priorityClassName"] == "p2r-training"
        assert pod["tolerations"] == pods.GPU_TOLERATIONS and pod["imagePullSecrets"] == [{"name": "regcred"}]
        assert pod["securityContext"]["runAsUser"] == 20001 and pod["securityContext"]["runAsNonRoot"] is True
        assert replica["template"]["metadata"]["labels"]["app.kubernetes.io/component"] == "trainer"
    eval_pod = evaluation["spec"]["template"]["spec"]
    assert eval_pod["tolerations"] == [{"key": "spot", "operator": "Exists"}] and "nodeSelector" not in eval_pod
    assert "priorityClassName" not in eval_pod
    hf = [{"name": "HF_ENDPOINT", "value": "https://hf-mirror.corp"},
          {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "tok"}}}]
    for pod in [*(r["template"]["spec"] for r in job["spec"]["pytorchReplicaSpecs"].values()), eval_pod]:
        env = pod["containers"][0]["env"]
        assert [e for e in env if e["name"].startswith("HF_")] == hf
        # security.tls: the roles' CA (and, with mTLS, the certificate) from the Secret, read-only
        assert [e for e in env if e["name"].startswith("P2R_CLIENT_")] == [
            {"name": "P2R_CLIENT_CA_FILE", "value": "/etc/p2r-client/tls/ca.crt"},
            {"name": "P2R_CLIENT_CERT_FILE", "value": "/etc/p2r-client/tls/tls.crt"},
            {"name": "P2R_CLIENT_KEY_FILE", "value": "/etc/p2r-client/tls/tls.key"}]
        assert {"name": "client-tls", "mountPath": "/etc/p2r-client/tls", "readOnly": True} in \
            pod["containers"][0]["volumeMounts"]
        assert pod["volumes"][-1] == {"name": "client-tls", "secret": {
            "secretName": "p2r-tls", "defaultMode": 0o440,
            "items": [{"key": f, "path": f} for f in ("ca.crt", "tls.crt", "tls.key")]}}
    assert [v["name"] for v in job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["volumes"]] == [
        "config", "data", "work", "tmp", "dshm", "client-tls"]  # the overlays' indexes stay put
    assert backend._endpoint("p2r-verifier") == "dns:///p2r-verifier.p2r.svc.corp.internal:50051"
    assert config.kubernetes.serving_roles == [] and config.kubernetes.admin_port == 50052
    # the defaults: no Hub settings for the pods, the standard cluster domain
    defaults_cm = one(render({"controller": {"enabled": True}}), "ConfigMap", "p2r-pipeline")
    path.write_text(defaults_cm["data"]["pipeline.yaml"])
    config = load_pipeline_config(path)
    assert config.kubernetes.cluster_domain == "cluster.local"
    assert config.kubernetes.pod.hugging_face == pods.HuggingFace()
    # no security.tls: no client credentials, no mounts
    assert config.kubernetes.pod.client == pods.ClientSecrets()
    config.kubernetes.kubeconfig = str(tmp_path / "kubeconfig")
    plain = KubeBackend(config)
    plain._owner = backend._owner
    for obj in (plain.pytorchjob("run1-stage1-1", "stage1", "perceiver", 1, None),
                plain.eval_job("run1-eval-1", [], 1)):
        text = json.dumps(obj)
        assert "P2R_CLIENT_" not in text and "client-tls" not in text and "client-api-key" not in text
    # TLS only (no mTLS): just ca.crt; an API key (a gateway as the target) as a mounted file, never its value
    t = pods.PodTemplate(client=pods.ClientSecrets(tls_secret="p2r-tls", api_key_secret="p2r-key",
                                                   api_key_key_ref="k"))
    kw = {"namespace": "p2r", "labels": {}, "pod_labels": {}, "image": "p2r:1", "pull_policy": "IfNotPresent",
          "env": [], "resources": None, "data_pvc": None, "restart_policy": "Never", "backoff_limit": 0}
    evaluation = pods.eval_job(t, name="e-1", command=["p2r", "eval"], args=None, data_mount=None, **kw)
    validate_created(evaluation)
    eval_pod = evaluation["spec"]["template"]["spec"]
    assert [e for e in eval_pod["containers"][0]["env"] if e["name"].startswith("P2R_CLIENT_")] == [
        {"name": "P2R_CLIENT_CA_FILE", "value": "/etc/p2r-client/tls/ca.crt"},
        {"name": "P2R_CLIENT_API_KEY_FILE", "value": "/etc/p2r-client/api-key/api-key"}]
    assert eval_pod["volumes"][-2:] == [
        {"name": "client-tls", "secret": {"secretName": "p2r-tls", "defaultMode": 0o440,
                                          "items": [{"key": "ca.crt", "path": "ca.crt"}]}},
        {"name": "client-api-key", "secret": {"secretName": "p2r-key", "defaultMode": 0o440,
                                              "items": [{"key": "k", "path": "api-key"}]}}]
    job = pods.pytorchjob(t, name="s-1", role="perceiver", config_map="c", config_file="train.yaml", workers=2,
                          data_mount="/data", metrics_port=None, **kw)
    validate_created(job)
    for replica in job["spec"]["pytorchReplicaSpecs"].values():
        mounts = replica["template"]["spec"]["containers"][0]["volumeMounts"]
        assert [m["name"] for m in mounts][-2:] == ["client-tls", "client-api-key"]
        assert all(m["readOnly"] for m in mounts[-2:])


@pytest.mark.parametrize(("jobs", "message"), [
    ({"trainer": {"nodeSelectr": {}}}, "'nodeSelectr' not allowed"),
    ({"eval": {"tolerations": {"key": "spot"}}}, "/controller/jobs/eval/tolerations"),
    ({"queueName": "Team A"}, "/controller/jobs/queueName"),
])
def test_chart_schema_rejects_bad_job_values(jobs: dict[str, Any], message: str) -> None:
    import helm_python

    from tests.k8s_support import render

    with pytest.raises(helm_python.HelmValuesError) as e:
        render({"controller": {"enabled": True, "jobs": jobs}})
    assert message in str(e.value), str(e.value)

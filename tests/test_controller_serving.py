"""The controller's serving path on Kubernetes against a real role server: the Kubernetes
backend (``controller/kube.py``) finds a role's pods through the API (kmock's emulated API
server; the test plays the Deployment controller and the kubelet, placing the pod at the real
server's address) and loads the checkpoint into each over its admin port with
``Admin.LoadCheckpoint``; the server then reports the new checkpoint. The chart's Deployment is
only read, never written (every request the emulator received is checked)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from p2r.services.checkpoints import upload_checkpoint
from p2r.services.client import Client
from p2r.services.launch import ServerProc
from tests.k8s_emulator import HELM_LABELS, Cluster, Emulated, emulator, write_kubeconfig

NS = "p2r"
OWNER, OWNER_UID = "p2r-pipeline", "6f1c2e0a-0000-4000-8000-00000000beef"
TEST_AGENT = "p2r-tests/cluster"
"""User-Agent of the test's own API calls (playing the cluster); everything else is the controller's."""


def chart_writes(em: Emulated, c: Cluster) -> list[dict[str, Any]]:
    """Requests other than the test's own that write (create, patch, update, delete) a
    Deployment that Helm manages: Helm and Argo CD own those, a run must never write them."""
    helm = {d["metadata"]["name"] for d in c.deployments()
            if d["metadata"].get("labels", {}).get("app.kubernetes.io/managed-by") == HELM_LABELS[
                "app.kubernetes.io/managed-by"]}
    assert helm, "no Helm-managed Deployment to guard"
    return [r for r in em.requests() if r["user_agent"] != TEST_AGENT and r["resource"] == "apps/v1/deployments"
            and r["method"] in ("POST", "PUT", "PATCH", "DELETE") and r["name"] in helm]


@pytest.fixture()
def restore(role_server: ServerProc) -> Iterator[str]:
    """The shared session server's checkpoint, loaded back after the test."""
    with Client(role_server.target, timeout_s=300, admin_target=role_server.admin_target) as client:
        original = client.status().checkpoint
        try:
            yield original
        finally:
            if client.status().checkpoint != original:
                client.load_checkpoint(original)
            assert client.status().checkpoint == original


def test_serving_role_is_loaded_in_place_through_the_admin_port(
        tmp_path: Path, role_server: ServerProc, restore: str, second_model_dir: Path,
        s3_server: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    from p2r.controller import metrics
    from p2r.controller.config import load_pipeline_config
    from p2r.controller.graph import Context, StepFailed
    from p2r.controller.kube import KubeBackend
    from p2r.controller.state import new_state

    assert role_server.admin_target is not None
    admin_host, admin_port = role_server.admin_target.rsplit(":", 1)
    for key, value in s3_server.items():
        monkeypatch.setenv(key, value)
    uri = f"s3://ckpt-{uuid.uuid4().hex[:8]}/run1/stage1/step-3"
    upload_checkpoint(second_model_dir, uri)  # a stage's checkpoint, with its manifest

    with emulator() as em:
        c = Cluster(em.url, NS)
        c.api.user_agent = TEST_AGENT
        c.create_owner(OWNER, OWNER_UID)
        # The chart's verifier Deployment, whose pod (played here) is the real server.
        c.create_deployment("p2r-verifier", "verifier", admin_port=int(admin_port))
        for role in ("reasoner", "perceiver"):
            c.create_deployment(f"p2r-{role}", role)
        [pod] = c.run_pods("p2r-verifier", ip=admin_host)
        path = tmp_path / "pipeline.yaml"
        path.write_text(yaml.safe_dump({
            "name": "run1", "backend": "kubernetes", "base_model": "s3://models/base", "data": "/data/train.parquet",
            "storage": "s3://runs", "kubernetes": {
                "namespace": NS, "kubeconfig": str(write_kubeconfig(tmp_path / "kubeconfig", em.url)),
                "owner_config_map": OWNER, "serving_roles": ["verifier"], "poll_s": 0.1,
                "admin_port": 1}}))  # the pod's port named admin wins over the configured one
        config = load_pipeline_config(path)
        backend = KubeBackend(config)
        state = new_state("run1", "kubernetes", ["serve_reasoner"])
        ctx = Context(config, state, backend.store(), backend, step="serve_reasoner")

        endpoints = backend.serve(ctx, {"verifier": uri})

        # the chart's Service: the pods users call, which servingRoles lets the run load
        assert endpoints == {"verifier": "dns:///p2r-verifier.p2r.svc.cluster.local:50051"}
        with Client(role_server.target) as client:
            assert client.status().checkpoint == uri  # loaded in place, the same process
        entry = state["services"]["verifier"]
        assert entry["deployment"] == "p2r-verifier" and entry["owned"] is False and entry["model"] == uri
        assert entry["pods"] == {pod: "loaded"}
        stored = backend.store().load()
        assert stored is not None and stored["services"]["verifier"]["pods"] == {pod: "loaded"}
        family = next(metrics.CHECKPOINTS.collect())
        assert [(s.name, s.labels) for s in family.samples] == [
            ("p2r_checkpoint_info", {"role": "verifier", "deployment": "p2r-verifier", "uri": uri})]
        # nothing created, nothing written to what Helm owns; the pods were listed, the chart read
        assert chart_writes(em, c) == []
        assert sorted(d["metadata"]["name"] for d in c.deployments()) == ["p2r-perceiver", "p2r-reasoner",
                                                                          "p2r-verifier"]
        assert c.services() == []
        mine = [r for r in em.requests() if r["user_agent"] != TEST_AGENT]
        assert any(r["resource"] == "v1/pods" and r["method"] == "GET" for r in mine)

        # asked again (the next stage's endpoint check): it already serves it, no reload
        assert backend.endpoint(ctx, "verifier") == endpoints["verifier"]
        assert state["services"]["verifier"]["pods"] == {pod: "already"}

        # a checkpoint the server refuses fails the step, naming the pod
        missing = f"s3://ckpt-{uuid.uuid4().hex[:8]}/nothing"
        with pytest.raises(StepFailed) as failed:
            backend.serve(ctx, {"verifier": missing})
        assert str(failed.value).startswith(f"pod {NS}/{pod} ({admin_host}:{admin_port}): loading {missing} failed: ")
        with Client(role_server.target) as client:
            assert client.status().checkpoint == uri  # a refused load changes nothing
    metrics.clear_checkpoint("verifier")


def test_chart_lets_the_controller_reach_the_admin_port(tmp_path: Path) -> None:
    """The chart wires the load path: controller.servingRoles and the admin port reach
    pipeline.yaml, the controller pod reads the admin token from its Secret, and the
    NetworkPolicies admit the controller and the trainers (only) to the admin port of the
    chart's role pods and of a run's own role pods."""
    from p2r.controller.config import load_pipeline_config
    from tests.k8s_support import find, one, render

    values = {"controller": {"enabled": True, "servingRoles": ["verifier"]}, "networkPolicy": {"enabled": True},
              "roles": {r: {"enabled": True} for r in ("perceiver", "reasoner", "verifier")}}
    docs = render(values)
    path = tmp_path / "pipeline.yaml"
    path.write_text(one(docs, "ConfigMap", "p2r-pipeline")["data"]["pipeline.yaml"])
    k = load_pipeline_config(path).kubernetes
    assert k.serving_roles == ["verifier"] and k.admin_port == 50052
    pod = one(docs, "Deployment", "p2r-controller")["spec"]["template"]["spec"]
    env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
    assert env["P2R_CLIENT_ADMIN_TOKEN_FILE"] == "/etc/p2r-admin/token"
    mount = {"name": "admin-token", "mountPath": "/etc/p2r-admin", "readOnly": True}
    assert mount in pod["containers"][0]["volumeMounts"]
    volume = next(v for v in pod["volumes"] if v["name"] == "admin-token")
    roles_volume = next(v for v in one(docs, "Deployment", "p2r-verifier")["spec"]["template"]["spec"]["volumes"]
                        if v["name"] == "admin-token")
    assert volume["secret"] == roles_volume["secret"]  # the servers' own token
    admin_from = [{"podSelector": {"matchLabels": {"app.kubernetes.io/name": "p2r", "app.kubernetes.io/instance": "p2r",
                                                   "app.kubernetes.io/component": "controller"}}},
                  {"podSelector": {"matchLabels": {"app.kubernetes.io/part-of": "p2r",
                                                   "app.kubernetes.io/component": "trainer"}}}]
    policies = {p["metadata"]["name"]: p["spec"] for p in find(docs, "NetworkPolicy")}
    for name in ("p2r-perceiver", "p2r-reasoner", "p2r-verifier", "p2r-run-roles"):
        rules = [r for r in policies[name]["ingress"] if {p["port"] for p in r["ports"]} == {"admin"}]
        assert [r["from"] for r in rules] == [admin_from], name
    assert not [r for r in policies["p2r-gateway"]["ingress"] if {p["port"] for p in r["ports"]} == {"admin"}]
    run_pods = policies["p2r-run-roles"]["podSelector"]
    assert run_pods["matchExpressions"] == [{"key": "p2r.io/role", "operator": "Exists"}]
    assert {p["port"] for r in policies["p2r-run-roles"]["ingress"] for p in r["ports"]} == {"grpc", "admin", "metrics"}

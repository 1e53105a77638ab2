"""Defaults a team can afford (issue 24, finding 8 and the operations findings of 9): the verifier
and MinIO only when something uses them, a model cache that outlives the pod, rollouts that need
no spare GPU and are not declared failed while a model loads, proxies sized for the gateway's
requests, a ServiceAccount per role, and requests for the local disk pods write. Every check runs
over the defaults and every charts/p2r/ci profile, and reads its expected numbers from the values
or the rendered objects (never a second copy of a limit)."""

from __future__ import annotations

import re
from typing import Any

import pytest
import yaml

from tests.k8s_support import CHART, ROLES, find, merged_values, one, profiles, render

PROFILES = profiles()
MODEL_ROLES = ("perceiver", "reasoner", "verifier")


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict[str, Any]]]:
    return {name: render(values) for name, values in PROFILES.items()}


def _deployments(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {r: d for r in ROLES for d in find(docs, "Deployment", f"p2r-{r}")}


def _serve_config(docs: list[dict[str, Any]], role: str) -> Any:
    from p2r.services.config import ServeConfig

    return ServeConfig.model_validate(yaml.safe_load(one(docs, "ConfigMap", f"p2r-{role}")["data"]["serve.yaml"]))


def _gpus(deploy: dict[str, Any]) -> int:
    return int(deploy["spec"]["template"]["spec"]["containers"][0]["resources"].get("limits", {})
               .get("nvidia.com/gpu", 0))


# ----------------------------------------------------------------------------- verifier, MinIO


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_verifier_runs_only_when_training_or_eval_uses_it(profile: str,
                                                          rendered: dict[str, list[dict[str, Any]]]) -> None:
    """The verifier grades free_form answers for the trainers and eval, which only the pipeline
    controller starts; serving never calls it. So it is deployed exactly when the controller is."""
    docs = rendered[profile]
    controller = bool(find(docs, "Deployment", "p2r-controller"))
    assert bool(find(docs, "Deployment", "p2r-verifier")) == controller, profile
    if controller:  # ... and the pipeline grades with it
        pipeline = yaml.safe_load(one(docs, "ConfigMap", "p2r-pipeline")["data"]["pipeline.yaml"])
        assert pipeline["kubernetes"]["deployments"]["verifier"] == "p2r-verifier"


def test_verifier_switches() -> None:
    assert find(render({"roles": {"verifier": {"enabled": True}}}), "Deployment", "p2r-verifier")
    on = render({"controller": {"enabled": True}})
    assert find(on, "Deployment", "p2r-verifier")
    import helm_python

    with pytest.raises(helm_python.HelmError, match=r"controller\.enabled needs roles\.perceiver"):
        render({"controller": {"enabled": True}, "roles": {"verifier": {"enabled": False}}})


def test_default_install_takes_two_gpus(rendered: dict[str, list[dict[str, Any]]]) -> None:
    """Perceiver and reasoner, one GPU each; no verifier that serving never calls."""
    deployments = _deployments(rendered["default"])
    assert {r: _gpus(d) for r, d in deployments.items()} == {"perceiver": 1, "reasoner": 1, "gateway": 0}


def _s3_in_pods(docs: list[dict[str, Any]]) -> bool:
    return any(e.get("name") == "P2R_S3_ENDPOINT" for d in docs if d["kind"] in ("Deployment", "Job", "StatefulSet")
               for c in d["spec"]["template"]["spec"].get("containers", []) for e in c.get("env", []))


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_minio_runs_only_when_something_uses_it(profile: str, rendered: dict[str, list[dict[str, Any]]]) -> None:
    docs = rendered[profile]
    values = merged_values(PROFILES[profile])
    serves_s3 = any(str(_serve_config(docs, r).model or "").startswith("s3://") for r in _deployments(docs))
    uses_s3 = serves_s3 or values["controller"]["enabled"] or values["models"]["seed"]["enabled"]
    minio = bool(find(docs, "StatefulSet", "p2r-minio"))
    if values["minio"].get("enabled") is None:
        assert minio == bool(uses_s3 and not values["s3"]["externalEndpoint"]), profile
    else:
        assert minio == values["minio"]["enabled"], profile
    if not uses_s3 and not values["s3"]["externalEndpoint"]:
        assert not _s3_in_pods(docs) and not find(docs, "Secret", "p2r-s3"), profile


def test_default_has_no_minio_and_no_s3_settings(rendered: dict[str, list[dict[str, Any]]]) -> None:
    docs = rendered["default"]
    assert not find(docs, "StatefulSet") and not find(docs, "PersistentVolumeClaim", "data-p2r-minio-0")
    assert not [s for s in find(docs, "Secret") if s["metadata"]["name"].startswith("p2r-s3")]
    assert not _s3_in_pods(docs)


@pytest.mark.parametrize("values", [
    {"minio": {"enabled": True}},
    {"roles": {"perceiver": {"model": "s3://p2r/models/perceiver"}}},
    {"controller": {"enabled": True}},
])
def test_minio_turns_on_for_its_users(values: dict[str, Any]) -> None:
    docs = render(values)
    assert find(docs, "StatefulSet", "p2r-minio") and find(docs, "Secret", "p2r-s3-reader")
    assert _s3_in_pods(docs)


# --------------------------------------------------------------------------------- model cache


def _cache(deploy: dict[str, Any]) -> dict[str, Any]:
    return next(v for v in deploy["spec"]["template"]["spec"]["volumes"] if v["name"] == "cache")


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_model_cache_outlives_the_pod(profile: str, rendered: dict[str, list[dict[str, Any]]]) -> None:
    """Each model role mounts its own claim at /cache (downloads survive restarts, reschedules and
    rollouts); a role with several pods gets a claim every node can mount."""
    docs = rendered[profile]
    for role, deploy in _deployments(docs).items():
        if role == "gateway":
            continue
        claim = _cache(deploy)["persistentVolumeClaim"]["claimName"]
        assert claim == f"p2r-{role}-cache"
        pvc = one(docs, "PersistentVolumeClaim", claim)
        if find(docs, "HorizontalPodAutoscaler", f"p2r-{role}") or deploy["spec"].get("replicas", 1) > 1:
            assert "ReadWriteMany" in pvc["spec"]["accessModes"], role
        assert pvc["spec"]["resources"]["requests"]["storage"] == merged_values(PROFILES[profile])["cache"][
            "persistence"]["size"]


def test_cache_kinds_and_what_they_keep() -> None:
    import helm_python

    assert _cache(one(render({"cache": {"hostPath": {"path": "/var/lib/p2r-cache"}}}), "Deployment", "p2r-reasoner"))[
        "hostPath"] == {"path": "/var/lib/p2r-cache", "type": "Directory"}
    off = render({"cache": {"persistence": {"enabled": False}}})
    assert not find(off, "PersistentVolumeClaim")
    assert _cache(one(off, "Deployment", "p2r-reasoner"))["emptyDir"] == {"sizeLimit": "40Gi"}
    eph = render({"cache": {"ephemeral": {"enabled": True}}})
    assert "ephemeral" in _cache(one(eph, "Deployment", "p2r-reasoner")) and not find(eph, "PersistentVolumeClaim")
    # A ReadWriteOnce claim cannot follow a role's pods onto several nodes: refused, with the fix.
    with pytest.raises(helm_python.HelmError, match="ReadWriteMany"):
        render({"roles": {"perceiver": {"replicas": 2}}})
    # The values documentation says which kind keeps what; ephemeral is not sold as keeping downloads.
    text = (CHART / "values.yaml").read_text()
    assert re.search(r"#\s+ephemeral\.enabled\s.*deleted with the pod", text)
    assert re.search(r"#\s+persistence\.enabled\s.*kept across restarts", text)
    assert re.search(r"#\s+hostPath\.path\s.*kept on that node", text)
    assert "To keep the\n# downloads, use a per-pod ephemeral volume" not in text
    assert re.search(r"does NOT keep downloads", text)


# ------------------------------------------------------------------------------------ rollouts


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_gpu_roles_roll_without_a_spare_gpu(profile: str, rendered: dict[str, list[dict[str, Any]]]) -> None:
    for role, deploy in _deployments(rendered[profile]).items():
        rolling = deploy["spec"]["strategy"]["rollingUpdate"]
        if _gpus(deploy) > 0:
            assert rolling == {"maxSurge": 0, "maxUnavailable": 1}, role
        else:
            assert rolling == {"maxSurge": 1, "maxUnavailable": 0}, role


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_progress_deadline_exceeds_the_startup_budget(profile: str,
                                                      rendered: dict[str, list[dict[str, Any]]]) -> None:
    values = merged_values(PROFILES[profile])
    for role, deploy in _deployments(rendered[profile]).items():
        probe = deploy["spec"]["template"]["spec"]["containers"][0]["startupProbe"]
        budget = probe.get("initialDelaySeconds", 0) + probe["periodSeconds"] * probe["failureThreshold"]
        deadline = deploy["spec"].get("progressDeadlineSeconds", 600)  # the API's default
        assert deadline > budget, (role, deadline, budget)
        assert deadline == budget + values["roleDefaults"]["progressMarginSeconds"], role


# ------------------------------------------------------------------------------------ exposure


def _exposed(values: dict[str, Any]) -> list[dict[str, Any]]:
    return render({**values, "ingress": {**values.get("ingress", {}), "enabled": True,
                                         "grpc": {**values.get("ingress", {}).get("grpc", {}), "enabled": True}}})


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_ingress_nginx_is_sized_for_the_gateway(profile: str) -> None:
    """proxy-body-size is the gateway's own request limit (HTTP body; gRPC receive limit), and the
    proxy waits at least as long as the longest request deadline."""
    from p2r.services.openai_api import DEFAULT_TIMEOUT_S

    docs = _exposed(PROFILES[profile])
    cfg = _serve_config(docs, "gateway")
    http = one(docs, "Ingress", "p2r-gateway")["metadata"]["annotations"]
    grpc = one(docs, "Ingress", "p2r-gateway-grpc")["metadata"]["annotations"]
    assert int(http["nginx.ingress.kubernetes.io/proxy-body-size"]) == cfg.max_http_body_bytes
    assert int(grpc["nginx.ingress.kubernetes.io/proxy-body-size"]) == cfg.max_receive_bytes
    assert grpc["nginx.ingress.kubernetes.io/backend-protocol"] == "GRPC"
    for notes in (http, grpc):
        for key in ("proxy-read-timeout", "proxy-send-timeout"):
            seconds = int(notes[f"nginx.ingress.kubernetes.io/{key}"])
            assert seconds >= DEFAULT_TIMEOUT_S and seconds == cfg.max_connection_age_grace_s, key


def test_ingress_annotations_given_win() -> None:
    docs = render({"ingress": {"enabled": True, "annotations": {"nginx.ingress.kubernetes.io/proxy-body-size": "1g"}}})
    assert one(docs, "Ingress", "p2r-gateway")["metadata"]["annotations"][
        "nginx.ingress.kubernetes.io/proxy-body-size"] == "1g"
    plain = render({"ingress": {"enabled": True, "nginxLimits": False}})
    assert "annotations" not in one(plain, "Ingress", "p2r-gateway")["metadata"]


def test_gateway_api_http_route_has_timeouts() -> None:
    from p2r.services.openai_api import DEFAULT_TIMEOUT_S

    docs = render({"gatewayAPI": {"enabled": True, "parentRefs": [{"name": "shared"}]}})
    cfg = _serve_config(docs, "gateway")
    for rule in one(docs, "HTTPRoute", "p2r-gateway")["spec"]["rules"]:
        for key in ("request", "backendRequest"):
            seconds = int(re.fullmatch(r"(\d+)s", rule["timeouts"][key]).group(1))  # type: ignore[union-attr]
            assert seconds >= DEFAULT_TIMEOUT_S and seconds == cfg.max_connection_age_grace_s


# ------------------------------------------------------------------------- identity, resources


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_each_role_has_its_own_service_account(profile: str, rendered: dict[str, list[dict[str, Any]]]) -> None:
    docs = rendered[profile]
    for role, deploy in _deployments(docs).items():
        spec = deploy["spec"]["template"]["spec"]
        assert spec["serviceAccountName"] == f"p2r-{role}" and spec["automountServiceAccountToken"] is False
        account = one(docs, "ServiceAccount", f"p2r-{role}")
        assert account["automountServiceAccountToken"] is False


def test_service_account_annotations_for_workload_identity() -> None:
    irsa = {"eks.amazonaws.com/role-arn": "arn:aws:iam::123456789012:role/p2r-read"}
    gke = {"iam.gke.io/gcp-service-account": "r@x"}
    docs = render({"roleDefaults": {"serviceAccount": {"annotations": irsa}},
                   "roles": {"reasoner": {"serviceAccount": {"annotations": gke}}}})
    assert one(docs, "ServiceAccount", "p2r-perceiver")["metadata"]["annotations"] == irsa
    assert one(docs, "ServiceAccount", "p2r-reasoner")["metadata"]["annotations"] == {**irsa, **gke}
    own = render({"roles": {"perceiver": {"serviceAccount": {"create": False, "name": "team-sa"}}}})
    assert not find(own, "ServiceAccount", "p2r-perceiver")
    assert one(own, "Deployment", "p2r-perceiver")["spec"]["template"]["spec"]["serviceAccountName"] == "team-sa"


def _disk_scratch(volumes: list[dict[str, Any]]) -> int:
    from p2r.controller.pods import quantity_bytes

    return sum(quantity_bytes(v["emptyDir"]["sizeLimit"]) for v in volumes
               if "emptyDir" in v and v["emptyDir"].get("medium") != "Memory")


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_role_pods_request_their_local_disk(profile: str, rendered: dict[str, list[dict[str, Any]]]) -> None:
    from p2r.controller.pods import quantity_bytes

    for role, deploy in _deployments(rendered[profile]).items():
        spec = deploy["spec"]["template"]["spec"]
        request = spec["containers"][0]["resources"]["requests"]["ephemeral-storage"]
        assert quantity_bytes(request) == _disk_scratch(spec["volumes"]) > 0, role


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_eval_and_trainer_pods_have_requests_and_limits(profile: str,
                                                        rendered: dict[str, list[dict[str, Any]]],
                                                        tmp_path: Any) -> None:
    """The controller's eval Job (built as controller/kube.py builds it, from the chart's
    pipeline.yaml) requests CPU, memory and its scratch disk and limits memory; so does a trainer."""
    from p2r.controller import pods
    from p2r.controller.config import load_pipeline_config
    from p2r.controller.pods import quantity_bytes

    docs = rendered[profile]
    if not find(docs, "ConfigMap", "p2r-pipeline"):
        pytest.skip("no controller in this profile")
    path = tmp_path / "pipeline.yaml"
    path.write_text(one(docs, "ConfigMap", "p2r-pipeline")["data"]["pipeline.yaml"])
    k = load_pipeline_config(path).kubernetes
    job = pods.eval_job(k.pod, name="e", namespace=k.namespace, labels={}, pod_labels={}, image=k.image,
                        pull_policy="IfNotPresent", command=["p2r", "eval"], args=None, env=[],
                        resources=k.eval_resources or None, data_pvc=k.data_pvc, data_mount=k.data_mount,
                        restart_policy="Never", backoff_limit=0)
    spec = job["spec"]["template"]["spec"]
    res = spec["containers"][0]["resources"]
    assert {"cpu", "memory", "ephemeral-storage"} <= set(res["requests"]) and "memory" in res["limits"]
    assert quantity_bytes(res["requests"]["ephemeral-storage"]) == _disk_scratch(spec["volumes"])
    trainer = pods.pytorchjob(k.pod, name="t", namespace=k.namespace, labels={}, pod_labels={}, image=k.image,
                              pull_policy="IfNotPresent", role="perceiver", config_map="c", config_file="t.yaml",
                              env=[], resources=k.resources or None, workers=k.workers,
                              nproc_per_node=k.nproc_per_node, gpu_resource=k.gpu_resource, data_pvc=k.data_pvc,
                              data_mount=k.data_mount, metrics_port=None, restart_policy="Never", backoff_limit=0)
    for replica in trainer["spec"]["pytorchReplicaSpecs"].values():
        tspec = replica["template"]["spec"]
        treq = tspec["containers"][0]["resources"]["requests"]
        assert quantity_bytes(treq["ephemeral-storage"]) == _disk_scratch(tspec["volumes"])


def test_eval_job_has_default_resources() -> None:
    from p2r.controller import pods

    job = pods.eval_job(pods.PodTemplate(), name="e", namespace=None, labels={}, pod_labels={}, image="i",
                        pull_policy="IfNotPresent", command=["p2r", "eval"], args=None, env=[], resources=None,
                        data_pvc=None, data_mount=None, restart_policy="Never", backoff_limit=0)
    res = job["spec"]["template"]["spec"]["containers"][0]["resources"]
    assert res["requests"]["cpu"] == pods.EVAL_RESOURCES["requests"]["cpu"]
    assert res["limits"]["memory"] == pods.EVAL_RESOURCES["limits"]["memory"]
    t = pods.PodTemplate()
    assert pods.quantity_bytes(res["requests"]["ephemeral-storage"]) == (
        pods.quantity_bytes(t.eval_work_size_limit) + pods.quantity_bytes(t.tmp_size_limit))

"""The Helm chart, rendered offline by the real Helm library for every documented profile:
strict schema validity of every object, `helm lint --strict`, values.schema.json rejecting bad
values with a message naming the key, and the properties a platform team checks before letting
it into a cluster (GPUs, probes and drain, RBAC, credentials, security, network, autoscaling).
The serve.yaml each role gets is loaded by the real ``ServeConfig``, so the chart cannot drift
from what ``p2r serve`` accepts."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.k8s_support import (
    CHART,
    KUBE_VERSIONS,
    NAMESPACE,
    ROLES,
    containers,
    find,
    merged_values,
    one,
    parse_p2r_command,
    plaintext_credentials,
    pod_security_errors,
    pod_specs,
    profiles,
    pytorchjob_errors,
    render,
    validation_errors,
)

PROFILES = profiles()
HEALTH = {"perceiver": "p2r.v1.Perceiver", "reasoner": "p2r.v1.Reasoner", "verifier": "p2r.v1.Verifier",
          "gateway": "p2r.v1.P2R"}


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict[str, Any]]]:
    return {name: render(values) for name, values in PROFILES.items()}


def test_profiles_exist() -> None:
    assert {"default", "cpu-smoke", "gpu-production", "external-s3"} <= set(PROFILES)


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_every_object_validates_strictly(profile: str, rendered: dict[str, list[dict[str, Any]]]) -> None:
    docs = rendered[profile]
    assert len(docs) > 10
    errors = [f"{v} {d['kind']}/{d['metadata']['name']}: {err}"
              for v in KUBE_VERSIONS for d in docs for err in validation_errors(d, v)]
    assert not errors, "\n".join(errors)
    names = [(d["kind"], d["metadata"]["name"]) for d in docs]
    assert len(names) == len(set(names)), "duplicate objects"


def test_validation_is_not_a_silent_pass() -> None:
    """The validators used above reject a misspelt field of a built-in kind and of a ServiceMonitor."""
    docs = render(PROFILES["gpu-production"])
    deploy = one(docs, "Deployment", "p2r-perceiver")
    deploy["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {"grpcc": {"port": 1}}
    assert validation_errors(deploy, KUBE_VERSIONS[-1])
    monitor = one(docs, "ServiceMonitor", "p2r-perceiver")
    monitor["spec"]["endpoints"][0]["intervall"] = "15s"
    assert any("intervall" in e for e in validation_errors(monitor, KUBE_VERSIONS[-1]))
    unknown = {"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w"}}
    assert validation_errors(unknown, KUBE_VERSIONS[-1])


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_helm_lint_strict(profile: str) -> None:
    import helm_python

    report = helm_python.lint(str(CHART), PROFILES[profile], strict=True, namespace=NAMESPACE,
                              kube_version=f"v{KUBE_VERSIONS[-1]}")
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert not report["errors"] and not problems, report


@pytest.mark.parametrize(("values", "message"), [
    ({"roles": {"perceiver": {"gpus": -1}}}, "/roles/perceiver/gpus"),
    ({"roles": {"perceivr": {"enabled": True}}}, "'perceivr' not allowed"),
    ({"roleDefaults": {"replicas": "two"}}, "/roleDefaults/replicas"),
    ({"roles": {"reasoner": {"model": "http://example.com/model"}}}, "/roles/reasoner/model"),
    ({"s3": {"bucket": "Bad_Bucket"}}, "/s3/bucket"),
    ({"s3": {"externalEndpoint": "https://minio:9000"}}, "/s3/externalEndpoint"),
    ({"serveConfig": {"max_in_flight": 0}}, "/serveConfig/max_in_flight"),
    ({"serveConfig": {"max_inflight": 8}}, "'max_inflight' not allowed"),
    ({"drain": {"gracePeriodSeconds": -5}}, "/drain/gracePeriodSeconds"),
    ({"monitoring": {"serviceMonitor": {"interval": "fast"}}}, "/monitoring/serviceMonitor/interval"),
    ({"monitoring": {"alerts": {"errorRatio": 2}}}, "/monitoring/alerts/errorRatio"),
    ({"image": {"pullPolicy": "Sometimes"}}, "/image/pullPolicy"),
    ({"roleDefaults": {"resources": {"requests": {"memory": "lots"}}}}, "/roleDefaults/resources/requests/memory"),
])
def test_schema_rejects_bad_values(values: dict[str, Any], message: str) -> None:
    import helm_python

    with pytest.raises(helm_python.HelmValuesError) as e:
        render(values)
    assert message in str(e.value), str(e.value)


@pytest.mark.parametrize(("values", "message"), [
    ({"probes": {"liveness": {"periodSeconds": 5, "failureThreshold": 2, "timeoutSeconds": 1}}},
     "shorter than the drain"),
    ({"minio": {"enabled": False}, "s3": {"externalEndpoint": "s3.example.com:443"}}, "s3.existingSecret is required"),
    ({"minio": {"enabled": False}, "s3": {"existingSecret": "creds"}}, "s3.externalEndpoint is required"),
    ({"roles": {"reasoner": {"enabled": False}}, "controller": {"enabled": False}},
     "enable roles.perceiver and roles.reasoner"),
    ({"roles": {"verifier": {"enabled": False}}, "controller": {"enabled": True}},
     "controller.enabled needs roles.perceiver, roles.reasoner and"),
    ({"gatewayAPI": {"enabled": True}}, "gatewayAPI.parentRefs is required"),
])
def test_inconsistent_values_fail_with_a_clear_message(values: dict[str, Any], message: str) -> None:
    import helm_python

    with pytest.raises(helm_python.HelmError) as e:
        render(values)
    assert message in str(e.value), str(e.value)


def _serve_yaml(docs: list[dict[str, Any]], role: str) -> dict[str, Any]:
    return yaml.safe_load(one(docs, "ConfigMap", f"p2r-{role}")["data"]["serve.yaml"])


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_serve_yaml_is_what_p2r_serve_loads(profile: str, rendered: dict[str, list[dict[str, Any]]],
                                            tmp_path: Any) -> None:
    """Each role's serve.yaml goes through the real ServeConfig (extra fields forbidden) and
    carries the chart's ports, bind address, drain window and, for the gateway, remote roles."""
    from p2r.services.config import load_config

    values = merged_values(PROFILES[profile])
    docs = rendered[profile]
    for role in ROLES:
        # The verifier's enabled is derived (null: with the controller; tests/test_chart_defaults.py).
        if not values["roles"][role].get("enabled", bool(find(docs, "Deployment", "p2r-controller"))):
            assert not find(docs, "Deployment", f"p2r-{role}")
            continue
        path = tmp_path / f"{role}.yaml"
        path.write_text(one(docs, "ConfigMap", f"p2r-{role}")["data"]["serve.yaml"])
        cfg = load_config(path)
        assert cfg.roles == [role] and cfg.host == "0.0.0.0"
        assert (cfg.port, cfg.metrics_port) == (values["ports"]["grpc"], values["ports"]["metrics"])
        assert cfg.grace_period_s == values["drain"]["gracePeriodSeconds"]
        assert str(cfg.model_cache) == f"/cache/models/{role}"  # each role its own cache directory
        if role == "gateway":
            assert cfg.http_port == values["ports"]["http"]
            for remote in ("perceiver", "reasoner"):  # the headless Service, for round_robin
                assert getattr(cfg, f"{remote}_endpoint") == (
                    f"dns:///p2r-{remote}.{NAMESPACE}.svc.cluster.local:{values['ports']['grpc']}")
            assert cfg.model is None
        else:
            assert cfg.model == values["roles"][role]["model"]


def test_role_serve_config_overrides_the_shared_one() -> None:
    docs = render({"serveConfig": {"max_in_flight": 100, "structured_perceiver": True},
                   "roles": {"perceiver": {"serveConfig": {"max_in_flight": 7, "structured_perceiver": False}}}})
    assert _serve_yaml(docs, "perceiver")["max_in_flight"] == 7
    assert _serve_yaml(docs, "perceiver")["structured_perceiver"] is False  # a false override is kept
    assert _serve_yaml(docs, "reasoner")["max_in_flight"] == 100


def _bound(spec: dict[str, Any], bound: str) -> Any:
    """A numeric bound of a schema node, also inside pydantic's ``anyOf`` for optionals."""
    found = [spec.get(bound), *(s.get(bound) for s in spec.get("anyOf", []))]
    return next((b for b in found if b is not None), None)


def _types(spec: dict[str, Any]) -> set[str]:
    """JSON types of a schema node: ``type`` (one or a list) or pydantic's ``anyOf`` for optionals."""
    if "anyOf" in spec:
        return set().union(*(_types(s) for s in spec["anyOf"]))
    t = spec["type"]
    return {t} if isinstance(t, str) else set(t)


def test_serve_config_schema_matches_the_code() -> None:
    """values.schema.json's serveConfig lists fields of ServeConfig with the same types and bounds."""
    import json

    from p2r.services.config import ServeConfig

    code = ServeConfig.model_json_schema()
    chart = json.loads((CHART / "values.schema.json").read_text())["definitions"]["serveConfig"]["properties"]
    limits = code["$defs"]["Limits"]["properties"]
    for name, spec in chart.items():
        assert name in code["properties"], f"serveConfig.{name} is not a ServeConfig field"
        if name == "limits":
            for key, sub in spec["properties"].items():
                assert key in limits and _types(sub) == _types(limits[key]), key
                for bound in ("minimum", "exclusiveMinimum", "maximum"):
                    assert _bound(sub, bound) == _bound(limits[key], bound), (key, bound)
            continue
        assert _types(spec) == _types(code["properties"][name]), name
        for bound in ("minimum", "exclusiveMinimum", "maximum"):
            assert _bound(spec, bound) == _bound(code["properties"][name], bound), (name, bound)


def _gpus(c: dict[str, Any], kind: str) -> int:
    return int(c.get("resources", {}).get(kind, {}).get("nvidia.com/gpu", 0))


@pytest.mark.parametrize(("profile", "expected"), [
    # No verifier without the controller (serving never calls it).
    ("default", {"perceiver": 1, "reasoner": 1, "gateway": 0}),
    ("gpu-production", {"perceiver": 1, "reasoner": 2, "gateway": 0}),
    ("cpu-smoke", {"perceiver": 0, "reasoner": 0, "verifier": 0, "gateway": 0}),
])
def test_gpu_requests(profile: str, expected: dict[str, int], rendered: dict[str, list[dict[str, Any]]]) -> None:
    docs = rendered[profile]
    for role, gpus in expected.items():
        spec = one(docs, "Deployment", f"p2r-{role}")["spec"]["template"]["spec"]
        serve = spec["containers"][0]
        assert _gpus(serve, "requests") == _gpus(serve, "limits") == gpus, role
        tolerates = any(t.get("key") == "nvidia.com/gpu" for t in spec.get("tolerations", []))
        assert tolerates == (gpus > 0 and profile != "cpu-smoke"), role
    for name, spec in pod_specs(docs):
        if not name.startswith("Deployment/p2r-") or name.split("-")[-1] not in ROLES:
            assert all(_gpus(c, "limits") == 0 for c in containers(spec)), name
    if profile == "gpu-production":
        spec = one(docs, "Deployment", "p2r-reasoner")["spec"]["template"]["spec"]
        assert spec["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
        assert spec["runtimeClassName"] == "nvidia" and spec["priorityClassName"] == "p2r-serving"
        assert spec["topologySpreadConstraints"][0]["topologyKey"] == "topology.kubernetes.io/zone"


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_probes_and_drain(profile: str, rendered: dict[str, list[dict[str, Any]]]) -> None:
    """gRPC health probes (readiness on the role's own service), a startup probe sized for model
    loads, and preStop + terminationGracePeriodSeconds covering serve.yaml's drain window."""
    values = merged_values(PROFILES[profile])
    drain, probes = values["drain"], values["probes"]
    for role in ROLES:
        if not find(rendered[profile], "Deployment", f"p2r-{role}"):
            continue
        deploy = one(rendered[profile], "Deployment", f"p2r-{role}")
        spec = deploy["spec"]["template"]["spec"]
        c = spec["containers"][0]
        grpc_port = values["ports"]["grpc"]
        assert c["startupProbe"]["grpc"] == {"port": grpc_port, "service": HEALTH[role]}
        assert c["readinessProbe"]["grpc"] == {"port": grpc_port, "service": HEALTH[role]}
        assert c["livenessProbe"]["grpc"] == {"port": grpc_port}
        startup = c["startupProbe"]["periodSeconds"] * c["startupProbe"]["failureThreshold"]
        assert startup >= (600 if profile != "cpu-smoke" else 120), f"{role}: startup window {startup}s"
        live = c["livenessProbe"]["periodSeconds"] * c["livenessProbe"]["failureThreshold"]
        assert live >= drain["preStopSleepSeconds"] + drain["gracePeriodSeconds"]
        assert c["lifecycle"]["preStop"]["exec"]["command"] == ["sleep", str(drain["preStopSleepSeconds"])]
        grace = drain["preStopSleepSeconds"] + drain["gracePeriodSeconds"] + drain["marginSeconds"]
        assert spec["terminationGracePeriodSeconds"] == grace
        assert _serve_yaml(rendered[profile], role)["grace_period_s"] == drain["gracePeriodSeconds"]
        assert c["readinessProbe"]["periodSeconds"] == probes["readiness"]["periodSeconds"]
        assert c["args"] == ["serve", role, "--config", "/etc/p2r/serve.yaml"]
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        assert ports["grpc"] == grpc_port and ports["metrics"] == values["ports"]["metrics"]
        assert ("http" in ports) == (role == "gateway")


def all_pod_specs(docs: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    """pod_specs plus bare Pods (the `helm test` hook)."""
    return [*pod_specs(docs), *((f"Pod/{d['metadata']['name']}", d["spec"]) for d in find(docs, "Pod"))]


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_every_p2r_command_parses_with_the_real_cli(profile: str, rendered: dict[str, list[dict[str, Any]]]) -> None:
    seen = set()
    for _name, spec in all_pod_specs(rendered[profile]):
        for c in containers(spec):
            if c.get("command", [""])[0] == "p2r":
                ctx = parse_p2r_command([*c["command"], *c.get("args", [])])
                seen.add(f"{ctx.parent.info_name if ctx.parent else ''} {ctx.info_name}".strip())
    values = merged_values(PROFILES[profile])
    expected = {"p2r serve", "data synth", "p2r ask"}  # serving, and the `helm test` pod
    expected |= {"pipeline run"} if values["controller"]["enabled"] else set()
    expected |= {"models tiny"} if values["models"]["tiny"]["enabled"] else set()
    expected |= {"models upload"} if values["models"]["seed"]["enabled"] else set()
    # the seed Job waits for the bucket, role pods for an s3:// model (p2r models wait)
    s3_roles = any(str((values["roles"].get(r) or {}).get("model") or "").startswith("s3://") for r in values["roles"])
    expected |= {"models wait"} if values["models"]["seed"]["enabled"] or s3_roles else set()
    seed = values["models"]["seed"]
    expected |= {"data upload"} if seed["enabled"] and seed.get("data") else set()
    assert expected == seen


def test_config_change_rolls_the_pods() -> None:
    a = one(render({}), "Deployment", "p2r-reasoner")["spec"]["template"]["metadata"]["annotations"]
    b = one(render({"serveConfig": {"max_in_flight": 9}}), "Deployment", "p2r-reasoner")
    assert a["checksum/config"] != b["spec"]["template"]["metadata"]["annotations"]["checksum/config"]


VERBS = {"read": "get", "get": "get", "create": "create", "patch": "patch", "delete": "delete", "list": "list",
         "replace": "update", "watch": "watch"}
RESOURCES = {"config_map": ("", "configmaps"), "deployment": ("apps", "deployments"), "job": ("batch", "jobs"),
             "service": ("", "services"),
             "pod": ("", "pods"), "pod_log": ("", "pods/log"), "secret": ("", "secrets"),
             "persistent_volume_claim": ("", "persistentvolumeclaims"), "event": ("", "events")}
# kubeflow-training's TrainingClient methods and the API calls they make.
TRAINING_CLIENT = {"create_job": {"create"}, "get_job": {"get"}, "get_job_conditions": {"get"},
                   "delete_job": {"delete"}, "wait_for_job_conditions": {"get", "watch"}, "list_jobs": {"list"}}


def controller_api_calls() -> dict[tuple[str, str], set[str]]:
    """(apiGroup, resource) -> verbs, read from the controller's Kubernetes backend source:
    every ``self.core|apps|batch|custom.<verb>_namespaced_<resource>`` and TrainingClient call."""
    source = (CHART.parent.parent / "controller" / "kube.py").read_text()
    calls: dict[tuple[str, str], set[str]] = {}
    for verb, resource, args in re.findall(
            r"self\.(?:core|apps|batch|custom)\.(\w+?)_namespaced_(\w+?)\(([^)]*)", source):
        if resource == "custom_object":
            m = re.search(r'"([\w.]+)", "v\w+", [^,]+, "(\w+)"', args)  # (group, version, namespace, plural)
            assert m, args
            key = (m.group(1), m.group(2))
        else:
            key = RESOURCES[resource]
        calls.setdefault(key, set()).add(VERBS[verb])
    for method in re.findall(r"self\.training\.(\w+)\(", source):
        calls.setdefault(("kubeflow.org", "pytorchjobs"), set()).update(TRAINING_CLIENT[method])
    return calls


def test_controller_api_calls_are_found() -> None:
    """The source scan sees the calls the controller is known to make (guards the regex)."""
    calls = controller_api_calls()
    assert {"create", "get"} <= calls[("kubeflow.org", "pytorchjobs")]
    assert {"create", "delete"} <= calls[("apps", "deployments")] and "create" in calls[("batch", "jobs")]
    # a run never patches or updates a Deployment (the chart's belong to Helm / Argo CD)
    assert not {"patch", "update"} & calls[("apps", "deployments")]
    assert calls[("", "pods")] == {"list"}


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_pipeline_yaml_is_what_the_controller_loads(profile: str, rendered: dict[str, list[dict[str, Any]]],
                                                    tmp_path: Any) -> None:
    from p2r.controller.config import load_pipeline_config

    values = merged_values(PROFILES[profile])
    if not values["controller"]["enabled"]:
        assert not find(rendered[profile], "ConfigMap", "p2r-pipeline")
        return
    path = tmp_path / "pipeline.yaml"
    path.write_text(one(rendered[profile], "ConfigMap", "p2r-pipeline")["data"]["pipeline.yaml"])
    cfg = load_pipeline_config(path)
    assert cfg.backend == "kubernetes" and cfg.metrics_port == values["controller"]["metricsPort"]
    k = cfg.kubernetes
    assert k.namespace == NAMESPACE and k.server_container == "serve" and k.grpc_port == values["ports"]["grpc"]
    assert k.deployments == {r: f"p2r-{r}" for r in ("perceiver", "reasoner", "verifier")}
    for role, name in k.deployments.items():
        container = one(rendered[profile], "Deployment", name)["spec"]["template"]["spec"]["containers"][0]
        assert container["name"] == k.server_container, role
    # Trainers and eval write checkpoints as the least-privilege writer (the release's MinIO).
    minio = bool(find(rendered[profile], "StatefulSet", "p2r-minio"))
    assert k.s3_secret == ("p2r-s3-writer" if minio else values["s3"]["existingSecret"])
    assert k.image == one(rendered[profile], "Deployment", "p2r-controller")["spec"]["template"]["spec"][
        "containers"][0]["image"]
    # The layout is kubernetes.workers x nproc_per_node (one gpu_resource each), never a GPU count
    # in resources (the controller refuses one).
    assert not any(key.endswith("/gpu") for kind in k.resources.values() for key in kind)
    if profile == "cpu-smoke":  # two one-process CPU pods (gloo)
        assert (k.workers, k.nproc_per_node, k.gpu_resource) == (2, 1, None)
    else:  # the reference run: one pod with 4 GPUs under torchrun per stage
        assert (k.workers, k.nproc_per_node, k.gpu_resource) == (1, 4, "nvidia.com/gpu")
    from p2r.controller import pods

    job = pods.pytorchjob(k.pod, name="r-stage1-1", namespace=k.namespace, labels={}, pod_labels={}, image=k.image,
                          pull_policy=k.image_pull_policy, role="perceiver", config_map="c", config_file="train.yaml",
                          env=[], resources=k.resources or None, workers=k.workers, nproc_per_node=k.nproc_per_node,
                          gpu_resource=k.gpu_resource, data_pvc=k.data_pvc, data_mount=k.data_mount,
                          metrics_port=9090, restart_policy="Never", backoff_limit=0)
    assert pytorchjob_errors(job) == []
    assert job["spec"]["nprocPerNode"] == str(k.nproc_per_node)
    for spec in job["spec"]["pytorchReplicaSpecs"].values():
        c = spec["template"]["spec"]["containers"][0]
        assert _gpus(c, "requests") == _gpus(c, "limits") == (4 if profile != "cpu-smoke" else 0)


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_controller_rbac_is_least_privilege(profile: str, rendered: dict[str, list[dict[str, Any]]]) -> None:
    docs = rendered[profile]
    values = merged_values(PROFILES[profile])
    assert not find(docs, "ClusterRole") and not find(docs, "ClusterRoleBinding")
    if not values["controller"]["enabled"]:
        # Role pods have their own ServiceAccounts (tests/test_chart_defaults.py), with no token.
        assert not find(docs, "Role") and not find(docs, "ServiceAccount", "p2r-controller")
        return
    role = one(docs, "Role", "p2r-controller")
    rules: dict[tuple[str, str], set[str]] = {}
    for rule in role["rules"]:
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                assert "*" not in (group, resource, *rule["verbs"])
                rules[(group, resource)] = set(rule["verbs"])
                if resource == "deployments":  # the run's own are created and deleted; none is ever written
                    assert not {"patch", "update"} & set(rule["verbs"])
    assert rules == controller_api_calls(), "the Role must grant exactly what controller/kube.py calls"
    binding = one(docs, "RoleBinding", "p2r-controller")
    sa_name = values["controller"]["serviceAccount"]["name"] or "p2r-controller"
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "p2r-controller"}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": sa_name, "namespace": NAMESPACE}]
    controller = one(docs, "Deployment", "p2r-controller")["spec"]
    assert controller["template"]["spec"]["serviceAccountName"] == sa_name
    assert controller["strategy"] == {"type": "Recreate"} and controller["replicas"] == 1
    assert bool(find(docs, "ServiceAccount", "p2r-controller")) == values["controller"]["serviceAccount"]["create"]
    # Only the controller gets an API token.
    for name, spec in pod_specs(docs):
        assert spec.get("automountServiceAccountToken") is (name == "Deployment/p2r-controller"), name


def _secret_file_envs(docs: list[dict[str, Any]]) -> tuple[set[tuple[str, str, str]], list[str]]:
    """Credential-named ``*_FILE`` env vars (P2R_CLIENT_ADMIN_TOKEN_FILE): a *path*, not a credential,
    allowed only when it names a file of a Secret volume mounted into that container (the same rule
    as the ``*_file`` keys of serve.yaml). Returns the (object, container, env) triples that do, and
    a problem line for each one that does not (a literal value, or a path outside a Secret volume)."""
    from tests.k8s_support import CREDENTIAL_NAME

    ok: set[tuple[str, str, str]] = set()
    problems: list[str] = []
    for name, spec in pod_specs(docs):
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        for c in containers(spec):
            for env in c.get("env", []):
                if not (CREDENTIAL_NAME.search(env["name"]) and env["name"].endswith("_FILE")):
                    continue
                path = env.get("value", "")
                mount = next((m for m in c.get("volumeMounts", [])
                              if path.startswith(m["mountPath"].rstrip("/") + "/")), None)
                secret = volumes.get(mount["name"], {}).get("secret") if mount else None
                rel = path[len(mount["mountPath"].rstrip("/")) + 1:] if mount else ""
                files = [i["path"] for i in (secret or {}).get("items", [])]
                if secret and (not files or rel in files):
                    ok.add((name, c["name"], env["name"]))
                else:
                    problems.append(f"{name}/{c['name']}: {env['name']}={path!r} is not a file of a mounted Secret")
    return ok, problems


def _credentials_in_clear(docs: list[dict[str, Any]]) -> list[str]:
    """plaintext_credentials, except ``*_FILE`` paths into a mounted Secret (checked by _secret_file_envs)."""
    ok, problems = _secret_file_envs(docs)
    allowed = {f"{n}/{c}: env {e} " for n, c, e in ok}
    return problems + [p for p in plaintext_credentials(docs) if not any(p.startswith(a) for a in allowed)]


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_no_plaintext_credentials(profile: str, rendered: dict[str, list[dict[str, Any]]]) -> None:
    import copy

    docs = rendered[profile]
    assert not _credentials_in_clear(docs)
    controller = find(docs, "Deployment", "p2r-controller")
    if controller:
        # The controller reads the servers' admin token from a file of the admin-token Secret
        # (Admin.LoadCheckpoint); the same path from anything but a Secret volume is flagged.
        spec = controller[0]["spec"]["template"]["spec"]
        env = {e["name"]: e for e in spec["containers"][0]["env"]}
        assert env["P2R_CLIENT_ADMIN_TOKEN_FILE"] == {"name": "P2R_CLIENT_ADMIN_TOKEN_FILE",
                                                      "value": "/etc/p2r-admin/token"}
        assert ("Deployment/p2r-controller", "controller", "P2R_CLIENT_ADMIN_TOKEN_FILE") in _secret_file_envs(docs)[0]
        volume = next(v for v in spec["volumes"] if v["name"] == "admin-token")
        assert volume["secret"]["secretName"] == (merged_values(PROFILES[profile])["security"]["admin"]["secretName"]
                                                  or "p2r-admin-token")

        def broken(change: Any) -> list[str]:
            copied = copy.deepcopy(docs)
            change(one(copied, "Deployment", "p2r-controller")["spec"]["template"]["spec"])
            return [p for p in _credentials_in_clear(copied) if "P2R_CLIENT_ADMIN_TOKEN_FILE" in p]

        def to_empty_dir(s: dict[str, Any]) -> None:  # the path then names no Secret's file
            s["volumes"] = [{"name": v["name"], "emptyDir": {}} if v["name"] == "admin-token" else v
                            for v in s["volumes"]]

        def token_in_env(s: dict[str, Any]) -> None:  # the token itself written into the env
            next(e for e in s["containers"][0]["env"] if e["name"] == "P2R_CLIENT_ADMIN_TOKEN_FILE")[
                "value"] = "s3cr3t-token"

        assert broken(to_empty_dir) and broken(token_in_env)
    for secret in find(docs, "Secret"):
        assert "stringData" not in secret
    values = merged_values(PROFILES[profile])
    # The admin token Secret (templates/security.yaml) is checked in tests/test_security.py.
    secrets = [s for s in find(docs, "Secret") if s["metadata"]["name"] != "p2r-admin-token"]
    admin = values["s3"]["existingSecret"] or "p2r-s3"
    if find(docs, "StatefulSet", "p2r-minio"):
        users = {"reader": "p2r-s3-reader", "writer": "p2r-s3-writer"}
        assert sorted(s["metadata"]["name"] for s in secrets) == sorted({admin, *users.values()} - {
            values["s3"]["existingSecret"]})
        for s in secrets:
            assert s["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    else:
        assert not secrets
        users = {"reader": admin, "writer": admin}
    # Each pod reads both keys from one Secret: role servers the read-only user, the controller
    # the writer, MinIO and the hooks the admin.
    expected = {"serve": users["reader"], "controller": users["writer"], "minio": admin, "provision": admin,
                "mc": admin}
    for name, spec in pod_specs(docs):
        for c in containers(spec):
            env = {e["name"]: e for e in c.get("env", [])}
            if "AWS_SECRET_ACCESS_KEY" in env:
                want = expected.get(c["name"], admin)
                for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
                    ref = env[key]["valueFrom"]["secretKeyRef"]
                    assert ref == {"name": want, "key": values["s3"][
                        "accessKeyKey" if key == "AWS_ACCESS_KEY_ID" else "secretKeyKey"]}, (name, c["name"])


def test_generated_credentials_are_random() -> None:
    """The release's MinIO (here turned on by the controller, which needs object storage) gets
    random keys for its root user and both users; a release without MinIO generates none."""
    assert not [s for s in find(render({}), "Secret") if s["metadata"]["name"].startswith("p2r-s3")]
    needs_minio = {"controller": {"enabled": True}}
    first, second = render(needs_minio), render(needs_minio)
    assert find(first, "StatefulSet", "p2r-minio")
    for name in ("p2r-s3", "p2r-s3-reader", "p2r-s3-writer"):
        a, b = one(first, "Secret", name)["data"], one(second, "Secret", name)["data"]
        assert set(a) == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}, name
        assert len(base64_decode(a["AWS_SECRET_ACCESS_KEY"])) >= 40, name
        assert a["AWS_SECRET_ACCESS_KEY"] != b["AWS_SECRET_ACCESS_KEY"], name
        assert a["AWS_ACCESS_KEY_ID"] != b["AWS_ACCESS_KEY_ID"], name


def test_values_files_hold_no_credentials() -> None:
    for path in [CHART / "values.yaml", *sorted((CHART / "ci").glob("*.yaml"))]:
        for line in path.read_text().splitlines():
            m = re.match(r"\s*([A-Za-z_]+):\s*(\S.*)?$", line.split("#")[0])
            if m and re.search(r"password|secretkey|accesskey|(^|_)token($|_)", m.group(1), re.I):
                assert m.group(1).endswith("Key"), f"{path.name}: {line}"  # key *names*, not values


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_security_context(profile: str, rendered: dict[str, list[dict[str, Any]]]) -> None:
    """The same assertions as the manifests' pods and the pods the controller creates."""
    errors = [e for name, spec in pod_specs(rendered[profile]) for e in pod_security_errors(name, spec)]
    assert not errors, "\n".join(errors)


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_service_links_are_off(profile: str, rendered: dict[str, list[dict[str, Any]]],
                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Kubernetes injects <SERVICE>_PORT=tcp://... for every Service in the namespace; a Service
    named e.g. p2r-metrics would set P2R_METRICS_PORT, which p2r's settings read and reject."""
    from p2r.services.config import ServeConfig

    for name, spec in pod_specs(rendered[profile]):
        assert spec["enableServiceLinks"] is False, name
    monkeypatch.setenv("P2R_METRICS_PORT", "tcp://10.0.0.7:9090")
    with pytest.raises(ValueError, match="metrics_port"):
        ServeConfig()


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_client_dry_run_install(profile: str) -> None:
    """`helm install --dry-run=client` (kubeVersion constraint, schema, hooks) for every profile."""
    import helm_python

    release = helm_python.Config(storage_driver="memory").install(
        str(CHART), "p2r", PROFILES[profile], namespace=NAMESPACE, dry_run="client")
    manifest = release["manifest"]
    assert "kind: Deployment" in manifest and "name: p2r-gateway" in manifest


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_services_select_their_pods(profile: str, rendered: dict[str, list[dict[str, Any]]]) -> None:
    docs = rendered[profile]
    workloads = find(docs, "Deployment") + find(docs, "StatefulSet")
    for svc in find(docs, "Service"):
        sel = svc["spec"]["selector"]
        matches = [w for w in workloads if sel.items() <= w["spec"]["template"]["metadata"]["labels"].items()]
        assert len(matches) == 1, svc["metadata"]["name"]
        # A sidecar without ports (MinIO's `provision` container) serves nothing; every targetPort
        # must still name a port some container of the selected pod declares.
        ports = {p["name"] for c in matches[0]["spec"]["template"]["spec"]["containers"] for p in c.get("ports", [])}
        assert ports and {p["targetPort"] for p in svc["spec"]["ports"]} <= ports, svc["metadata"]["name"]
    for pdb in find(docs, "PodDisruptionBudget"):
        sel = pdb["spec"]["selector"]["matchLabels"]
        assert any(sel.items() <= w["spec"]["template"]["metadata"]["labels"].items() for w in workloads)


def test_autoscaling_on_waiting_requests(rendered: dict[str, list[dict[str, Any]]]) -> None:
    docs = rendered["gpu-production"]
    hpas = {h["metadata"]["name"]: h for h in find(docs, "HorizontalPodAutoscaler")}
    assert set(hpas) == {"p2r-perceiver", "p2r-reasoner", "p2r-gateway"}
    # The gateway runs no engine: it scales on CPU.
    gateway = hpas.pop("p2r-gateway")["spec"]
    assert gateway["metrics"] == [{"type": "Resource", "resource": {"name": "cpu", "target": {
        "type": "Utilization", "averageUtilization": 70}}}]
    assert (gateway["minReplicas"], gateway["maxReplicas"]) == (2, 6)
    assert "replicas" not in one(docs, "Deployment", "p2r-gateway")["spec"]
    for name, hpa in hpas.items():
        assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": name}
        metric = hpa["spec"]["metrics"][0]["pods"]
        assert metric["metric"]["name"] == "vllm_num_requests_waiting"
        assert metric["target"] == {"type": "AverageValue", "averageValue": "8"}
        assert "replicas" not in one(docs, "Deployment", name)["spec"]  # the HPA owns it
    assert not find(docs, "Deployment", "p2r-verifier")  # only with the controller (test_chart_defaults.py)
    assert not find(rendered["default"], "HorizontalPodAutoscaler")


def test_network_policies(rendered: dict[str, list[dict[str, Any]]]) -> None:
    """Default deny for the release; only the gateway admits traffic from outside it."""
    assert not find(rendered["default"], "NetworkPolicy")
    docs = rendered["gpu-production"]
    policies = {p["metadata"]["name"]: p["spec"] for p in find(docs, "NetworkPolicy")}
    deny = policies.pop("p2r-default-deny")
    # The gateway admits what its exposure needs: the ingress controller (ingress.from) and the
    # release's `helm test` pod.
    gateway_from = [*merged_values(PROFILES["gpu-production"])["ingress"]["from"],
                    {"podSelector": {"matchLabels": {"app.kubernetes.io/name": "p2r",
                                                     "app.kubernetes.io/instance": "p2r",
                                                     "app.kubernetes.io/component": "test"}}}]
    assert deny["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "p2r", "app.kubernetes.io/instance": "p2r"}
    assert deny["policyTypes"] == ["Ingress"] and "ingress" not in deny
    metrics_from = merged_values(PROFILES["gpu-production"])["networkPolicy"]["metricsFrom"]
    internal = [{"podSelector": {"matchLabels": {"app.kubernetes.io/part-of": "p2r"}}}]
    # the admin port (Admin.LoadCheckpoint): the controller and the trainer pods only
    admin_from = [{"podSelector": {"matchLabels": {"app.kubernetes.io/name": "p2r", "app.kubernetes.io/instance": "p2r",
                                                   "app.kubernetes.io/component": "controller"}}},
                  {"podSelector": {"matchLabels": {"app.kubernetes.io/part-of": "p2r",
                                                   "app.kubernetes.io/component": "trainer"}}}]
    for name, spec in policies.items():
        for rule in spec["ingress"]:
            ports = {p["port"] for p in rule["ports"]}
            if ports == {"metrics"}:
                assert rule["from"] == metrics_from, name
            elif ports == {"admin"}:
                assert name in ("p2r-perceiver", "p2r-reasoner", "p2r-verifier") and rule["from"] == admin_from
            elif name == "p2r-gateway":
                assert ports == {"grpc", "http"} and rule["from"] == gateway_from
            else:
                assert rule["from"] == internal, (name, rule)
    # A policy per deployed role (the verifier only with the controller) and MinIO where it runs.
    deployed = {d["metadata"]["name"] for d in find(docs, "Deployment") + find(docs, "StatefulSet")}
    assert set(policies) == {"p2r-perceiver", "p2r-reasoner", "p2r-verifier", "p2r-gateway", "p2r-minio"} & deployed
    assert {"p2r-perceiver", "p2r-reasoner", "p2r-gateway"} <= set(policies)


def test_monitoring_switches(rendered: dict[str, list[dict[str, Any]]]) -> None:
    """Operator objects behind flags, scrape annotations otherwise; dashboards for the sidecar."""
    default, prod = rendered["default"], rendered["gpu-production"]
    assert not find(default, "ServiceMonitor") and not find(default, "PrometheusRule")
    ann = one(default, "Deployment", "p2r-gateway")["spec"]["template"]["metadata"]["annotations"]
    assert ann["prometheus.io/scrape"] == "true" and ann["prometheus.io/port"] == "9090"
    assert "p2r-rules.yaml" in one(default, "ConfigMap", "p2r-alert-rules")["data"]
    monitors = {m["metadata"]["name"] for m in find(prod, "ServiceMonitor")}
    # The controller (and so the verifier) is off in gpu-production.
    assert monitors == {f"p2r-{c}" for c in ROLES if c != "verifier"}
    for m in find(prod, "ServiceMonitor") + find(prod, "PodMonitor") + find(prod, "PrometheusRule"):
        assert m["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    for m in find(prod, "ServiceMonitor"):
        svc = one(prod, "Service", m["metadata"]["name"])
        assert m["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
        assert m["spec"]["endpoints"][0]["port"] in {p["name"] for p in svc["spec"]["ports"]}
    pod_monitor = one(prod, "PodMonitor", "p2r-trainer")
    assert pod_monitor["spec"]["selector"]["matchLabels"] == {"app.kubernetes.io/part-of": "p2r",
                                                              "app.kubernetes.io/component": "trainer"}
    assert "prometheus.io/scrape" not in one(prod, "Deployment", "p2r-gateway")["spec"]["template"]["metadata"].get(
        "annotations", {})
    dashboards = [c for c in find(default, "ConfigMap") if c["metadata"]["name"].startswith("p2r-dashboard-")]
    assert {c["metadata"]["name"] for c in dashboards} == {"p2r-dashboard-serving", "p2r-dashboard-training",
                                                           "p2r-dashboard-pipeline"}
    for cm in dashboards:
        assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"


def test_tiny_model_init_for_cpu_smoke(rendered: dict[str, list[dict[str, Any]]]) -> None:
    docs = rendered["cpu-smoke"]
    for role in ("perceiver", "reasoner", "verifier"):
        spec = one(docs, "Deployment", f"p2r-{role}")["spec"]["template"]["spec"]
        assert spec["initContainers"][0]["command"] == ["p2r", "models", "tiny", "--out", "/cache/tiny"]
        assert _serve_yaml(docs, role)["model"] == "/cache/tiny"
        assert spec["containers"][0]["image"].startswith("ghcr.io/p2r-platform/p2r-cpu:")
    assert "initContainers" not in one(docs, "Deployment", "p2r-gateway")["spec"]["template"]["spec"]


def test_external_s3_and_model_pvc(rendered: dict[str, list[dict[str, Any]]]) -> None:
    docs = rendered["external-s3"]
    assert not find(docs, "StatefulSet")
    spec = one(docs, "Deployment", "p2r-reasoner")["spec"]["template"]["spec"]
    env = {e["name"]: e for e in spec["containers"][0]["env"]}
    assert env["P2R_S3_ENDPOINT"]["value"] == "minio.storage.svc.cluster.local:9000"
    assert env["P2R_S3_SECURE"]["value"] == "true"
    models = next(v for v in spec["volumes"] if v["name"] == "models")
    assert models["persistentVolumeClaim"] == {"claimName": "p2r-models", "readOnly": True}
    # The bucket on someone else's S3 comes from a hook that runs *before* anything of the release
    # (pre-install / pre-upgrade; Argo CD maps both to PreSync): the endpoint and s3.existingSecret
    # exist already, and the controller may write its first run as soon as it starts.
    hook = one(docs, "Job", "p2r-create-bucket")
    annotations = hook["metadata"]["annotations"]
    assert annotations["helm.sh/hook"] == "pre-install,pre-upgrade"
    assert "before-hook-creation" in annotations["helm.sh/hook-delete-policy"].split(",")
    assert hook["spec"]["activeDeadlineSeconds"] > 0
    hook_env = {e["name"]: e for e in hook["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert hook_env["P2R_S3_BUCKET"]["value"] == "p2r-prod"
    assert hook_env["P2R_S3_ENDPOINT"]["value"] == "minio.storage.svc.cluster.local:9000"
    assert hook_env["P2R_S3_SECURE"]["value"] == "true"
    assert hook_env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "p2r-s3"  # s3.existingSecret
    # The release's own MinIO never has this hook: its pod provisions itself (test_bucket_hook_users_and_deadline).
    assert not find(render({"controller": {"enabled": True}}), "Job", "p2r-create-bucket")


def test_values_yaml_is_documented_line_by_line() -> None:
    """Every key in values.yaml has a comment right above it (list items and the keys inside
    them belong to the documented key that holds the list)."""
    lines = (CHART / "values.yaml").read_text().splitlines()
    undocumented = []
    inside_list_of: int | None = None
    for i, line in enumerate(lines):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        indent = len(line) - len(line.lstrip())
        if inside_list_of is not None:
            if indent > inside_list_of:
                continue
            inside_list_of = None
        if line.lstrip().startswith("- "):
            continue
        m = re.match(r"\s*([A-Za-z0-9_.\-/]+):(.*)$", line)
        assert m, line
        nxt = next((x for x in lines[i + 1:] if x.strip() and not x.lstrip().startswith("#")), "")
        if not m.group(2).strip() and nxt.lstrip().startswith("- "):
            inside_list_of = indent
        prev = lines[i - 1].strip() if i else ""
        is_parent = not m.group(2).strip() and not nxt.lstrip().startswith("- ")
        if not prev.startswith("#") and not is_parent:
            undocumented.append(f"{i + 1}: {line.strip()}")
    assert not undocumented, "\n".join(undocumented)


# ------------------------------------------------------------------- issue 17: out of the box


def _notes(values: dict[str, Any]) -> str:
    import helm_python

    rendered = helm_python.Chart.load(str(CHART)).render(values, name="p2r", namespace=NAMESPACE, is_install=True)
    return str(rendered["p2r/templates/NOTES.txt"])


def test_default_install_starts_no_training(rendered: dict[str, list[dict[str, Any]]]) -> None:
    """`helm template` of the defaults creates no controller (so no PyTorchJob, no GPU training)
    and NOTES.txt says what a pipeline would need."""
    docs = rendered["default"]
    assert not [d for d in docs if "controller" in d["metadata"]["name"]]
    assert not find(docs, "PyTorchJob") and not find(docs, "Role") and not find(docs, "RoleBinding")
    notes = _notes({})
    assert "controller is off" in notes and "training" in notes and "data claim" in notes
    assert "p2r models upload" in notes  # how to seed models
    on = _notes({"controller": {"enabled": True}})
    assert "pytorchjobs.kubeflow.org" in on and "p2r-data" in on and "InputsMissing" in on


def _seed_job(docs: list[dict[str, Any]]) -> dict[str, Any]:
    """The seed Job: a plain resource whose name carries a hash of what it writes."""
    jobs = [j for j in find(docs, "Job") if j["metadata"]["labels"]["app.kubernetes.io/component"] == "seed-models"]
    assert len(jobs) == 1, [j["metadata"]["name"] for j in jobs]
    assert re.fullmatch(r"p2r-seed-[0-9a-f]{8}", jobs[0]["metadata"]["name"]), jobs[0]["metadata"]["name"]
    return jobs[0]


def _wave(doc: dict[str, Any]) -> int:
    return int((doc["metadata"].get("annotations") or {}).get("argocd.argoproj.io/sync-wave", "0"))


def test_cpu_smoke_needs_no_manual_step(rendered: dict[str, list[dict[str, Any]]]) -> None:
    """cpu-smoke: every role serves a model its own init container writes; MinIO creates the
    bucket and users itself (Ready only after); the seed Job, a plain resource applied with the
    release (Argo CD: after MinIO, before the roles), waits for the bucket, then writes the
    controller's base model and its synthetic data set; NOTES say so."""
    docs = rendered["cpu-smoke"]
    values = merged_values(PROFILES["cpu-smoke"])
    for role in ("perceiver", "reasoner", "verifier"):
        spec = one(docs, "Deployment", f"p2r-{role}")["spec"]["template"]["spec"]
        model = _serve_yaml(docs, role)["model"]
        writes = {c["command"][-1] for c in spec["initContainers"]}
        assert model in writes, role
    assert not [j for j in find(docs, "Job") if "helm.sh/hook" in (j["metadata"].get("annotations") or {})]
    minio = one(docs, "StatefulSet", "p2r-minio")
    provision = next(c for c in minio["spec"]["template"]["spec"]["containers"] if c["name"] == "provision")
    assert 'mc mb --ignore-existing "p2r/$P2R_S3_BUCKET"' in provision["args"][0]
    assert {"name": "P2R_S3_BUCKET", "value": values["s3"]["bucket"]} in provision["env"]
    assert "test -f /tmp/provisioned" in provision["readinessProbe"]["exec"]["command"][-1]
    seed = _seed_job(docs)
    assert "helm.sh/hook" not in seed["metadata"]["annotations"]
    # Argo CD sync waves: Secrets and MinIO, then the seed Job, then everything else.
    assert _wave(minio) < _wave(seed) < min(_wave(d) for d in find(docs, "Deployment"))
    assert all(_wave(s) <= _wave(minio) for s in find(docs, "Secret") if s["metadata"]["name"].startswith("p2r-s3"))
    assert seed["spec"]["activeDeadlineSeconds"] > 0 and seed["spec"]["backoffLimit"] >= 1
    spec = seed["spec"]["template"]["spec"]
    steps = [[*c["command"], *c["args"]] for c in containers(spec)]
    for c in containers(spec):
        env = {e["name"]: e for e in c["env"]}
        assert env["P2R_S3_ENDPOINT"]["value"] == "p2r-minio:9000", c["name"]
    assert steps[0] == ["p2r", "models", "wait", f"s3://{values['s3']['bucket']}"]  # made by MinIO's pod
    base = values["controller"]["config"]["base_model"]
    tiny, upload = steps[1], steps[2]
    assert tiny[:3] == ["p2r", "models", "tiny"] and upload[:3] == ["p2r", "models", "upload"]
    assert upload[-1] == base and tiny[-1] == upload[-2]
    data_set = values["controller"]["config"]["data"].rsplit("/", 1)[0]
    synth, upload_data = steps[3], steps[4]
    assert synth[:3] == ["p2r", "data", "synth"] and upload_data[:3] == ["p2r", "data", "upload"]
    assert upload_data[-1] == data_set and synth[synth.index("--out") + 1] == upload_data[-2]
    assert len(steps) == 5
    for argv in steps:
        assert parse_p2r_command(argv).command.name == argv[2], argv  # what the image's CLI accepts
    notes = _notes(PROFILES["cpu-smoke"])
    assert "component=seed-models" in notes and f"tiny -> {base}" in notes
    assert f"p2r data synth (64 samples) -> {data_set}" in notes


def test_role_services_are_headless_and_clients_use_dns(rendered: dict[str, list[dict[str, Any]]]) -> None:
    """Model roles: headless Services, so the gateway's dns:/// target resolves every pod for
    round_robin. The gateway keeps a ClusterIP (or LoadBalancer) Service for outside traffic and
    a headless one for in-cluster gRPC clients."""
    docs = render({"roles": {"verifier": {"enabled": True}}})
    for role in ("perceiver", "reasoner", "verifier"):
        assert one(docs, "Service", f"p2r-{role}")["spec"]["clusterIP"] == "None", role
    assert "clusterIP" not in one(docs, "Service", "p2r-gateway")["spec"]
    assert one(docs, "Service", "p2r-gateway-headless")["spec"]["clusterIP"] == "None"
    gateway = _serve_yaml(docs, "gateway")
    assert gateway["perceiver_endpoint"] == "dns:///p2r-perceiver.p2r.svc.cluster.local:50051"
    # Servers close connections after max_connection_age_s, so long-lived channels re-resolve.
    for role in ROLES:
        cfg = _serve_yaml(docs, role)
        assert (cfg["max_connection_age_s"], cfg["max_connection_age_grace_s"]) == (300, 600), role
    assert "max_connection_age_s" not in _serve_yaml(
        render({"serveConfig": {"max_connection_age_s": None}}), "reasoner")  # Helm drops a null: the server's default
    other = _serve_yaml(render({"clusterDomain": "corp.internal"}), "gateway")
    assert other["reasoner_endpoint"] == "dns:///p2r-reasoner.p2r.svc.corp.internal:50051"


def test_role_maps_replace_and_null_removes(rendered: dict[str, list[dict[str, Any]]]) -> None:
    """Helm's merge semantics in p2r.merge: gpu-production's gateway (nodeSelector: {}) does not
    keep roleDefaults' H100 selector; null removes a key; chart setting groups still merge."""
    prod = rendered["gpu-production"]
    gateway = one(prod, "Deployment", "p2r-gateway")["spec"]["template"]["spec"]
    assert "nodeSelector" not in gateway and "tolerations" not in gateway and "runtimeClassName" not in gateway
    reasoner = one(prod, "Deployment", "p2r-reasoner")["spec"]["template"]["spec"]
    assert reasoner["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    docs = render({"roleDefaults": {"nodeSelector": {"pool": "gpu", "zone": "a"},
                                    "podAnnotations": {"a": "1"}, "priorityClassName": "p2r-serving",
                                    "serveConfig": {"limits": {"max_model_len": 4096, "max_num_seqs": 8}}},
                   "roles": {"verifier": {"enabled": True},
                             "perceiver": {"nodeSelector": {"pool": "small"}, "priorityClassName": None,
                                           "serveConfig": {"limits": {"max_num_seqs": 2}}},
                             "reasoner": {"nodeSelector": None}}})
    perceiver = one(docs, "Deployment", "p2r-perceiver")["spec"]["template"]
    assert perceiver["spec"]["nodeSelector"] == {"pool": "small"}  # replaced, not {"pool": "small", "zone": "a"}
    assert "priorityClassName" not in perceiver["spec"]  # null removed the default
    assert perceiver["metadata"]["annotations"]["a"] == "1"
    assert "nodeSelector" not in one(docs, "Deployment", "p2r-reasoner")["spec"]["template"]["spec"]
    assert one(docs, "Deployment", "p2r-verifier")["spec"]["template"]["spec"]["nodeSelector"] == {
        "pool": "gpu", "zone": "a"}
    limits = _serve_yaml(docs, "perceiver")["limits"]
    assert (limits["max_model_len"], limits["max_num_seqs"]) == (4096, 2)  # serveConfig merges key by key
    assert _serve_yaml(docs, "reasoner")["limits"]["max_num_seqs"] == 8


def test_engine_arguments_per_role(rendered: dict[str, list[dict[str, Any]]]) -> None:
    """serve.yaml carries each role's engine arguments; tensor_parallel_size follows the pod's
    GPUs unless set; the vLLM arguments computed for a GPU platform from it (services/engine.py)
    span both GPUs with CUDA graphs on and prefix caching; on CPU the tiny profile runs eager."""
    from p2r.services.config import Limits
    from p2r.services.engine import EngineLimits, engine_kwargs

    prod = rendered["gpu-production"]
    reasoner = _serve_yaml(prod, "reasoner")["limits"]
    assert reasoner["tensor_parallel_size"] == 2 and reasoner["max_num_seqs"] == 128
    assert reasoner["gpu_memory_utilization"] == 0.92 and reasoner["max_model_len"] == 16384
    assert _serve_yaml(prod, "perceiver")["limits"]["tensor_parallel_size"] == 1
    assert "tensor_parallel_size" not in _serve_yaml(prod, "gateway")["limits"]
    kwargs = engine_kwargs("/m", EngineLimits(**Limits(**reasoner).model_dump()), 0, platform="cuda", gpus=2)
    assert kwargs["tensor_parallel_size"] == 2 and kwargs["enforce_eager"] is False
    assert kwargs["enable_prefix_caching"] is True and kwargs["max_num_seqs"] == 128
    assert kwargs["gpu_memory_utilization"] == 0.92
    explicit = render({"roles": {"reasoner": {"gpus": 4, "serveConfig": {"limits": {"tensor_parallel_size": 2}}}}})
    assert _serve_yaml(explicit, "reasoner")["limits"]["tensor_parallel_size"] == 2
    smoke = _serve_yaml(rendered["cpu-smoke"], "reasoner")["limits"]
    cpu = engine_kwargs("/m", EngineLimits(**Limits(**smoke).model_dump()), 0, platform="cpu")
    assert cpu["enforce_eager"] is True and cpu["tensor_parallel_size"] == 1 and cpu["max_num_seqs"] == 4
    default = _serve_yaml(rendered["default"], "reasoner")["limits"]
    assert "max_num_seqs" not in default and default["enable_prefix_caching"] is True  # no CPU cap on GPUs


def _cache_volume(docs: list[dict[str, Any]], role: str = "reasoner") -> dict[str, Any]:
    spec = one(docs, "Deployment", f"p2r-{role}")["spec"]["template"]["spec"]
    return next(v for v in spec["volumes"] if v["name"] == "cache")


def test_model_cache_volumes(rendered: dict[str, list[dict[str, Any]]]) -> None:
    """Per-role cache directories, and the three kinds of /cache volume."""
    from p2r.services.config import ServeConfig

    for role in ROLES:  # ServeConfig adds the role: /cache/models/<role>
        root = _serve_yaml(rendered["cpu-smoke"], role)["checkpoint_cache"]
        cfg = ServeConfig.model_construct(checkpoint_cache=Path(root), roles=[role])
        assert cfg.model_cache == Path(f"/cache/models/{role}")
    # The default: a claim per model role (kept across pod restarts; tests/test_chart_defaults.py).
    assert _cache_volume(rendered["default"])["persistentVolumeClaim"] == {"claimName": "p2r-reasoner-cache"}
    shared = render({"cache": {"existingClaim": "models-rwx"}})
    assert _cache_volume(shared)["persistentVolumeClaim"] == {"claimName": "models-rwx"}
    eph = render({"cache": {"ephemeral": {"enabled": True, "volumeClaimTemplate": {"spec": {
        "accessModes": ["ReadWriteOnce"], "storageClassName": "fast",
        "resources": {"requests": {"storage": "80Gi"}}}}}}})
    claim = _cache_volume(eph)["ephemeral"]["volumeClaimTemplate"]["spec"]
    assert claim == {"accessModes": ["ReadWriteOnce"], "storageClassName": "fast",
                     "resources": {"requests": {"storage": "80Gi"}}}
    default_class = render({"cache": {"ephemeral": {"enabled": True}}})
    assert "storageClassName" not in _cache_volume(default_class)["ephemeral"]["volumeClaimTemplate"]["spec"]
    for d in find(eph, "Deployment"):
        assert not errors_of(d), d["metadata"]["name"]
    values_text = (CHART / "values.yaml").read_text()
    assert "ReadWriteMany" in values_text and "keeps downloads across restarts" not in values_text


def errors_of(doc: dict[str, Any]) -> list[str]:
    return [e for v in KUBE_VERSIONS for e in validation_errors(doc, v)]


def test_hf_models_and_token() -> None:
    """hf:// model URIs are accepted; HF_TOKEN comes only from its Secret, HF_ENDPOINT from values."""
    docs = render({"models": {"huggingFace": {"endpoint": "https://hf-mirror.example.com", "tokenSecret": "hf"}},
                   "roles": {"reasoner": {"model": "hf://Qwen/Qwen3-VL-4B-Instruct"}}})
    env = {e["name"]: e for e in one(docs, "Deployment", "p2r-reasoner")["spec"]["template"]["spec"][
        "containers"][0]["env"]}
    assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "hf", "key": "HF_TOKEN"}
    assert env["HF_ENDPOINT"]["value"] == "https://hf-mirror.example.com"
    assert env["HF_HOME"]["value"].startswith("/cache/")
    assert _serve_yaml(docs, "reasoner")["model"] == "hf://Qwen/Qwen3-VL-4B-Instruct"
    assert not plaintext_credentials(docs)
    assert "HF_TOKEN" not in {e["name"] for e in one(render({}), "Deployment", "p2r-reasoner")["spec"][
        "template"]["spec"]["containers"][0]["env"]}


# ---------------------------------------------------------------------- issue 17: operating


def _without_secret_data(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    import copy

    out = copy.deepcopy(docs)
    for d in out:
        if d["kind"] == "Secret":
            d["data"] = {}
        ann = d.get("spec", {}).get("template", {}).get("metadata", {}).get("annotations", {})
        ann.pop("checksum/s3-credentials", None)
    return out


def test_secrets_stable_path() -> None:
    """With existing Secrets two renders are identical (GitOps); with generated ones only the
    keys differ: no pod carries a checksum of generated keys (issue 24: each render would restart
    every pod), and the Secrets are kept on uninstall."""
    existing: dict[str, Any] = {
        "s3": {"existingSecret": "s3-admin", "users": {"reader": {"existingSecret": "s3-ro"},
                                                       "writer": {"existingSecret": "s3-rw"}}},
        "controller": {"enabled": True}}
    if "security" in merged_values({}):  # the servers' admin token (security.yaml) has its own existing Secret
        existing["security"] = {"admin": {"secretName": "admin-token"}}
    a, b = render(existing), render(existing)
    assert a == b and not find(a, "Secret")
    generated = {k: v for k, v in existing.items() if k != "s3"}
    g1, g2 = render(generated), render(generated)
    assert g1 != g2 and _without_secret_data(g1) == _without_secret_data(g2)
    secrets = {s["metadata"]["name"]: s for s in find(g1, "Secret") if s["metadata"]["name"].startswith("p2r-s3")}
    assert set(secrets) == {"p2r-s3", "p2r-s3-reader", "p2r-s3-writer"}
    for workload in ("p2r-reasoner", "p2r-controller", "p2r-minio"):
        obj = (find(g1, "Deployment", workload) + find(g1, "StatefulSet", workload))[0]
        assert "checksum/s3-credentials" not in (obj["spec"]["template"]["metadata"].get("annotations") or {})
    assert all(s["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep" for s in secrets.values())
    keys = {base64_decode(s["data"]["AWS_ACCESS_KEY_ID"]) for s in secrets.values()}
    assert len(keys) == 3  # three distinct users


def base64_decode(text: str) -> str:
    import base64

    return base64.b64decode(text).decode()


EXTERNAL_S3 = {"minio": {"enabled": False},
               "s3": {"externalEndpoint": "s3.example.com:443", "existingSecret": "s3-admin"}}


def _fake_mc_bin(tmp_path: Path, fail_on: str = "") -> Path:
    """A bin directory with the few tools the provisioning scripts use and a fake ``mc`` that
    logs its arguments (one line a call) and fails a call containing ``fail_on``."""
    import shutil

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(parents=True)
    for tool in ("date", "sleep", "cat", "grep", "touch"):
        (bin_dir / tool).symlink_to(shutil.which(tool) or f"/bin/{tool}")
    fail = f'case "$*" in *"{fail_on}"*) echo "mc: refused" >&2; exit 1;; esac' if fail_on else ""
    (bin_dir / "mc").write_text(f'#!/bin/sh\necho "$*" >> "{tmp_path}/mc.log"\n{fail}\nexit 0\n')
    (bin_dir / "mc").chmod(0o755)
    return bin_dir


def test_bucket_hook_users_and_deadline(rendered: dict[str, list[dict[str, Any]]], tmp_path: Path) -> None:
    """The release's MinIO creates the bucket, the read-only and read-write policies and users in
    its `provision` container, and reports Ready only after they exist: its script, run by a real
    /bin/sh (a fake `mc` logging each call), makes the marker the readiness probe tests only
    after the last call succeeded, and not at all when one fails. An external S3's bucket hook
    creates no users, and its wait for the endpoint ends (error naming the Secret) after
    s3.hookWaitSeconds."""
    import json
    import subprocess

    docs = rendered["cpu-smoke"]
    assert not find(docs, "Job", "p2r-create-bucket")  # no hook: the pod provisions itself
    pod = one(docs, "StatefulSet", "p2r-minio")["spec"]["template"]["spec"]
    c = next(c for c in pod["containers"] if c["name"] == "provision")
    script = c["args"][0]
    env = {e["name"]: e for e in c["env"]}
    assert env["P2R_S3_ENDPOINT"]["value"] == "127.0.0.1:9000"  # its own pod's MinIO
    assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "p2r-s3"  # MinIO's root user
    probe = c["readinessProbe"]["exec"]["command"]
    assert probe == ["/bin/sh", "-c", "test -f /tmp/provisioned"]
    policies = re.findall(r"cat > /tmp/(\w+)\.json <<'EOF'\n(.*?)\nEOF", script, re.S)
    policy = {name: json.loads(body) for name, body in policies}
    reader = [s for s in policy["reader"]["Statement"] for a in s["Action"] if a in ("s3:PutObject", "s3:DeleteObject")]
    assert not reader  # servers read only
    writes = [s for s in policy["writer"]["Statement"] if "s3:PutObject" in s["Action"]]
    assert writes[0]["Resource"] == ["arn:aws:s3:::p2r/runs/*"]
    for user in ("READER", "WRITER"):
        assert f'mc admin user add p2r "${user}_ACCESS_KEY" "${user}_SECRET_KEY"' in script
        assert env[f"{user}_SECRET_KEY"]["valueFrom"]["secretKeyRef"]["name"] == f"p2r-s3-{user.lower()}"

    idle = "while :; do sleep 3600; done"
    assert script.rstrip().endswith(idle)  # then idles: the container stays, Ready
    fake = {"P2R_S3_ENDPOINT": "127.0.0.1:9000", "P2R_S3_SECURE": "false", "P2R_S3_BUCKET": "p2r",
            "P2R_WAIT_SECONDS": "240", "AWS_ACCESS_KEY_ID": "root", "AWS_SECRET_ACCESS_KEY": "rootpw",
            "READER_ACCESS_KEY": "ro", "READER_SECRET_KEY": "ropw", "WRITER_ACCESS_KEY": "rw",
            "WRITER_SECRET_KEY": "rwpw"}

    def run(fail_on: str) -> tuple[subprocess.CompletedProcess[str], Path]:
        """The script with its /tmp (the `mc` emptyDir) in a fresh directory; returns that directory."""
        work = tmp_path / (fail_on.replace(" ", "-") or "ok")
        bin_dir = _fake_mc_bin(work, fail_on)
        runnable = script.rstrip().removesuffix(idle).replace("/tmp/", f"{work}/")
        out = subprocess.run(["/bin/sh", "-ec", runnable], capture_output=True, text=True, timeout=60,
                             env={**fake, "PATH": str(bin_dir), "HOME": str(work)}, cwd=work)
        return out, work

    ok, work = run("")
    assert ok.returncode == 0 and (work / "provisioned").is_file(), ok.stdout + ok.stderr
    strip = [c.replace(f"--config-dir {work}/mc ", "") for c in (work / "mc.log").read_text().splitlines()]
    assert strip[0] == "alias set p2r http://127.0.0.1:9000 root rootpw"
    assert strip[1] == "mb --ignore-existing p2r/p2r"
    assert {"admin user add p2r ro ropw", "admin user add p2r rw rwpw", "admin policy attach p2r p2r-reader --user ro",
            "admin policy attach p2r p2r-writer --user rw"} <= set(strip)
    assert "bucket p2r and users ready" in ok.stdout
    for step in ("mb --ignore-existing", "admin user add", "admin policy attach"):
        failed, work = run(step)  # the container exits (and restarts); the pod never turns Ready
        assert failed.returncode != 0 and not (work / "provisioned").exists(), (step, failed.stdout + failed.stderr)

    # An external S3: a pre-install hook with a bounded wait, and no admin rights on someone else's S3.
    external = one(render(EXTERNAL_S3), "Job", "p2r-create-bucket")
    hook = external["spec"]["template"]["spec"]["containers"][0]
    script = hook["args"][0]
    env = {e["name"]: e for e in hook["env"]}
    assert env["P2R_WAIT_SECONDS"]["value"] == "240" and 'deadline=$(( $(date +%s) + P2R_WAIT_SECONDS ))' in script
    assert "exit 1" in script and "Secret s3-admin" in script
    assert external["spec"]["activeDeadlineSeconds"] == 360 and external["spec"]["backoffLimit"] <= 2
    assert "mc admin" not in script
    assert "mc admin" not in one(rendered["external-s3"], "Job", "p2r-create-bucket")["spec"]["template"]["spec"][
        "containers"][0]["args"][0]


def test_priority_classes_exist_for_gpu_production(rendered: dict[str, list[dict[str, Any]]]) -> None:
    docs = rendered["gpu-production"]
    classes = {p["metadata"]["name"]: p for p in find(docs, "PriorityClass")}
    used = {spec["priorityClassName"] for _, spec in pod_specs(docs) if spec.get("priorityClassName")}
    assert used and used <= set(classes)
    assert classes["p2r-serving"]["value"] > classes["p2r-training"]["value"]
    assert not find(rendered["default"], "PriorityClass")


# Gateway API v1 (gateway.networking.k8s.io) GRPCRoute / HTTPRoute: the fields the chart emits,
# transcribed from the Gateway API reference and closed to unknown keys (no CRD is installed here).
_PARENT = {"type": "object", "additionalProperties": False, "required": ["name"], "properties": {
    "group": {"type": "string"}, "kind": {"type": "string"}, "namespace": {"type": "string"},
    "name": {"type": "string"}, "sectionName": {"type": "string"}, "port": {"type": "integer"}}}
_BACKEND = {"type": "object", "additionalProperties": False, "required": ["name"], "properties": {
    "group": {"type": "string"}, "kind": {"type": "string"}, "name": {"type": "string"},
    "namespace": {"type": "string"}, "port": {"type": "integer", "minimum": 1, "maximum": 65535},
    "weight": {"type": "integer"}}}


_DURATION_GW = {"type": "string", "pattern": "^([0-9]{1,5}(h|m|s|ms)){1,4}$"}
# HTTPRouteRule.timeouts (HTTPRouteTimeouts, standard channel since v1.2); GRPCRouteRule has none.
_HTTP_TIMEOUTS = {"timeouts": {"type": "object", "additionalProperties": False, "properties": {
    "request": _DURATION_GW, "backendRequest": _DURATION_GW}}}


def _route_schema(kind: str, match: dict[str, Any], rule: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"type": "object", "additionalProperties": False, "required": ["apiVersion", "kind", "metadata", "spec"],
            "properties": {
                "apiVersion": {"const": "gateway.networking.k8s.io/v1"}, "kind": {"const": kind},
                "metadata": {"type": "object", "required": ["name"]},
                "spec": {"type": "object", "additionalProperties": False, "properties": {
                    "parentRefs": {"type": "array", "items": _PARENT}, "hostnames": {"type": "array"},
                    "rules": {"type": "array", "items": {"type": "object", "additionalProperties": False,
                                                         "properties": {
                        "matches": {"type": "array", "items": match}, **(rule or {}),
                        "backendRefs": {"type": "array", "items": _BACKEND}}}}}}}}


ROUTE_SCHEMAS = {
    "GRPCRoute": _route_schema("GRPCRoute", {"type": "object", "additionalProperties": False, "properties": {
        "method": {"type": "object", "additionalProperties": False, "properties": {
            "type": {"enum": ["Exact", "RegularExpression"]}, "service": {"type": "string"},
            "method": {"type": "string"}}}, "headers": {"type": "array"}}}),
    "HTTPRoute": _route_schema("HTTPRoute", {"type": "object", "additionalProperties": False, "properties": {
        "path": {"type": "object", "additionalProperties": False, "properties": {
            "type": {"enum": ["Exact", "PathPrefix", "RegularExpression"]}, "value": {"type": "string"}}},
        "headers": {"type": "array"}, "method": {"type": "string"}}}, _HTTP_TIMEOUTS),
}


def test_exposure_and_network_policy_agree() -> None:
    """Ingress, Gateway API routes and LoadBalancer: each validates, and the gateway's
    NetworkPolicy admits exactly what that exposure needs."""
    import jsonschema

    def gateway_from(docs: list[dict[str, Any]]) -> Any:
        rule = one(docs, "NetworkPolicy", "p2r-gateway")["spec"]["ingress"][0]
        return rule.get("from")

    test_pod = {"podSelector": {"matchLabels": {"app.kubernetes.io/name": "p2r", "app.kubernetes.io/instance": "p2r",
                                                "app.kubernetes.io/component": "test"}}}
    ingress = render({"ingress": {"enabled": True, "grpc": {"enabled": True}}, "networkPolicy": {"enabled": True}})
    http, grpc_ing = one(ingress, "Ingress", "p2r-gateway"), one(ingress, "Ingress", "p2r-gateway-grpc")
    assert not errors_of(http) and not errors_of(grpc_ing)
    assert http["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"] == {"name": "p2r-gateway",
                                                                                  "port": {"name": "http"}}
    assert grpc_ing["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]["port"] == {"name": "grpc"}
    assert gateway_from(ingress) == [*merged_values({})["ingress"]["from"], test_pod]

    peers = [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "gateway-system"}}}]
    api = render({"gatewayAPI": {"enabled": True, "parentRefs": [{"name": "shared", "namespace": "gateway-system"}],
                                 "hostnames": ["p2r.example.com"], "from": peers},
                  "networkPolicy": {"enabled": True}})
    for kind in ("GRPCRoute", "HTTPRoute"):
        route = one(api, kind, "p2r-gateway")
        assert not list(jsonschema.Draft7Validator(ROUTE_SCHEMAS[kind]).iter_errors(route)), kind
        assert route["spec"]["rules"][0]["backendRefs"][0]["name"] == "p2r-gateway"
    assert one(api, "GRPCRoute", "p2r-gateway")["spec"]["rules"][0]["backendRefs"][0]["port"] == 50051
    bad = one(api, "GRPCRoute", "p2r-gateway")
    bad["spec"]["rules"][0]["backendRef"] = []
    assert list(jsonschema.Draft7Validator(ROUTE_SCHEMAS["GRPCRoute"]).iter_errors(bad))  # the schema is closed
    assert gateway_from(api) == [*peers, test_pod]

    lb = render({"roles": {"gateway": {"service": {"type": "LoadBalancer"}}}, "ingress": {"enabled": True},
                 "networkPolicy": {"enabled": True}})
    assert gateway_from(lb) is None  # load-balancer traffic comes from outside the cluster: any source


def test_topology_spread_follows_the_release_name() -> None:
    """A constraint without labelSelector gets the role's own selector, for any release name."""
    import helm_python

    values = PROFILES["gpu-production"]
    rendered_other = helm_python.Chart.load(str(CHART)).render(values, name="team-a", namespace="ml", is_install=True)
    docs = [d for text in rendered_other.values() if not text.startswith("P2R") for d in yaml.safe_load_all(text) if d]
    spec = one(docs, "Deployment", "team-a-p2r-reasoner")["spec"]["template"]["spec"]
    constraint = spec["topologySpreadConstraints"][0]
    assert constraint["topologyKey"] == "topology.kubernetes.io/zone"
    assert constraint["labelSelector"]["matchLabels"] == {"app.kubernetes.io/name": "p2r",
                                                          "app.kubernetes.io/instance": "team-a",
                                                          "app.kubernetes.io/component": "reasoner"}
    assert "p2r" not in str(values.get("roleDefaults", {}).get("topologySpreadConstraints"))


def test_helm_conventions() -> None:
    """extraVolumes / extraVolumeMounts, envFrom, controller podAnnotations and probes,
    image.digest, global.imageRegistry on every image, imagePullSecrets on every pod,
    commonLabels, extraObjects."""
    digest = "sha256:" + "a" * 64
    docs = render({
        "global": {"imageRegistry": "mirror.corp:5000"}, "image": {"digest": digest},
        "imagePullSecrets": [{"name": "regcred"}], "commonLabels": {"team": "vision"},
        "roleDefaults": {"extraVolumes": [{"name": "ca", "secret": {"secretName": "ca"}}],
                         "extraVolumeMounts": [{"name": "ca", "mountPath": "/etc/ca", "readOnly": True}],
                         "envFrom": [{"configMapRef": {"name": "env"}}]},
        "controller": {"enabled": True, "podAnnotations": {"owner": "ml"}},
        "extraObjects": [{"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "extra"}},
                         "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: '{{ .Release.Name }}-extra2'"],
    })
    assert find(docs, "ConfigMap", "extra") and find(docs, "ConfigMap", "p2r-extra2")
    for d in docs:
        if d["metadata"]["name"] not in ("extra", "p2r-extra2"):
            assert d["metadata"]["labels"]["team"] == "vision", d["metadata"]["name"]
    for name, spec in all_pod_specs(docs):
        assert spec["imagePullSecrets"] == [{"name": "regcred"}], name
        for c in containers(spec):
            assert c["image"].startswith("mirror.corp:5000/"), (name, c["image"])
            if "p2r-gpu" in c["image"]:
                assert c["image"] == f"mirror.corp:5000/p2r-platform/p2r-gpu@{digest}"
    reasoner = one(docs, "Deployment", "p2r-reasoner")["spec"]["template"]["spec"]
    assert {"name": "ca", "secret": {"secretName": "ca"}} in reasoner["volumes"]
    assert reasoner["containers"][0]["envFrom"] == [{"configMapRef": {"name": "env"}}]
    assert {"name": "ca", "mountPath": "/etc/ca", "readOnly": True} in reasoner["containers"][0]["volumeMounts"]
    controller = one(docs, "Deployment", "p2r-controller")["spec"]["template"]
    assert controller["metadata"]["annotations"]["owner"] == "ml"
    c = controller["spec"]["containers"][0]
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert c[probe]["httpGet"] == {"path": "/metrics", "port": "metrics"}, probe
    assert all(not errors_of(d) for d in docs if d["kind"] in ("Deployment", "StatefulSet", "Job", "Pod"))


def test_helm_test_pod(rendered: dict[str, list[dict[str, Any]]]) -> None:
    """`helm test`: gateway health (gRPC p2r.v1.P2R and HTTP /readyz), then one P2R.Answer, as
    a restricted pod that validates strictly."""
    for profile in PROFILES:
        pod = one(rendered[profile], "Pod", "p2r-test-gateway")
        assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
        assert not errors_of(pod)
        spec = pod["spec"]
        assert spec["automountServiceAccountToken"] is False and spec["securityContext"]["runAsNonRoot"] is True
        for c in containers(spec):
            assert c["securityContext"]["readOnlyRootFilesystem"] is True
            assert c["securityContext"]["capabilities"]["drop"] == ["ALL"]
        health, image = spec["initContainers"]
        assert 'service="p2r.v1.P2R"' in health["args"][0]
        assert health["args"][1:] == ["p2r-gateway.p2r.svc.cluster.local:50051",
                                      "http://p2r-gateway.p2r.svc.cluster.local:8080/readyz"]
        answer = spec["containers"][0]
        assert answer["args"][:3] == ["ask", "--target", "p2r-gateway.p2r.svc.cluster.local:50051"]
        assert answer["args"][4].startswith(image["args"][3] + "/images/")  # the image the synth step wrote
    # Under TLS (security.tls) the test trusts the release's CA, presents its certificate for mTLS,
    # asks HTTPS, and sends tests.apiKeySecret's key: what every P2R client reads (P2R_CLIENT_*).
    if "security" not in merged_values({}):
        return
    secure = render({"security": {"tls": {"secretName": "p2r-tls", "requireClientCert": True}},
                     "tests": {"apiKeySecret": {"name": "test-key", "key": "key"}}})
    pod = one(secure, "Pod", "p2r-test-gateway")
    assert not errors_of(pod) and not plaintext_credentials(secure)
    assert {"name": "tls", "secret": {"secretName": "p2r-tls", "defaultMode": 0o440}} in pod["spec"]["volumes"]
    for c in containers(pod["spec"]):
        env = {e["name"]: e for e in c["env"]}
        assert env["P2R_CLIENT_CA_FILE"]["value"] == "/etc/p2r/tls/ca.crt" and "P2R_CLIENT_CERT_FILE" in env
        assert env["P2R_CLIENT_API_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "test-key", "key": "key"}
        assert {"name": "tls", "mountPath": "/etc/p2r/tls", "readOnly": True} in c["volumeMounts"]
    assert pod["spec"]["initContainers"][0]["args"][2].startswith("https://")


def test_readme_cpu_smoke_creates_the_namespace() -> None:
    readme = (CHART.parent.parent / "README.md").read_text()
    installs = [line for line in readme.splitlines() if "helm install" in line and "cpu-smoke" in line]
    assert installs and all("--create-namespace" in line for line in installs)


def test_seed_hook_runs_for_real_on_loopback(s3_server: dict[str, str], tmp_path: Path) -> None:
    """cpu-smoke's bootstrap, run for real: each container of the rendered seed Job runs in order
    as it would in its pod (its command, args and literal env; /cache and /tmp temporary
    directories here; the Service p2r-minio resolved to a real S3-protocol server on loopback).
    Its first step waits for the bucket (bounded here, it fails while there is none; MinIO's
    provision container makes it), then the tiny model and the synthetic set land where the
    controller reads them, and a role server's download path (resolve_checkpoint) fetches the
    model the controller starts from."""
    import os
    import subprocess
    import sys

    from minio import Minio

    from p2r.services.checkpoints import resolve_checkpoint

    docs = render(PROFILES["cpu-smoke"])
    job = _seed_job(docs)["spec"]["template"]["spec"]
    values = merged_values(PROFILES["cpu-smoke"])
    uri = values["controller"]["config"]["base_model"]
    data = values["controller"]["config"]["data"]
    bucket = uri.removeprefix("s3://").split("/")[0]
    dirs = {"/cache": tmp_path / "cache", "/tmp": tmp_path / "tmp"}  # the pod's emptyDir volumes
    for d in dirs.values():
        d.mkdir()

    def local(text: str) -> str:
        for pod_path, here in dirs.items():
            if text == pod_path or text.startswith(pod_path + "/"):
                return str(here) + text[len(pod_path):]
        return text

    def run(c: dict[str, Any], extra: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
        assert {m["mountPath"] for m in c["volumeMounts"]} >= set(dirs), c["name"]
        assert c["command"] == ["p2r"]
        env = {e["name"]: local(e["value"]) for e in c["env"] if "value" in e}
        assert env.pop("P2R_S3_ENDPOINT") == "p2r-minio:9000"
        for key in ("HOME", "TMPDIR", "HF_HOME"):  # writable: on the pod's volumes (read-only root)
            assert env[key].startswith(str(tmp_path)), (c["name"], key, env[key])
        for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):  # the admin Secret's keys
            ref = next(e for e in c["env"] if e["name"] == key)["valueFrom"]["secretKeyRef"]
            assert ref["name"] == "p2r-s3", (c["name"], ref)
        argv = [local(a) for a in c["args"]] + list(extra)
        return subprocess.run([sys.executable, "-m", "p2r.cli", *argv], capture_output=True, text=True, timeout=600,
                              env={**os.environ, **env, **s3_server})

    steps = containers(job)
    wait = steps[0]
    assert wait["args"] == ["models", "wait", f"s3://{bucket}"]
    early = run(wait, ("--timeout-s", "1", "--poll-s", "0.2"))  # no bucket yet: it waits, then gives up
    assert early.returncode == 1 and f"no bucket {bucket} yet" in early.stderr, early.stdout + early.stderr
    Minio(s3_server["P2R_S3_ENDPOINT"], access_key=s3_server["AWS_ACCESS_KEY_ID"],
          secret_key=s3_server["AWS_SECRET_ACCESS_KEY"], secure=False).make_bucket(bucket)  # MinIO's provision
    for c in steps:
        out = run(c)
        assert out.returncode == 0, (c["name"], out.stdout + out.stderr)
    client = Minio(s3_server["P2R_S3_ENDPOINT"], access_key=s3_server["AWS_ACCESS_KEY_ID"],
                   secret_key=s3_server["AWS_SECRET_ACCESS_KEY"], secure=False)
    data_key = data.removeprefix(f"s3://{bucket}/")
    names = {o.object_name for o in client.list_objects(bucket, prefix=data_key.rsplit("/", 1)[0] + "/",
                                                        recursive=True)}
    assert {data_key, data_key.rsplit("/", 1)[0] + "/manifest.json"} <= names, names  # the controller's data
    env_backup = dict(os.environ)
    try:
        os.environ.update({**s3_server, "P2R_S3_SECURE": "false"})
        path = resolve_checkpoint(uri, tmp_path / "role-cache")
    finally:
        os.environ.clear()
        os.environ.update(env_backup)
    assert (path / "config.json").is_file() and (path / "manifest.json").is_file()


def test_hook_wait_has_a_deadline(tmp_path: Path) -> None:
    """The external S3's bucket hook script, run by a real /bin/sh against an endpoint that never
    accepts the credentials (here: no client can reach it), stops after P2R_WAIT_SECONDS with
    exit 1 and a line naming the endpoint and the Secret, instead of waiting forever; the Job's
    activeDeadlineSeconds lies beyond that wait, so the script's own message is what users see.
    The seed Job's wait for the bucket is bounded by its activeDeadlineSeconds."""
    import shutil
    import subprocess

    docs = render(EXTERNAL_S3)
    job = one(docs, "Job", "p2r-create-bucket")
    c = job["spec"]["template"]["spec"]["containers"][0]
    wait_s = int(next(e["value"] for e in c["env"] if e["name"] == "P2R_WAIT_SECONDS"))
    assert job["spec"]["activeDeadlineSeconds"] > wait_s
    assert c["command"] == ["/bin/sh", "-ec"]
    script = c["args"][0].replace("/tmp/", f"{tmp_path}/")
    bin_dir = tmp_path / "bin"  # sh, date and sleep only: `mc alias set` fails like a refused login
    bin_dir.mkdir()
    for tool in ("date", "sleep", "cat"):
        (bin_dir / tool).symlink_to(shutil.which(tool) or f"/bin/{tool}")
    env = {"PATH": str(bin_dir), "P2R_WAIT_SECONDS": "1", "P2R_S3_ENDPOINT": "127.0.0.1:9", "P2R_S3_SECURE": "false",
           "AWS_ACCESS_KEY_ID": "wrong", "AWS_SECRET_ACCESS_KEY": "wrong", "P2R_S3_BUCKET": "p2r"}
    out = subprocess.run(["/bin/sh", "-ec", script], capture_output=True, text=True, timeout=120,
                         env={**env, "HOME": str(tmp_path)}, cwd=tmp_path)
    assert out.returncode == 1, out.stdout + out.stderr
    assert "127.0.0.1:9 did not accept the credentials of Secret s3-admin within 1s" in out.stderr
    seed = _seed_job(render({**EXTERNAL_S3, "models": {"seed": {"enabled": True, "models": [
        {"source": "tiny", "name": "tiny"}]}}}))
    assert seed["spec"]["activeDeadlineSeconds"] > 0 and seed["spec"]["backoffLimit"] <= 2


@pytest.mark.engine
def test_helm_test_pod_passes_against_a_real_gateway(role_server: Any, tmp_path: Path) -> None:
    """The `helm test` pod's steps, run as its containers would (the Service name resolved to the
    session's real gateway on loopback, /tmp a temporary directory): gRPC health SERVING and
    HTTP /readyz, a synthetic image, and one P2R.Answer printed as JSON."""
    import json
    import os
    import subprocess
    import sys

    spec = one(render(PROFILES["cpu-smoke"]), "Pod", "p2r-test-gateway")["spec"]
    grpc_target = "p2r-gateway.p2r.svc.cluster.local:50051"
    http_base = "http://p2r-gateway.p2r.svc.cluster.local:8080"

    def local(arg: str) -> str:
        return (arg.replace(http_base, f"http://127.0.0.1:{role_server.http_port}")
                .replace(grpc_target, role_server.target).replace("/tmp", str(tmp_path)))

    outputs = []
    for c in containers(spec):
        argv = [local(a) for a in [*c["command"], *c.get("args", [])]]
        if argv[0] == "p2r":
            argv = [sys.executable, "-m", "p2r.cli", *argv[1:]]
        elif argv[0] == "python":
            argv[0] = sys.executable
        out = subprocess.run(argv, capture_output=True, text=True, timeout=600, cwd=tmp_path,
                             env={**os.environ, "HOME": str(tmp_path)})
        assert out.returncode == 0, (c["name"], out.stdout + out.stderr)
        outputs.append(out.stdout)
    assert "SERVING" in outputs[0] and "HTTP 200" in outputs[0]
    answer = json.loads(outputs[-1])  # the P2R.Answer response: both stages ran
    assert {"perceiver_output", "finish_reason"} <= set(answer), sorted(answer)

"""An in-memory Kubernetes API server for the controller tests (kmock's KubernetesEmulator over
HTTP, on its own event loop in a thread, since the controller under test is a blocking client),
plus the parts of a cluster the tests play themselves: the Deployment controller (readiness), the
training operator (PyTorchJob conditions) and the Job controller (eval Job conditions).

The emulator stores what the controller sends and enforces no schema; every PyTorchJob is
therefore checked with ``validate_pytorchjob`` (the manifest tests' validator).
"""

from __future__ import annotations

import asyncio
import copy
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent

PYTORCHJOBS = "kubeflow.org/v1/pytorchjobs"
RESOURCES = {
    PYTORCHJOBS: {"kind": "PyTorchJob", "namespaced": True, "verbs": ["create", "get", "list", "delete"]},
    "apps/v1/deployments": {"kind": "Deployment", "namespaced": True},
    "v1/configmaps": {"kind": "ConfigMap", "namespaced": True},
    "batch/v1/jobs": {"kind": "Job", "namespaced": True},
    "v1/events": {"kind": "Event", "namespaced": True},
    "v1/persistentvolumeclaims": {"kind": "PersistentVolumeClaim", "namespaced": True},
    "v1/pods": {"kind": "Pod", "namespaced": True},
    "v1/services": {"kind": "Service", "namespaced": True},
}
HELM_LABELS = {"app.kubernetes.io/managed-by": "Helm", "helm.sh/chart": "p2r-0.1.0"}
"""What Helm puts on the objects of a release (the chart's role Deployments here)."""


class Emulated:
    """A running emulator: its URL, and ``install`` for an API the test adds later (a CRD)."""

    def __init__(self, url: str, loop: asyncio.AbstractEventLoop, km: Any) -> None:
        self.url, self._loop, self._km = url, loop, km

    def requests(self) -> list[dict[str, Any]]:
        """Every request the emulator received so far: method, path, Kubernetes action,
        resource (group/version/plural), namespace, name and body."""
        done = threading.Event()
        out: list[dict[str, Any]] = []

        def read() -> None:
            for r in list(self._km._requests):
                resource = r.resource
                out.append({"method": str(r.method.value if r.method is not None else ""),
                            "path": str(r.url.path), "action": str(r.action.value if r.action is not None else ""),
                            "resource": None if resource is None else
                            "/".join(x for x in (resource.group, resource.version, resource.plural) if x),
                            "namespace": r.namespace, "name": r.name, "data": copy.deepcopy(r.data),
                            "user_agent": dict(r.headers).get("User-Agent", "")})
            done.set()

        self._loop.call_soon_threadsafe(read)
        assert done.wait(10), "the emulator did not answer"
        return out

    def install(self, resource: str) -> None:
        done = threading.Event()

        def add() -> None:
            self._km.resources[resource] = RESOURCES[resource]
            done.set()

        self._loop.call_soon_threadsafe(add)
        assert done.wait(10), "the emulator did not take the resource"


@contextmanager
def emulator(without: tuple[str, ...] = ()) -> Iterator[Emulated]:
    """Run a KubernetesEmulator serving RESOURCES except ``without`` (e.g. no PyTorchJob CRD yet)."""
    from kmock._internal import apps, k8s

    holder: dict[str, Any] = {}
    stop = threading.Event()

    async def main() -> None:
        async with k8s.KubernetesEmulator() as km, apps.Server(km) as server:
            for resource, info in RESOURCES.items():
                if resource not in without:
                    km.resources[resource] = info
            holder["emulated"] = Emulated(str(server.url).rstrip("/"), asyncio.get_running_loop(), km)
            while not stop.is_set():
                await asyncio.sleep(0.05)

    thread = threading.Thread(target=lambda: asyncio.run(main()), daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while "emulated" not in holder:
        assert thread.is_alive() and time.monotonic() < deadline, "emulator did not start"
        time.sleep(0.05)
    try:
        yield holder["emulated"]
    finally:
        stop.set()
        thread.join(10)


def write_kubeconfig(path: Path, url: str) -> Path:
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "test",
        "clusters": [{"name": "test", "cluster": {"server": url}}],
        "users": [{"name": "test", "user": {}}],
        "contexts": [{"name": "test", "context": {"cluster": "test", "user": "test"}}],
    }))
    return path


def validate_pytorchjob(obj: dict[str, Any]) -> None:
    """Fail unless ``obj`` is a valid PyTorchJob whose pods meet the release's security: the
    validators and assertions the manifest and chart tests use too, on every supported
    Kubernetes version."""
    validate_created(obj)


def validate_created(obj: dict[str, Any]) -> None:
    """Strict validation of an object the controller created (a PyTorchJob against the
    Kubeflow schema and webhook rules, a Job with ``kubernetes-validate --strict``) plus the
    shared pod security assertions (``tests/k8s_support.pod_security_errors``)."""
    from tests.k8s_support import KUBE_VERSIONS, pod_security_errors, pod_specs, validation_errors

    obj = {k: v for k, v in obj.items() if k != "status"}  # what the controller sent, not the test's status
    errors = [f"{v}: {e}" for v in KUBE_VERSIONS for e in validation_errors(obj, v)]
    for name, spec in pod_specs([obj]):
        errors += pod_security_errors(name, spec)
        if spec.get("automountServiceAccountToken") is not False:
            errors.append(f"{name}: mounts an API token (automountServiceAccountToken is not false)")
    assert not errors, "\n".join(errors)


# --------------------------------------------------------------------------------- cluster


class Cluster:
    """The test's view of the emulated cluster, through the official client."""

    def __init__(self, url: str, namespace: str) -> None:
        from kubernetes import client

        cfg = client.Configuration()
        cfg.host = url
        self.api = client.ApiClient(cfg)
        self.core = client.CoreV1Api(self.api)
        self.apps = client.AppsV1Api(self.api)
        self.batch = client.BatchV1Api(self.api)
        self.custom = client.CustomObjectsApi(self.api)
        self.ns = namespace

    def create_deployment(self, name: str, role: str, admin_port: int = 50052, replicas: int = 1) -> None:
        """A chart-like role Deployment (Helm's labels, the release's selector labels, the
        server's grpc / metrics / admin ports) whose pods are not ready yet."""
        select = {"app.kubernetes.io/name": "p2r", "app.kubernetes.io/instance": "p2r",
                  "app.kubernetes.io/component": role}
        self.apps.create_namespaced_deployment(self.ns, {
            "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {
                "name": name, "namespace": self.ns, "generation": 1,
                "labels": {**select, "app.kubernetes.io/part-of": "p2r", **HELM_LABELS},
                "annotations": {"meta.helm.sh/release-name": "p2r"}},
            "spec": {"replicas": replicas, "selector": {"matchLabels": select},
                     "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 0, "maxUnavailable": 1}},
                     "template": {
                         "metadata": {"labels": {**select, "app.kubernetes.io/part-of": "p2r", **HELM_LABELS}},
                         "spec": {"containers": [
                             {"name": "serve", "image": "p2r-platform:test", "args": ["serve", role],
                              "ports": [{"name": "grpc", "containerPort": 50051, "protocol": "TCP"},
                                        {"name": "metrics", "containerPort": 9400, "protocol": "TCP"},
                                        {"name": "admin", "containerPort": admin_port, "protocol": "TCP"}],
                              "env": [{"name": "P2R_LIMITS__MAX_MODEL_LEN", "value": "8192"}]},
                             {"name": "sidecar", "image": "busybox"}]}}},
            "status": {"replicas": replicas, "readyReplicas": 0, "updatedReplicas": 0, "availableReplicas": 0},
        })

    def deployments(self) -> list[dict[str, Any]]:
        import json

        return json.loads(self.apps.list_namespaced_deployment(self.ns, _preload_content=False).data)["items"]  # type: ignore[no-any-return]

    def services(self) -> list[dict[str, Any]]:
        import json

        return json.loads(self.core.list_namespaced_service(self.ns, _preload_content=False).data)["items"]  # type: ignore[no-any-return]

    def run_pods(self, name: str, ip: str = "10.0.0.1", ready: bool = True) -> list[str]:
        """Play the Deployment controller and the kubelet for Deployment ``name``: one pod per
        replica from its template (labels, spec), Running and Ready at ``ip``, and the
        Deployment's status complete. Returns the pod names."""
        dep = self.deployment(name)
        replicas = dep["spec"].get("replicas") or 1
        names = []
        for i in range(replicas):
            pod_name = f"{name}-{i}"
            self.core.create_namespaced_pod(self.ns, {
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": pod_name, "namespace": self.ns,
                             "labels": dict(dep["spec"]["template"]["metadata"]["labels"])},
                "spec": copy.deepcopy(dep["spec"]["template"]["spec"]),
                "status": {"phase": "Running", "podIP": ip,
                           "conditions": [{"type": "Ready", "status": "True" if ready else "False"}]}})
            names.append(pod_name)
        self.apps.patch_namespaced_deployment_status(name, self.ns, {"status": {
            "replicas": replicas, "readyReplicas": replicas, "updatedReplicas": replicas,
            "availableReplicas": replicas}})
        return names

    def create_pvc(self, name: str) -> None:
        self.core.create_namespaced_persistent_volume_claim(self.ns, {
            "apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": name, "namespace": self.ns},
            "spec": {"accessModes": ["ReadOnlyMany"], "resources": {"requests": {"storage": "1Gi"}}}})

    def create_owner(self, name: str, uid: str) -> None:
        """The chart's pipeline ConfigMap; the API server would assign the uid, the emulator does not."""
        self.core.create_namespaced_config_map(self.ns, {
            "apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name, "namespace": self.ns, "uid": uid},
            "data": {"pipeline.yaml": "{}"}})

    def events(self) -> list[dict[str, Any]]:
        """The Events as stored (raw JSON, as ``jobs``)."""
        import json

        return json.loads(self.core.list_namespaced_event(self.ns, _preload_content=False).data)["items"]  # type: ignore[no-any-return]

    def config_maps(self) -> list[dict[str, Any]]:
        import json

        return json.loads(self.core.list_namespaced_config_map(self.ns, _preload_content=False).data)["items"]  # type: ignore[no-any-return]

    def deployment(self, name: str) -> dict[str, Any]:
        return self.api.sanitize_for_serialization(self.apps.read_namespaced_deployment(name, self.ns))

    @staticmethod
    def model_env(dep: dict[str, Any]) -> str | None:
        server = next(c for c in dep["spec"]["template"]["spec"]["containers"] if c["name"] == "serve")
        return next((e["value"] for e in server.get("env") or [] if e["name"] == "P2R_MODEL"), None)

    def set_ready(self, name: str, ready: bool = True) -> None:
        n = 1 if ready else 0
        self.apps.patch_namespaced_deployment_status(name, self.ns, {"status": {
            "replicas": 1, "readyReplicas": n, "updatedReplicas": n, "availableReplicas": n}})

    def pytorchjobs(self) -> list[dict[str, Any]]:
        return self.custom.list_namespaced_custom_object("kubeflow.org", "v1", self.ns, "pytorchjobs")["items"]

    def pytorchjob(self, name: str) -> dict[str, Any]:
        return self.custom.get_namespaced_custom_object("kubeflow.org", "v1", self.ns, "pytorchjobs", name)

    def set_pytorchjob_condition(self, name: str, kind: str, reason: str = "", message: str = "") -> None:
        conditions = [{"type": "Created", "status": "True", "reason": "PyTorchJobCreated"},
                      {"type": "Running", "status": "False" if kind in ("Succeeded", "Failed") else "True"}]
        if kind in ("Succeeded", "Failed"):
            conditions.append({"type": kind, "status": "True", "reason": reason or f"PyTorchJob{kind}",
                               "message": message or f"PyTorchJob {name} {kind.lower()}"})
        self.custom.patch_namespaced_custom_object_status("kubeflow.org", "v1", self.ns, "pytorchjobs", name,
                                                          {"status": {"conditions": conditions}})

    def jobs(self) -> list[dict[str, Any]]:
        """The Jobs as stored (raw JSON: a typed model would drop a misspelt field unseen)."""
        import json

        response = self.batch.list_namespaced_job(self.ns, _preload_content=False)
        return json.loads(response.data)["items"]  # type: ignore[no-any-return]

    def set_job_condition(self, name: str, kind: str, message: str = "") -> None:
        status: dict[str, Any] = {"conditions": [{"type": kind, "status": "True", "message": message or kind}]}
        status["succeeded" if kind == "Complete" else "failed"] = 1
        self.batch.patch_namespaced_job_status(name, self.ns, {"status": status})

    def config_map(self, name: str) -> dict[str, str] | None:
        from kubernetes.client.exceptions import ApiException

        try:
            return self.core.read_namespaced_config_map(name, self.ns).data or {}
        except ApiException as e:
            if e.status == 404:
                return None
            raise

    def raw_config_map(self, name: str) -> dict[str, Any]:
        return self.api.sanitize_for_serialization(self.core.read_namespaced_config_map(name, self.ns))

    def everything(self) -> str:
        """Every stored object as text (to look for leaked credentials)."""
        parts = [self.pytorchjobs(), self.jobs(),
                 [self.api.sanitize_for_serialization(c) for c in self.core.list_namespaced_config_map(self.ns).items],
                 [self.api.sanitize_for_serialization(d) for d in self.apps.list_namespaced_deployment(self.ns).items]]
        return yaml.safe_dump(copy.deepcopy(parts))


def wait_for(what: str, probe: Callable[[], Any], timeout: float = 60, alive: Callable[[], bool] | None = None) -> Any:
    """Poll ``probe`` until it returns something truthy."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if alive is not None and not alive():
            raise AssertionError(f"the controller exited while waiting for {what}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)

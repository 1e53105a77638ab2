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

RESOURCES = {
    "kubeflow.org/v1/pytorchjobs": {"kind": "PyTorchJob", "namespaced": True},
    "apps/v1/deployments": {"kind": "Deployment", "namespaced": True},
    "v1/configmaps": {"kind": "ConfigMap", "namespaced": True},
    "batch/v1/jobs": {"kind": "Job", "namespaced": True},
}


@contextmanager
def emulator() -> Iterator[str]:
    """Run a KubernetesEmulator; yields its URL."""
    from kmock._internal import apps, k8s

    holder: dict[str, Any] = {}
    stop = threading.Event()

    async def main() -> None:
        async with k8s.KubernetesEmulator() as km, apps.Server(km) as server:
            for resource, info in RESOURCES.items():
                km.resources[resource] = info
            holder["url"] = str(server.url).rstrip("/")
            while not stop.is_set():
                await asyncio.sleep(0.05)

    thread = threading.Thread(target=lambda: asyncio.run(main()), daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while "url" not in holder:
        assert thread.is_alive() and time.monotonic() < deadline, "emulator did not start"
        time.sleep(0.05)
    try:
        yield holder["url"]
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
    """Fail unless ``obj`` is a valid PyTorchJob: the one validator the manifest tests use too."""
    from tests.k8s_support import pytorchjob_errors

    errors = pytorchjob_errors(obj)
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

    def create_deployment(self, name: str, role: str) -> None:
        """A chart-like role Deployment whose pods are not ready yet."""
        self.apps.create_namespaced_deployment(self.ns, {
            "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": name, "namespace": self.ns},
            "spec": {"replicas": 1, "selector": {"matchLabels": {"app": name}}, "template": {
                "metadata": {"labels": {"app": name}},
                "spec": {"containers": [
                    {"name": "serve", "image": "p2r-platform:test", "args": ["serve", role],
                     "env": [{"name": "P2R_LIMITS__MAX_MODEL_LEN", "value": "8192"}]},
                    {"name": "sidecar", "image": "busybox"}]}}},
            "status": {"replicas": 1, "readyReplicas": 0, "updatedReplicas": 0, "availableReplicas": 0},
        })

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
        return [self.api.sanitize_for_serialization(j) for j in self.batch.list_namespaced_job(self.ns).items]

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

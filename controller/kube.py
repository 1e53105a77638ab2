"""The Kubernetes backend: the same step graph as Kubernetes objects.

- Services: a run never writes the chart's role Deployments (Helm and Argo CD own them). Each
  role a step needs is served by the run's own Deployment ``RUN-ROLE`` and headless Service,
  created from the chart Deployment's pod template (read only: the chart renders the one
  template), started on the step's model, owned by ``kubernetes.owner_config_map`` and deleted
  when no later step needs it and when the run ends. Only the roles ``kubernetes.serving_roles``
  names use the chart's Deployment itself. Either way every ready replica (the Deployment's
  pods, listed through the API, called at their pod IP) must serve the model: a pod started on
  it is taken as is, any other is loaded in place through ``Admin.LoadCheckpoint`` on its
  admin port (no restart) and must then report it; an error fails the step naming the pod.
  What each role serves is recorded in the run state (``services``) and the metric
  ``p2r_checkpoint_info{role,deployment,uri}``. The Services are the endpoints the trainer
  and eval pods call (``dns:///NAME.NAMESPACE.svc.CLUSTER_DOMAIN:PORT``, spread by the clients'
  ``round_robin``).
- Inputs: before anything is created the ``inputs`` step waits until the PyTorchJob CRD, the
  data claim and the models in object storage exist, reporting what is missing in the run state,
  as Kubernetes Events and in the log (``check_inputs``).
- Pods: every trainer and eval pod comes from the one pod template in ``controller/pods.py``
  (also the source of ``manifests/base``): restricted security context, read-only root with
  scratch volumes, no API token, placement and an optional Kueue queue from ``kubernetes.pod``.
- Ownership: with ``kubernetes.owner_config_map`` (the chart's pipeline ConfigMap) every object
  the controller creates carries an ownerReference to it, so ``helm uninstall`` makes the garbage
  collector delete the jobs, their pods and the run state. Every object is also labelled
  ``app.kubernetes.io/managed-by: p2r-pipeline`` and ``p2r.io/run: RUN`` for a label-based cleanup.
- Layout: a stage's PyTorchJob is ``kubernetes.workers`` pods (Master + Workers) of
  ``kubernetes.nproc_per_node`` processes each under torchrun (``spec.nprocPerNode``), one
  ``kubernetes.gpu_resource`` per process. The reference run is one pod with 4 GPUs, so FSDP's
  collectives stay on NVLink and shared memory; multi-node is N pods x G GPUs.
- Stages: one PyTorchJob per attempt, named ``RUN-STAGE-ATTEMPT``. The name is written to the
  state before the job is created, so a restarted controller re-attaches to the job instead of
  creating a second one. The trainer's YAML config is a ConfigMap mounted at ``/etc/p2r``; S3
  credentials come from a Secret (``secretKeyRef``), never from the config or the
  state. The operator's own restarts are off (``backoffLimit: 0``): retries are the controller's,
  counted and backed off in one place, and a retried stage continues from its newest complete
  checkpoint (``--resume auto``).
- Evaluation: a ``batch/v1`` Job ``RUN-eval-ATTEMPT`` running ``p2r eval``.
- State: the ConfigMap ``p2r-pipeline-RUN`` (key ``state.json``; ``cancel`` set by
  ``p2r pipeline cancel``).
"""

from __future__ import annotations

import copy
import datetime
import json
import logging
import os
import socket
import time
from collections.abc import Callable
from typing import Any

import yaml

from p2r.controller import metrics, pods
from p2r.controller.config import PipelineConfig
from p2r.controller.graph import Context, StepFailed
from p2r.controller.state import INTERRUPTED, now
from p2r.controller.storage import read_json
from p2r.services.checkpoints import MANIFEST

log = logging.getLogger("p2r.pipeline.kube")

MODEL_ENV = "P2R_MODEL"
MODEL_ANNOTATION = "p2r.io/model"
RUN_ROLE_LABEL = "p2r.io/role"
"""Label of a run's own role pods (their NetworkPolicy selects it)."""
SOURCE_ANNOTATION = "p2r.io/pod-template-from"
"""The chart Deployment whose pod template a run's role Deployment copies."""


class KubeError(ValueError):
    """The cluster cannot be reached or configured; one line for the user."""


def _labels(run: str, step: str, attempt: int | None = None, component: str | None = None) -> dict[str, str]:
    """Labels of everything the controller creates; pods also name their ``component`` (the
    chart's PodMonitor selects training pods by ``app.kubernetes.io/component: trainer``)."""
    labels = {"app.kubernetes.io/part-of": "p2r", "app.kubernetes.io/managed-by": "p2r-pipeline",
              "p2r.io/run": run, "p2r.io/step": step}
    if component is not None:
        labels["app.kubernetes.io/component"] = component
    if attempt is not None:
        labels["p2r.io/attempt"] = str(attempt)
    return labels


class ConfigMapStore:
    """The run state in a ConfigMap: survives the controller pod, readable with kubectl."""

    def __init__(self, core: Any, namespace: str, run: str, labels: dict[str, str] | None = None,
                 owner: Callable[[], dict[str, Any] | None] | None = None) -> None:
        self.core, self.namespace, self.run = core, namespace, run
        self.name = f"p2r-pipeline-{run}"
        self.labels = {**_labels(run, "state"), **(labels or {})}
        self.owner = owner

    def _read(self) -> dict[str, str] | None:
        from kubernetes.client.exceptions import ApiException

        try:
            return self.core.read_namespaced_config_map(self.name, self.namespace).data or {}
        except ApiException as e:
            if e.status == 404:
                return None
            raise

    def load(self) -> dict[str, Any] | None:
        data = self._read()
        return json.loads(data["state.json"]) if data and data.get("state.json") else None

    def _write(self, data: dict[str, str]) -> None:
        from kubernetes.client.exceptions import ApiException

        try:
            self.core.patch_namespaced_config_map(self.name, self.namespace, {"data": data})
        except ApiException as e:
            if e.status != 404:
                raise
            meta: dict[str, Any] = {"name": self.name, "namespace": self.namespace, "labels": self.labels}
            owner = self.owner() if self.owner else None
            if owner:
                meta["ownerReferences"] = [owner]
            self.core.create_namespaced_config_map(self.namespace, {"apiVersion": "v1", "kind": "ConfigMap",
                                                                    "metadata": meta, "data": data})

    def save(self, state: dict[str, Any]) -> None:
        state["updated"] = now()
        self._write({"state.json": json.dumps(state, indent=1)})

    def request_cancel(self) -> None:
        self._write({"cancel": str(now())})

    def cancel_requested(self) -> bool:
        data = self._read()
        return bool(data and data.get("cancel"))

    def clear_cancel(self) -> None:
        if self.cancel_requested():
            self._write({"cancel": ""})

    def describe(self) -> str:
        return f"ConfigMap {self.namespace}/{self.name}"


class KubeBackend:
    name = "kubernetes"

    def __init__(self, config: PipelineConfig) -> None:
        from kubernetes import client
        from kubernetes import config as kconfig
        from kubernetes.config.config_exception import ConfigException

        self.config = config
        self.k = config.kubernetes
        self.namespace = self.k.namespace
        api_config = client.Configuration()
        try:
            if self.k.kubeconfig:
                kconfig.load_kube_config(config_file=self.k.kubeconfig, context=self.k.context,
                                         client_configuration=api_config)
            elif os.environ.get("KUBERNETES_SERVICE_HOST"):
                kconfig.load_incluster_config(client_configuration=api_config)
            else:
                kconfig.load_kube_config(context=self.k.context, client_configuration=api_config)
        except (ConfigException, FileNotFoundError, OSError) as e:
            raise KubeError(f"kubernetes: cannot load the cluster config: {e}") from None
        self.api = client.ApiClient(api_config)
        self.core = client.CoreV1Api(self.api)
        self.apps = client.AppsV1Api(self.api)
        self.batch = client.BatchV1Api(self.api)
        self.custom = client.CustomObjectsApi(self.api)
        self._owner: dict[str, Any] | None = None

    def store(self) -> ConfigMapStore:
        return ConfigMapStore(self.core, self.namespace, self.config.name, self.k.pod.labels, self.owner)

    # ------------------------------------------------------------------------- services

    def _target(self, role: str) -> tuple[str, bool]:
        """(Deployment, owned by the run) serving ``role``: the chart's own where
        ``kubernetes.serving_roles`` names the role, else the run's ``RUN-ROLE``."""
        if role in self.k.serving_roles:
            return self.k.deployments[role], False
        return f"{self.config.name}-{role}", True

    def _endpoint(self, service: str) -> str:
        """The gRPC target trainer and eval pods call a role at: ``dns:///`` of its headless
        Service (named as the Deployment), fully qualified with the cluster domain. DNS then
        answers every ready pod and the clients' ``round_robin`` (services/client.py) spreads a
        stage's calls over all of them, pods a scale-up adds included once the servers'
        ``max_connection_age`` makes the channel re-resolve. Fully qualified, so it resolves
        without the pod's DNS search path."""
        return f"dns:///{service}.{self.namespace}.svc.{self.k.cluster_domain}:{self.k.grpc_port}"

    def _deployment(self, name: str, missing: str = "install the chart first") -> dict[str, Any]:
        from kubernetes.client.exceptions import ApiException

        try:
            return self.api.sanitize_for_serialization(self.apps.read_namespaced_deployment(name, self.namespace))
        except ApiException as e:
            if e.status == 404:
                raise StepFailed(f"Deployment {self.namespace}/{name} not found ({missing})") from None
            raise

    def _server_container(self, spec: dict[str, Any], what: str) -> dict[str, Any]:
        containers = spec["containers"]
        for c in containers:
            if c["name"] == self.k.server_container:
                return c  # type: ignore[no-any-return]
        if len(containers) == 1:
            return containers[0]  # type: ignore[no-any-return]
        raise StepFailed(f"{what}: no container named {self.k.server_container}")

    @staticmethod
    def _model_of(container: dict[str, Any]) -> str | None:
        return next((e.get("value") for e in container.get("env") or [] if e["name"] == MODEL_ENV), None)

    def run_deployment(self, role: str, model: str) -> tuple[dict[str, Any], dict[str, Any]]:
        """The run's own Deployment and headless Service for ``role``, both ``RUN-ROLE``: the pod
        template is the chart's role Deployment's (read, never written: one template, rendered
        by the chart), started on ``model`` (env ``P2R_MODEL``, which wins over serve.yaml).
        Its pods keep the release's name/instance labels (the release's NetworkPolicies apply)
        but get their own component (``ROLE-run``) and ``p2r.io/run`` / ``p2r.io/role``, so the
        chart's Services, PodDisruptionBudgets and HPAs never select them: users are never
        served by a run. Owned by ``kubernetes.owner_config_map`` (garbage-collected with the
        release) and deleted by the controller when no later step needs the role and when the
        run ends."""
        chart = self._deployment(self.k.deployments[role])
        name = f"{self.config.name}-{role}"
        template = copy.deepcopy(chart["spec"]["template"])
        select = {"p2r.io/run": self.config.name, RUN_ROLE_LABEL: role}
        pod_labels = {k: v for k, v in (template.get("metadata", {}).get("labels") or {}).items()
                      if k not in ("helm.sh/chart", "app.kubernetes.io/version")}
        pod_labels.update(self._labels("serve", component=f"{role}-run"))
        pod_labels.update(select)
        template.setdefault("metadata", {})["labels"] = pod_labels
        template["metadata"].setdefault("annotations", {})[MODEL_ANNOTATION] = model
        server = self._server_container(template["spec"], f"Deployment {chart['metadata']['name']}")
        server["env"] = [e for e in server.get("env") or [] if e["name"] != MODEL_ENV] + \
            [{"name": MODEL_ENV, "value": model}]
        labels = {**self._labels("serve", component=f"{role}-run"), **select}
        meta: dict[str, Any] = {"name": name, "namespace": self.namespace, "labels": labels,
                                "annotations": {SOURCE_ANNOTATION: chart["metadata"]["name"]}}
        owner = self.owner()
        if owner:
            meta["ownerReferences"] = [owner]
        spec: dict[str, Any] = {"replicas": chart["spec"].get("replicas") or 1,
                                "selector": {"matchLabels": select}, "template": template}
        for key in ("strategy", "revisionHistoryLimit", "progressDeadlineSeconds", "minReadySeconds"):
            if chart["spec"].get(key) is not None:
                spec[key] = copy.deepcopy(chart["spec"][key])
        deployment = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": meta, "spec": spec}
        ports = [{"name": p["name"], "port": p["containerPort"], "targetPort": p["name"],
                  "protocol": p.get("protocol", "TCP")} for p in server.get("ports") or [] if p.get("name")]
        service = {"apiVersion": "v1", "kind": "Service", "metadata": copy.deepcopy(meta),
                   "spec": {"clusterIP": "None", "selector": select, "ports": ports}}
        service["metadata"].pop("annotations")
        return deployment, service

    def _ensure_run_deployment(self, role: str, model: str) -> None:
        """Create the run's Deployment and Service for ``role`` unless they exist (a restarted
        controller or a later step finds them; an existing one is never written: a pod that
        serves another checkpoint is loaded in place by ``_load``)."""
        from kubernetes.client.exceptions import ApiException

        name, _ = self._target(role)
        try:
            self.apps.read_namespaced_deployment(name, self.namespace)
            return
        except ApiException as e:
            if e.status != 404:
                raise
        deployment, service = self.run_deployment(role, model)
        try:
            self.core.create_namespaced_service(self.namespace, service)
        except ApiException as e:
            if e.status != 409:
                raise
        try:
            self.apps.create_namespaced_deployment(self.namespace, deployment)
            log.info("created Deployment %s (%s on %s)", name, role, model)
        except ApiException as e:
            if e.status != 409:
                raise

    def _delete_run_deployment(self, name: str) -> None:
        from kubernetes.client.exceptions import ApiException

        try:
            self.apps.delete_namespaced_deployment(name, self.namespace, propagation_policy="Background")
            log.info("deleted Deployment %s", name)
        except ApiException as e:
            if e.status != 404:
                raise
        try:
            self.core.delete_namespaced_service(name, self.namespace)
        except ApiException as e:
            if e.status != 404:
                raise

    def _ready(self, dep: dict[str, Any]) -> tuple[bool, str]:
        spec, status = dep.get("spec", {}), dep.get("status") or {}
        want = spec.get("replicas", 1)
        generation, observed = dep["metadata"].get("generation"), status.get("observedGeneration")
        if generation is not None and observed is not None and observed < generation:
            return False, f"generation {generation} not observed yet"
        counts = {k: status.get(k) or 0 for k in ("updatedReplicas", "readyReplicas", "availableReplicas")}
        ok = all(v >= want for v in counts.values()) and not status.get("unavailableReplicas")
        return ok, f"{counts['readyReplicas']}/{want} ready, {counts['updatedReplicas']} updated"

    def _wait_ready(self, ctx: Context, name: str, owned: bool) -> dict[str, Any]:
        deadline = time.monotonic() + self.k.rollout_timeout_s
        missing = "deleted while the run needs it" if owned else "install the chart first"
        while True:
            dep = self._deployment(name, missing)
            ok, why = self._ready(dep)
            if ok:
                return dep
            if time.monotonic() > deadline:
                raise StepFailed(f"Deployment {name} not ready after {self.k.rollout_timeout_s:.0f} s ({why})")
            ctx.sleep(self.k.poll_s)

    def _ready_pods(self, dep: dict[str, Any]) -> list[dict[str, Any]]:
        """The Deployment's pods that are Ready (condition), not terminating, with an IP."""
        select = dep["spec"]["selector"]["matchLabels"]
        listed = self.core.list_namespaced_pod(self.namespace, label_selector=",".join(
            f"{k}={v}" for k, v in sorted(select.items())))
        pods = []
        for pod in (self.api.sanitize_for_serialization(p) for p in listed.items):
            meta, status = pod["metadata"], pod.get("status") or {}
            labels = meta.get("labels") or {}
            if any(labels.get(k) != v for k, v in select.items()) or meta.get("deletionTimestamp"):
                continue
            ready = any(c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or [])
            if ready and status.get("podIP"):
                pods.append(pod)
        return sorted(pods, key=lambda p: p["metadata"]["name"])

    def _admin_target(self, pod: dict[str, Any]) -> str:
        """``IP:PORT`` of a pod's admin port: the server container's port named ``admin``, else
        ``kubernetes.admin_port``."""
        server = self._server_container(pod["spec"], f"pod {pod['metadata']['name']}")
        port = next((p["containerPort"] for p in server.get("ports") or [] if p.get("name") == "admin"),
                    self.k.admin_port)
        ip = pod["status"]["podIP"]
        return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"

    def _load_pod(self, ctx: Context, role: str, pod: dict[str, Any], model: str, deadline: float) -> str:
        """Make one pod serve ``model``: ask its admin port what it serves and, unless it is
        ``model``, ``Admin.LoadCheckpoint`` it in place (no restart); then it must report
        ``model``. Returns ``loaded`` or ``already``; StepFailed naming the pod otherwise."""
        import dataclasses

        import grpc

        from p2r.services.client import Client
        from p2r.services.security import ClientCredentials
        from p2r.v1 import p2r_pb2 as pb

        name = f"{self.namespace}/{pod['metadata']['name']}"
        target = self._admin_target(pod)
        credentials = ClientCredentials.from_env()
        if credentials.tls and not credentials.server_name:  # a pod IP: check the name the roles' certificate carries
            credentials = dataclasses.replace(credentials, server_name=self.k.deployments[role])
        with Client(target, admin_target=target, credentials=credentials) as client:
            def status() -> str:
                return str(client.admin.Status(pb.StatusRequest(), timeout=self.k.admin_timeout_s).checkpoint)

            try:
                if status() == model:
                    return "already"
                while True:
                    left = deadline - time.monotonic()
                    try:
                        log.info("loading %s into pod %s (%s)", model, name, target)
                        client.load_checkpoint(model, timeout_s=max(1.0, left))
                        break
                    except grpc.RpcError as e:  # another reload (a previous controller's) still runs
                        if e.code() != grpc.StatusCode.FAILED_PRECONDITION or "reload in progress" not in \
                                (e.details() or "") or left < self.k.poll_s:
                            raise
                    ctx.sleep(self.k.poll_s)
                reported = status()
            except grpc.RpcError as e:
                raise StepFailed(f"pod {name} ({target}): loading {model} failed: {e.code().name}: "
                                 f"{e.details()}") from None
        if reported != model:
            raise StepFailed(f"pod {name} ({target}): loaded {model} but reports {reported or 'no checkpoint'}")
        return "loaded"

    def _load(self, ctx: Context, role: str, dep: dict[str, Any], model: str) -> dict[str, str]:
        """Every ready replica of ``dep`` serves ``model``, in place: a pod started on it (its
        server container's ``P2R_MODEL`` is ``model``: it loaded it before turning Ready) is
        taken as is; any other is loaded through its admin port (``_load_pod``). Waits until
        at least ``spec.replicas`` pods are ready. Returns pod -> ``started`` / ``already`` /
        ``loaded``."""
        deadline = time.monotonic() + self.k.load_timeout_s
        done: dict[str, str] = {}
        want = dep["spec"].get("replicas") or 1
        while True:
            pods = self._ready_pods(dep)
            for pod in pods:
                pname = pod["metadata"]["name"]
                if pname in done:
                    continue
                if self._model_of(self._server_container(pod["spec"], f"pod {pname}")) == model:
                    done[pname] = "started"
                else:
                    done[pname] = self._load_pod(ctx, role, pod, model, deadline)
            ready = {p["metadata"]["name"] for p in pods}
            if len(ready) >= want and ready <= set(done):
                return {p: done[p] for p in sorted(ready)}
            if time.monotonic() > deadline:
                raise StepFailed(f"Deployment {dep['metadata']['name']}: {len(ready)}/{want} pods ready to load "
                                 f"{model} after {self.k.load_timeout_s:.0f} s")
            ctx.sleep(self.k.poll_s)

    def _serve_role(self, ctx: Context, role: str, model: str) -> None:
        name, owned = self._target(role)
        if owned:
            self._ensure_run_deployment(role, model)
        dep = self._wait_ready(ctx, name, owned)
        pods = self._load(ctx, role, dep, model)
        ctx.state["services"][role] = {"deployment": name, "owned": owned, "model": model,
                                       "endpoint": self._endpoint(name), "pods": pods, "loaded": now()}
        metrics.set_checkpoint(role, name, model)
        ctx.save()

    def serve(self, ctx: Context, models: dict[str, str]) -> dict[str, str]:
        """Serve each role on its model: the run's own Deployment (created from the chart's pod
        template, never the chart's), or the chart's where ``kubernetes.serving_roles`` names
        the role; either way every replica is loaded in place through ``Admin.LoadCheckpoint``
        where it does not serve the model yet. The state (``services``) and the metric
        ``p2r_checkpoint_info{role,deployment,uri}`` record what each role serves."""
        for role, model in models.items():
            if self._target(role)[1]:
                self._ensure_run_deployment(role, model)  # all created first: they start together
        for role, model in models.items():
            self._serve_role(ctx, role, model)
        return {role: str(ctx.state["services"][role]["endpoint"]) for role in models}

    def endpoint(self, ctx: Context, role: str) -> str:
        """A served role's endpoint, checked again: its Deployment exists (a run's is created
        again if it was deleted) and every ready pod serves the recorded model (a restarted
        or added pod is loaded in place)."""
        entry = ctx.state["services"].get(role)
        if entry is None:
            raise StepFailed(f"no {role} service recorded in the run state")
        self._serve_role(ctx, role, entry["model"])
        return str(ctx.state["services"][role]["endpoint"])

    def release(self, ctx: Context, keep: set[str]) -> None:
        """The run's own role Deployments that no later step needs are deleted (their GPUs
        go back); the chart's serving Deployments stay as they are."""
        for role, entry in list(ctx.state["services"].items()):
            if role not in keep and entry.get("owned"):
                self._delete_run_deployment(entry["deployment"])
                ctx.state["services"].pop(role)
                metrics.clear_checkpoint(role)
                ctx.save()

    def _delete_run_deployments(self, state: dict[str, Any]) -> None:
        for role, entry in list(state.get("services", {}).items()):
            if entry.get("owned"):
                self._delete_run_deployment(entry["deployment"])
                state["services"].pop(role)
                metrics.clear_checkpoint(role)

    # ---------------------------------------------------------------------------- inputs

    def missing_inputs(self) -> list[str]:
        """What the run needs and the cluster lacks: the PyTorchJob CRD, the role Deployments,
        the data claim, the models in object storage. One readable item each, naming the fix."""
        from kubernetes.client.exceptions import ApiException

        missing: list[str] = []
        try:
            served = {r.name for r in self.custom.get_api_resources("kubeflow.org", "v1").resources or []}
        except ApiException as e:
            if e.status != 404:
                raise
            served = set()
        if "pytorchjobs" not in served:
            missing.append("the PyTorchJob CRD (kubeflow.org/v1): install the Kubeflow training operator")
        for role, name in sorted(self.k.deployments.items()):
            try:
                self.apps.read_namespaced_deployment(name, self.namespace)
            except ApiException as e:
                if e.status != 404:
                    raise
                missing.append(f"Deployment {self.namespace}/{name} (kubernetes.deployments.{role}): install the "
                               "chart with that role enabled")
        if self.k.data_pvc:
            try:
                self.core.read_namespaced_persistent_volume_claim(self.k.data_pvc, self.namespace)
            except ApiException as e:
                if e.status != 404:
                    raise
                missing.append(f"PersistentVolumeClaim {self.namespace}/{self.k.data_pvc} (kubernetes.data_pvc) "
                               "with the training data")
        if self.config.data_source:  # written by `p2r data upload` (the chart's seed Job): manifest last
            try:
                read_json(f"{self.config.data_source}/{MANIFEST}")
            except FileNotFoundError:
                missing.append(f"data {self.config.data_source}: no {MANIFEST} (upload it: p2r data upload DIR "
                               f"{self.config.data_source})")
            except Exception as e:  # unreachable storage or bad credentials: say so, keep waiting
                missing.append(f"data {self.config.data_source}: cannot read it ({type(e).__name__}: "
                               f"{str(e).splitlines()[0]})")
        for key, uri in (("base_model", self.config.base_model), ("verifier_model", self.config.verifier)):
            if not uri.startswith("s3://"):  # hf:// and paths on a claim are resolved by the pods
                continue
            try:
                read_json(f"{uri.rstrip('/')}/{MANIFEST}")
            except FileNotFoundError:
                missing.append(f"{key} {uri}: no {MANIFEST} (upload it: p2r models upload DIR {uri})")
            except Exception as e:  # unreachable storage or bad credentials: say so, keep waiting
                missing.append(f"{key} {uri}: cannot read it ({type(e).__name__}: {str(e).splitlines()[0]})")
        return missing

    def _event(self, kind: str, reason: str, message: str) -> None:
        """A Kubernetes Event on the run's state ConfigMap (``kubectl describe configmap
        p2r-pipeline-RUN``, ``kubectl get events``). Best effort: reporting never stops a run."""
        from kubernetes.client.exceptions import ApiException

        store = self.store()
        stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        body = {
            "apiVersion": "v1", "kind": "Event",
            "metadata": {"name": f"{store.name}.{time.time_ns():x}", "namespace": self.namespace,
                         "labels": self._labels("state")},
            "involvedObject": {"apiVersion": "v1", "kind": "ConfigMap", "name": store.name,
                               "namespace": self.namespace},
            "reason": reason, "message": message[:1024], "type": kind, "count": 1,
            "firstTimestamp": stamp, "lastTimestamp": stamp,
            "source": {"component": "p2r-pipeline"}, "reportingComponent": "p2r-pipeline",
            "reportingInstance": socket.gethostname()[:128],
        }
        try:
            self.core.create_namespaced_event(self.namespace, body)
        except ApiException as e:
            log.warning("could not record the Event %s: %s", reason, e.reason)

    def check_inputs(self, ctx: Context) -> dict[str, Any]:
        """Wait until every input exists. While one is missing the run says so: its state
        (``reason``, and ``missing`` in the step's outputs, shown by ``p2r pipeline status``), a
        Warning Event ``InputsMissing`` whenever the list changes, and the log; nothing is
        created and no attempt is spent. When all are there, a Normal Event ``InputsReady``."""
        reported: list[str] | None = None
        while True:
            missing = self.missing_inputs()
            if not missing:
                if reported:
                    self._event("Normal", "InputsReady", "all inputs found; the run starts")
                ctx.state["reason"] = None
                return {"missing": []}
            if missing != reported:
                message = "waiting for inputs: " + "; ".join(missing)
                log.warning("%s", message)
                ctx.state["reason"] = message
                ctx.record(missing=missing)
                self._event("Warning", "InputsMissing", message)
                reported = missing
            ctx.sleep(self.k.inputs_poll_s)

    # ---------------------------------------------------------------------------- pods

    def train_workdir(self, stage: str) -> str:
        return f"{pods.TRAIN_WORKDIR}/{stage}"

    def _labels(self, step: str, attempt: int | None = None, component: str | None = None) -> dict[str, str]:
        return {**_labels(self.config.name, step, attempt, component), **self.k.pod.labels}

    def owner(self) -> dict[str, Any] | None:
        """The ownerReference every created object carries (``kubernetes.owner_config_map``),
        read once; None when no owner is configured."""
        from kubernetes.client.exceptions import ApiException

        if not self.k.owner_config_map:
            return None
        if self._owner is None:
            try:
                cm = self.core.read_namespaced_config_map(self.k.owner_config_map, self.namespace)
            except ApiException as e:
                if e.status == 404:
                    raise StepFailed(f"kubernetes.owner_config_map: ConfigMap {self.namespace}/"
                                     f"{self.k.owner_config_map} not found") from None
                raise
            self._owner = pods.owner_reference({"apiVersion": "v1", "kind": "ConfigMap",
                                                "metadata": self.api.sanitize_for_serialization(cm.metadata)})
        return self._owner

    def _env(self) -> list[dict[str, Any]]:
        """Env shared by trainer and eval pods: extra plain env, the S3 endpoint, the S3 keys
        by reference (they stay in the Secret: nothing is copied)."""
        env: list[dict[str, Any]] = [{"name": name, "value": value} for name, value in self.k.env.items()]
        endpoint = self.k.s3_endpoint or os.environ.get("P2R_S3_ENDPOINT")
        if endpoint:
            env += [{"name": "P2R_S3_ENDPOINT", "value": endpoint},
                    {"name": "P2R_S3_SECURE", "value": str(self.k.s3_secure).lower()}]
        if self.k.s3_secret:
            for name, key in (("AWS_ACCESS_KEY_ID", self.k.s3_access_key_ref),
                              ("AWS_SECRET_ACCESS_KEY", self.k.s3_secret_key_ref)):
                env.append({"name": name, "valueFrom": {"secretKeyRef": {"name": self.k.s3_secret, "key": key}}})
        return env

    def pytorchjob(self, name: str, stage: str, role: str, attempt: int,
                   metrics_port: int | None = None) -> dict[str, Any]:
        """The stage's PyTorchJob from the one pod template (``controller/pods.py``):
        ``workers`` pods x ``nproc_per_node`` torchrun processes, one ``gpu_resource`` each. The
        operator's own restarts are off (``backoffLimit: 0``, ``restartPolicy: Never``):
        retries are the controller's."""
        return pods.pytorchjob(
            self.k.pod, name=name, namespace=self.namespace, labels=self._labels(stage, attempt),
            pod_labels=self._labels(stage, attempt, "trainer"), image=self.k.image,
            pull_policy=self.k.image_pull_policy, role=role, config_map=f"{name}-config", config_file="train.yaml",
            env=self._env(), resources=self.k.resources or None, workers=self.k.workers,
            nproc_per_node=self.k.nproc_per_node, gpu_resource=self.k.gpu_resource, data_pvc=self.k.data_pvc,
            data_mount=self.k.data_mount, metrics_port=metrics_port, restart_policy="Never", backoff_limit=0,
            owner=self.owner(), service_account=self.k.service_account, data_uri=self.config.data_source,
            data_env=self._env())

    def _put_config_map(self, name: str, data: dict[str, str], step: str) -> None:
        from kubernetes.client.exceptions import ApiException

        meta: dict[str, Any] = {"name": name, "namespace": self.namespace, "labels": self._labels(step)}
        owner = self.owner()
        if owner:
            meta["ownerReferences"] = [owner]
        try:
            self.core.create_namespaced_config_map(self.namespace, {"apiVersion": "v1", "kind": "ConfigMap",
                                                                    "metadata": meta, "data": data})
        except ApiException as e:
            if e.status != 409:
                raise
            self.core.patch_namespaced_config_map(name, self.namespace, {"data": data})

    def _get_pytorchjob(self, name: str) -> dict[str, Any] | None:
        from kubernetes.client.exceptions import ApiException

        try:
            return self.custom.get_namespaced_custom_object(  # type: ignore[no-any-return]
                "kubeflow.org", "v1", self.namespace, "pytorchjobs", name)
        except ApiException as e:
            if e.status == 404:
                return None
            raise

    def train(self, ctx: Context, stage: str, role: str, train_config: dict[str, Any]) -> dict[str, Any]:
        name = f"{self.config.name}-{stage}-{ctx.attempt}"
        ctx.record(job=name, kind="PyTorchJob")  # before creating: a restart finds and re-attaches
        if self._get_pytorchjob(name) is None:
            port = self.k.trainer_metrics_port
            if port is not None:  # in a pod, Prometheus scrapes the pod IP, not loopback
                train_config = {**train_config, "metrics_port": port, "metrics_host": "0.0.0.0"}
            self._put_config_map(f"{name}-config", {"train.yaml": yaml.safe_dump(train_config)}, stage)
            self.custom.create_namespaced_custom_object("kubeflow.org", "v1", self.namespace, "pytorchjobs",
                                                        self.pytorchjob(name, stage, role, ctx.attempt, port))
            log.info("created PyTorchJob %s", name)
        else:
            log.info("re-attached to PyTorchJob %s", name)

        def conditions() -> list[dict[str, Any]] | None:
            job = self._get_pytorchjob(name)
            return None if job is None else list((job.get("status") or {}).get("conditions") or [])

        return self._watch(ctx, "PyTorchJob", name, conditions, ("Succeeded",), self.k.job_timeout_s)

    def eval_job(self, name: str, args: list[str], attempt: int) -> dict[str, Any]:
        return pods.eval_job(
            self.k.pod, name=name, namespace=self.namespace, labels=self._labels("eval", attempt),
            pod_labels=self._labels("eval", attempt, "eval"), image=self.k.image,
            pull_policy=self.k.image_pull_policy, command=["p2r", "eval", *args], args=None, env=self._env(),
            resources=self.k.eval_resources or None, data_pvc=self.k.data_pvc, data_mount=self.k.data_mount,
            restart_policy="Never", backoff_limit=0, owner=self.owner(), service_account=self.k.service_account)

    def _get_job(self, name: str) -> Any:
        from kubernetes.client.exceptions import ApiException

        try:
            return self.batch.read_namespaced_job(name, self.namespace)
        except ApiException as e:
            if e.status == 404:
                return None
            raise

    def evaluate(self, ctx: Context, args: list[str]) -> dict[str, Any]:
        name = f"{self.config.name}-eval-{ctx.attempt}"
        ctx.record(job=name, kind="Job")
        if self._get_job(name) is None:
            self.batch.create_namespaced_job(self.namespace, self.eval_job(name, args, ctx.attempt))
            log.info("created Job %s", name)

        def conditions() -> list[dict[str, Any]] | None:
            job = self._get_job(name)
            if job is None:
                return None
            return list(self.api.sanitize_for_serialization(job.status.conditions if job.status else None) or [])

        return self._watch(ctx, "Job", name, conditions, ("Complete", "SuccessCriteriaMet"), self.config.eval.timeout_s)

    def _watch(self, ctx: Context, kind: str, name: str, conditions: Callable[[], list[dict[str, Any]] | None],
               done: tuple[str, ...], timeout_s: float) -> dict[str, Any]:
        """Poll a job's conditions until one of ``done`` or ``Failed`` is true; a deleted job or
        one past its timeout (then deleted) fails the step. The true conditions are recorded in
        the step's outputs (``conditions``) whenever this controller sees them change, so the
        state shows what the job is doing (``Created``, ``Running``) and that a controller
        watches it."""
        deadline = time.monotonic() + timeout_s
        seen: list[str] | None = None
        while True:
            found = conditions()
            if found is None:
                raise StepFailed(f"{kind} {name} was deleted")
            current = {c["type"]: c for c in found if c.get("status") == "True"}
            if sorted(current) != seen:
                seen = sorted(current)
                ctx.record(conditions=seen)
            if any(t in current for t in done):
                return {"job": name}
            if "Failed" in current:
                c = current["Failed"]
                raise StepFailed(f"{kind} {name} failed: {c.get('reason') or 'Failed'}: "
                                 f"{c.get('message') or 'no message'}")
            if time.monotonic() > deadline:
                self._delete(name, kind)
                raise StepFailed(f"{kind} {name} ran past {timeout_s:.0f} s; deleted")
            ctx.sleep(self.k.poll_s)

    # ------------------------------------------------------------------------- stopping

    def _delete(self, name: str, kind: str) -> None:
        from kubernetes.client.exceptions import ApiException

        try:
            if kind == "PyTorchJob":
                self.custom.delete_namespaced_custom_object("kubeflow.org", "v1", self.namespace, "pytorchjobs", name,
                                                            propagation_policy="Background")
            else:
                self.batch.delete_namespaced_job(name, self.namespace, propagation_policy="Background")
            log.info("deleted %s %s", kind, name)
        except ApiException as e:
            if e.status != 404:
                raise

    def _delete_running(self, state: dict[str, Any]) -> None:
        for record in state["steps"].values():
            out = record["outputs"]
            if record["status"] == "running" and out.get("job"):
                self._delete(out["job"], out.get("kind", "PyTorchJob"))

    def shutdown(self, ctx: Context, cancelled: bool) -> None:
        """Cancel deletes the running job (frees its GPUs); a stopped controller leaves it running
        so the next controller re-attaches. The run's own role Deployments go when the run
        ends (succeeded, failed, cancelled); a stopped (interrupted) controller leaves them to
        the job that still calls them and the controller that resumes."""
        if cancelled and ctx.step:
            out = ctx.outputs(ctx.step)
            if out.get("job"):
                self._delete(out["job"], out.get("kind", "PyTorchJob"))
        if ctx.state.get("status") != INTERRUPTED:
            self._delete_run_deployments(ctx.state)

    def cancel_detached(self, state: dict[str, Any]) -> None:
        self._delete_running(state)
        self._delete_run_deployments(state)

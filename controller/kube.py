"""The Kubernetes backend: the same step graph as Kubernetes objects.

- Services: the chart's role Deployments (``kubernetes.deployments``) are rolled to the model a
  stage needs by setting ``P2R_MODEL`` on their server container (a Deployment update, so a pod
  that restarts later still loads the right checkpoint), then awaited until the rollout is
  complete (observed generation, updated / ready / available replicas). Their Services are the
  endpoints the trainer pods call (``NAME.NAMESPACE.svc:PORT``).
- Stages: one PyTorchJob per attempt, created with the ``kubeflow-training`` SDK, named
  ``RUN-STAGE-ATTEMPT``. The name is written to the state before the job is created, so a
  restarted controller re-attaches to the job instead of creating a second one. The trainer's
  YAML config is a ConfigMap mounted at ``/etc/p2r``; S3 credentials come from a Secret
  (``envFrom``), never from the config or the state. The operator's own restarts are off
  (``backoffLimit: 0``): retries are the controller's, counted and backed off in one place, and a
  retried stage continues from its newest complete checkpoint (``--resume auto``).
- Evaluation: a ``batch/v1`` Job ``RUN-eval-ATTEMPT`` running ``p2r eval``.
- State: the ConfigMap ``p2r-pipeline-RUN`` (key ``state.json``; ``cancel`` set by
  ``p2r pipeline cancel``).
"""

from __future__ import annotations

import copy
import json
import logging
import os
import time
from collections.abc import Callable
from typing import Any

import yaml

from p2r.controller.config import PipelineConfig
from p2r.controller.graph import Context, StepFailed
from p2r.controller.state import now

log = logging.getLogger("p2r.pipeline.kube")

TRAIN_CONFIG_DIR = "/etc/p2r"
MODEL_ENV = "P2R_MODEL"
MODEL_ANNOTATION = "p2r.io/model"


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

    def __init__(self, core: Any, namespace: str, run: str) -> None:
        self.core, self.namespace, self.run = core, namespace, run
        self.name = f"p2r-pipeline-{run}"

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
        from kubernetes import client
        from kubernetes.client.exceptions import ApiException

        try:
            self.core.patch_namespaced_config_map(self.name, self.namespace, {"data": data})
        except ApiException as e:
            if e.status != 404:
                raise
            body = client.V1ConfigMap(metadata=client.V1ObjectMeta(
                name=self.name, namespace=self.namespace, labels=_labels(self.run, "state")), data=data)
            self.core.create_namespaced_config_map(self.namespace, body)

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
        from kubeflow.training import TrainingClient
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
        self.training = TrainingClient(client_configuration=api_config, namespace=self.namespace,
                                       job_kind="PyTorchJob")

    def store(self) -> ConfigMapStore:
        return ConfigMapStore(self.core, self.namespace, self.config.name)

    # ------------------------------------------------------------------------- services

    def _endpoint(self, role: str) -> str:
        return f"{self.k.deployments[role]}.{self.namespace}.svc:{self.k.grpc_port}"

    def _deployment(self, name: str) -> dict[str, Any]:
        from kubernetes.client.exceptions import ApiException

        try:
            return self.api.sanitize_for_serialization(self.apps.read_namespaced_deployment(name, self.namespace))
        except ApiException as e:
            if e.status == 404:
                raise StepFailed(f"Deployment {self.namespace}/{name} not found (install the chart first)") from None
            raise

    def _server_container(self, dep: dict[str, Any]) -> dict[str, Any]:
        containers = dep["spec"]["template"]["spec"]["containers"]
        for c in containers:
            if c["name"] == self.k.server_container:
                return c  # type: ignore[no-any-return]
        if len(containers) == 1:
            return containers[0]  # type: ignore[no-any-return]
        raise StepFailed(f"Deployment {dep['metadata']['name']}: no container named {self.k.server_container}")

    @staticmethod
    def _model_of(container: dict[str, Any]) -> str | None:
        return next((e.get("value") for e in container.get("env") or [] if e["name"] == MODEL_ENV), None)

    def _roll(self, name: str, model: str) -> int | None:
        """Point the Deployment at ``model``; returns the generation to wait for."""
        dep = self._deployment(name)
        container = self._server_container(dep)
        if self._model_of(container) == model:
            return dep["metadata"].get("generation")  # already there: no restart
        env = [e for e in container.get("env") or [] if e["name"] != MODEL_ENV] + [{"name": MODEL_ENV, "value": model}]
        container["env"] = env
        containers = dep["spec"]["template"]["spec"]["containers"]
        patch = {"spec": {"template": {"metadata": {"annotations": {MODEL_ANNOTATION: model}},
                                       "spec": {"containers": containers}}}}
        log.info("rolling Deployment %s to %s", name, model)
        updated = self.apps.patch_namespaced_deployment(name, self.namespace, patch)
        return updated.metadata.generation if updated is not None and updated.metadata else None

    def _ready(self, dep: dict[str, Any], generation: int | None) -> tuple[bool, str]:
        spec, status = dep.get("spec", {}), dep.get("status") or {}
        want = spec.get("replicas", 1)
        observed = status.get("observedGeneration")
        if generation is not None and (observed is None or observed < generation):
            return False, f"generation {generation} not observed yet"
        counts = {k: status.get(k) or 0 for k in ("updatedReplicas", "readyReplicas", "availableReplicas")}
        ok = all(v >= want for v in counts.values()) and not status.get("unavailableReplicas")
        return ok, f"{counts['readyReplicas']}/{want} ready, {counts['updatedReplicas']} updated"

    def _wait_ready(self, ctx: Context, name: str, model: str, generation: int | None) -> None:
        deadline = time.monotonic() + self.k.rollout_timeout_s
        while True:
            dep = self._deployment(name)
            if self._model_of(self._server_container(dep)) != model:
                raise StepFailed(f"Deployment {name} was changed to another model while rolling out")
            ok, why = self._ready(dep, generation)
            if ok:
                return
            if time.monotonic() > deadline:
                raise StepFailed(f"Deployment {name} not ready after {self.k.rollout_timeout_s:.0f} s ({why})")
            ctx.sleep(self.k.poll_s)

    def serve(self, ctx: Context, models: dict[str, str]) -> dict[str, str]:
        generations = {role: self._roll(self.k.deployments[role], model) for role, model in models.items()}
        for role, model in models.items():
            self._wait_ready(ctx, self.k.deployments[role], model, generations[role])
            ctx.state["services"][role] = {"deployment": self.k.deployments[role], "model": model,
                                           "endpoint": self._endpoint(role)}
        ctx.save()
        return {role: self._endpoint(role) for role in models}

    def endpoint(self, ctx: Context, role: str) -> str:
        entry = ctx.state["services"].get(role)
        if entry is None:
            raise StepFailed(f"no {role} service recorded in the run state")
        generation = self._roll(entry["deployment"], entry["model"])  # no-op unless someone moved it
        self._wait_ready(ctx, entry["deployment"], entry["model"], generation)
        return str(entry["endpoint"])

    def release(self, ctx: Context, keep: set[str]) -> None:
        """The Deployments are the cluster's serving fleet: they stay."""

    # ---------------------------------------------------------------------------- pods

    def train_workdir(self, stage: str) -> str:
        return f"/tmp/p2r-work/{stage}"

    def _pod_parts(self, extra_mounts: list[Any] | None = None) -> tuple[list[Any], list[Any], list[Any], list[Any]]:
        """env, envFrom, volumeMounts, volumes shared by trainer and eval pods."""
        from kubernetes import client

        env = [client.V1EnvVar(name=name, value=value) for name, value in self.k.env.items()]
        endpoint = self.k.s3_endpoint or os.environ.get("P2R_S3_ENDPOINT")
        if endpoint:
            env += [client.V1EnvVar(name="P2R_S3_ENDPOINT", value=endpoint),
                    client.V1EnvVar(name="P2R_S3_SECURE", value=str(self.k.s3_secure).lower())]
        if self.k.s3_secret:  # the keys stay in the Secret: pods reference them, nothing is copied
            for name, key in (("AWS_ACCESS_KEY_ID", self.k.s3_access_key_ref),
                              ("AWS_SECRET_ACCESS_KEY", self.k.s3_secret_key_ref)):
                ref = client.V1SecretKeySelector(name=self.k.s3_secret, key=key)
                env.append(client.V1EnvVar(name=name, value_from=client.V1EnvVarSource(secret_key_ref=ref)))
        env_from: list[Any] = []
        mounts, volumes = list(extra_mounts or []), []
        if self.k.data_pvc:
            mounts.append(client.V1VolumeMount(name="data", mount_path=self.k.data_mount))
            claim = client.V1PersistentVolumeClaimVolumeSource(claim_name=self.k.data_pvc)
            volumes.append(client.V1Volume(name="data", persistent_volume_claim=claim))
        return env, env_from, mounts, volumes

    def pytorchjob(self, name: str, stage: str, role: str, attempt: int, metrics_port: int | None = None) -> Any:
        """The stage's PyTorchJob (kubeflow-training SDK model): Master + (workers-1) Workers,
        each a ``pytorch`` container running ``p2r train``; the operator injects MASTER_ADDR,
        MASTER_PORT, WORLD_SIZE and RANK, which the trainer reads. Service links are off: their
        ``P2R_*_PORT`` variables would land in p2r's ``P2R_*`` settings."""
        from kubeflow.training import models
        from kubernetes import client

        env, env_from, mounts, volumes = self._pod_parts(
            [client.V1VolumeMount(name="train-config", mount_path=TRAIN_CONFIG_DIR, read_only=True),
             client.V1VolumeMount(name="dshm", mount_path="/dev/shm")])
        volumes.append(client.V1Volume(name="train-config",
                                       config_map=client.V1ConfigMapVolumeSource(name=f"{name}-config")))
        # PyTorch's data workers and NCCL use /dev/shm; the container default (64 MiB) is too small.
        volumes.append(client.V1Volume(name="dshm", empty_dir=client.V1EmptyDirVolumeSource(medium="Memory")))
        container = client.V1Container(
            name="pytorch", image=self.k.image, image_pull_policy=self.k.image_pull_policy,
            command=["p2r", "train", "--role", role, "--config", f"{TRAIN_CONFIG_DIR}/train.yaml", "--resume", "auto"],
            env=env or None, env_from=env_from or None, volume_mounts=mounts,
            resources=client.V1ResourceRequirements(**self.k.resources) if self.k.resources else None)
        def template(ports: list[Any] | None) -> Any:
            c = copy.deepcopy(container)
            c.ports = ports
            return client.V1PodTemplateSpec(
                metadata=client.V1ObjectMeta(labels=_labels(self.config.name, stage, attempt, "trainer")),
                spec=client.V1PodSpec(containers=[c], volumes=volumes, enable_service_links=False,
                                      service_account_name=self.k.service_account))

        # Rank 0 (the Master) serves the trainer's metrics, on the port the PodMonitor scrapes.
        master_ports = ([client.V1ContainerPort(name="metrics", container_port=metrics_port)]
                        if metrics_port else None)
        specs = {"Master": models.KubeflowOrgV1ReplicaSpec(replicas=1, restart_policy="Never",
                                                           template=template(master_ports))}
        if self.k.workers > 1:
            specs["Worker"] = models.KubeflowOrgV1ReplicaSpec(replicas=self.k.workers - 1, restart_policy="Never",
                                                              template=template(None))
        return models.KubeflowOrgV1PyTorchJob(
            api_version="kubeflow.org/v1", kind="PyTorchJob",
            metadata=client.V1ObjectMeta(name=name, namespace=self.namespace,
                                         labels=_labels(self.config.name, stage, attempt)),
            spec=models.KubeflowOrgV1PyTorchJobSpec(
                run_policy=models.KubeflowOrgV1RunPolicy(backoff_limit=0, clean_pod_policy="None"),
                pytorch_replica_specs=specs))

    def _put_config_map(self, name: str, data: dict[str, str], step: str) -> None:
        from kubernetes import client
        from kubernetes.client.exceptions import ApiException

        body = client.V1ConfigMap(metadata=client.V1ObjectMeta(name=name, namespace=self.namespace,
                                                               labels=_labels(self.config.name, step)), data=data)
        try:
            self.core.create_namespaced_config_map(self.namespace, body)
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
            self.training.create_job(job=self.pytorchjob(name, stage, role, ctx.attempt, port),
                                     namespace=self.namespace)
            log.info("created PyTorchJob %s", name)
        else:
            log.info("re-attached to PyTorchJob %s", name)

        def conditions() -> list[Any] | None:
            if self._get_pytorchjob(name) is None:
                return None
            return list(self.training.get_job_conditions(name=name, namespace=self.namespace))

        return self._watch(ctx, "PyTorchJob", name, conditions, ("Succeeded",), self.k.job_timeout_s)

    def eval_job(self, name: str, args: list[str], attempt: int) -> Any:
        from kubernetes import client

        env, env_from, mounts, volumes = self._pod_parts()
        container = client.V1Container(
            name="eval", image=self.k.image, image_pull_policy=self.k.image_pull_policy, command=["p2r", "eval", *args],
            env=env or None, env_from=env_from or None, volume_mounts=mounts or None,
            resources=client.V1ResourceRequirements(**self.k.eval_resources) if self.k.eval_resources else None)
        return client.V1Job(
            api_version="batch/v1", kind="Job",
            metadata=client.V1ObjectMeta(name=name, namespace=self.namespace,
                                         labels=_labels(self.config.name, "eval", attempt)),
            spec=client.V1JobSpec(backoff_limit=0, template=client.V1PodTemplateSpec(
                metadata=client.V1ObjectMeta(labels=_labels(self.config.name, "eval", attempt, "eval")),
                spec=client.V1PodSpec(restart_policy="Never", containers=[container], volumes=volumes or None,
                                      enable_service_links=False, service_account_name=self.k.service_account))))

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

        def conditions() -> list[Any] | None:
            job = self._get_job(name)
            if job is None:
                return None
            return list((job.status.conditions if job.status else None) or [])

        return self._watch(ctx, "Job", name, conditions, ("Complete", "SuccessCriteriaMet"), self.config.eval.timeout_s)

    def _watch(self, ctx: Context, kind: str, name: str, conditions: Callable[[], list[Any] | None],
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
            current = {c.type: c for c in found if c.status == "True"}
            if sorted(current) != seen:
                seen = sorted(current)
                ctx.record(conditions=seen)
            if any(t in current for t in done):
                return {"job": name}
            if "Failed" in current:
                c = current["Failed"]
                raise StepFailed(f"{kind} {name} failed: {c.reason or 'Failed'}: {c.message or 'no message'}")
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
        so the next controller re-attaches."""
        if cancelled and ctx.step:
            out = ctx.outputs(ctx.step)
            if out.get("job"):
                self._delete(out["job"], out.get("kind", "PyTorchJob"))

    def cancel_detached(self, state: dict[str, Any]) -> None:
        self._delete_running(state)

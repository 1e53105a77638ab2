"""The one pod template of the training run: every trainer (PyTorchJob) and evaluation (Job) pod.

Two things start these pods: the controller (``controller/kube.py``, at run time) and the
kustomize manifests (``manifests/base/*.yaml``, applied by hand). Both are built here, once:
the controller calls :func:`pytorchjob` and :func:`eval_job`, and ``scripts/manifests.py``
writes ``manifests/base`` from the same functions (``tests/test_manifests.py`` fails when the
committed files differ from what it would write). So the security context, read-only root,
scratch volumes, ``/dev/shm``, Service links, token mounting, placement and the training layout
(pods x torchrun processes per pod, one GPU per process) of a training pod are decided in this
module and nowhere else; the chart only passes values into :class:`PodTemplate`
(``controller.jobs`` and the release-wide security contexts) and the layout
(``kubernetes.workers``, ``nproc_per_node``, ``gpu_resource`` of pipeline.yaml).

The builders return plain dicts in the API's JSON shape (what ``kubectl get -o json`` shows), so
the objects the controller sends and the manifests on disk are the same data, validated by the
same strict schemas in the tests.
"""

from __future__ import annotations

import copy
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

# The images' unprivileged user (docker/*.Dockerfile create uid 10001); the chart's
# podSecurityContext / containerSecurityContext defaults are the same (tests/test_chart.py).
POD_SECURITY_CONTEXT: dict[str, Any] = {"runAsNonRoot": True, "runAsUser": 10001, "runAsGroup": 10001,
                                        "fsGroup": 10001, "seccompProfile": {"type": "RuntimeDefault"}}
CONTAINER_SECURITY_CONTEXT: dict[str, Any] = {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                                              "capabilities": {"drop": ["ALL"]}}
GPU_TOLERATIONS: list[dict[str, Any]] = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
"""Kueue admits a job carrying this label as a whole (gang admission) from that LocalQueue."""

TRAIN_CONFIG_DIR = "/etc/p2r"
WORK_DIR = "/work"
"""Writable scratch under a read-only root: HOME, the trainer's workdir, model caches."""
TRAIN_WORKDIR = f"{WORK_DIR}/p2r-train"
MASTER_PORT = 23456
"""The training operator's default rendezvous port (``pytorchjob-port``), named on every replica."""
SHM_GIB_PER_PROCESS = 16
"""/dev/shm per training process when ``PodTemplate.shm_size_limit`` is unset: NCCL's shared-memory
transport between a pod's local ranks, PyTorch's data workers and the engine all use it."""
TORCHRUN: list[str] = ["torchrun", "--nnodes=$(PET_NNODES)", "--nproc_per_node=$(PET_NPROC_PER_NODE)",
                       "--node_rank=$(PET_NODE_RANK)", "--master_addr=$(MASTER_ADDR)",
                       "--master_port=$(MASTER_PORT)", "-m", "p2r.cli"]
"""The trainer pods' command: torchrun starts ``spec.nprocPerNode`` ranks of ``p2r train`` (the
container's args) in each pod. The training operator (kubeflow.org/v1) puts every value into the
container env, from which Kubernetes expands ``$(VAR)``: ``PET_NNODES`` (pods), ``PET_NPROC_PER_NODE``
(``spec.nprocPerNode``), ``PET_NODE_RANK`` (the pod's index, Master 0), ``MASTER_ADDR`` /
``MASTER_PORT`` (the Master's Service and ``pytorchjob-port``). The pod-level ``WORLD_SIZE`` and
``RANK`` it also sets are replaced by torchrun's per process (``WORLD_SIZE`` = pods x nprocPerNode,
``RANK``, ``LOCAL_RANK``), which the trainer reads."""
BASE_ENV: list[dict[str, Any]] = [{"name": "HOME", "value": f"{WORK_DIR}/home"}, {"name": "TMPDIR", "value": "/tmp"}]
EVAL_RESOURCES: dict[str, Any] = {"requests": {"cpu": "2", "memory": "8Gi"}, "limits": {"memory": "16Gi"}}
"""The eval container's resources when none are given (``kubernetes.eval_resources``): ``p2r eval``
decodes benchmark images and calls the role services (no GPU); memory has a limit, CPU none
(throttling would only slow it)."""
EPHEMERAL_STORAGE = "ephemeral-storage"
_QUANTITY_UNITS = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50,
                   "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Placement(_Strict):
    """Where one kind of pod may run."""

    node_selector: dict[str, str] = Field(default_factory=dict)
    tolerations: list[dict[str, Any]] = Field(default_factory=list)
    affinity: dict[str, Any] = Field(default_factory=dict)
    priority_class_name: str | None = None


class HuggingFace(_Strict):
    """Hub access of the trainer and eval pods, which load an ``hf://`` base model themselves
    (services/checkpoints.py ``download_hf`` reads ``HF_TOKEN`` and ``HF_ENDPOINT``); the chart
    fills it from ``models.huggingFace``, as for its role pods. The token stays in its Secret."""

    endpoint: str | None = Field(None, description="HF_ENDPOINT: a mirror or proxy of the Hub; unset: huggingface.co")
    token_secret: str | None = Field(None, description="Secret holding HF_TOKEN (gated or private repositories); "
                                                       "unset: no token")
    token_key_ref: str = Field("HF_TOKEN", min_length=1, description="key of the token in token_secret")


CLIENT_TLS_DIR = "/etc/p2r-client/tls"
"""Where the TLS Secret's files are mounted (beside, not under, the config mount at /etc/p2r)."""
CLIENT_API_KEY_DIR = "/etc/p2r-client/api-key"


class ClientSecrets(_Strict):
    """What the trainer and eval pods present to the role servers (services/security.py
    ``ClientCredentials.from_env``): the TLS Secret's ``ca.crt`` (and, where the roles require
    mTLS, its ``tls.crt`` / ``tls.key``) and an API key, each mounted read-only from its Secret
    with only the ``P2R_CLIENT_*_FILE`` path in the env, so no secret is copied into a pod spec or
    ConfigMap. The chart fills it from ``security.tls``, as for its role pods."""

    tls_secret: str | None = Field(None, description="Secret with ca.crt (kubernetes.io/tls, e.g. cert-manager's): "
                                                     "the roles' TLS; unset: plaintext")
    client_cert: bool = Field(False, description="also present the Secret's tls.crt/tls.key (roles requiring mTLS)")
    api_key_secret: str | None = Field(None, description="Secret holding one API key sent as a bearer token; "
                                                         "unset: none")
    api_key_key_ref: str = Field("api-key", min_length=1, description="key of the API key in api_key_secret")


class PodTemplate(_Strict):
    """How the controller's trainer and eval pods are built (``kubernetes.pod`` in pipeline.yaml;
    the chart fills it from its values). Defaults meet Pod Security "restricted"."""

    security_context: dict[str, Any] = Field(default_factory=lambda: copy.deepcopy(POD_SECURITY_CONTEXT),
                                             description="pod securityContext")
    container_security_context: dict[str, Any] = Field(
        default_factory=lambda: copy.deepcopy(CONTAINER_SECURITY_CONTEXT), description="container securityContext")
    image_pull_secrets: list[dict[str, str]] = Field(default_factory=list, description="[{name: regcred}]")
    api_access: bool = Field(False, description="mount the ServiceAccount token (automountServiceAccountToken); "
                                                "trainer and eval pods never call the API server")
    trainer: Placement = Field(default_factory=lambda: Placement(tolerations=copy.deepcopy(GPU_TOLERATIONS)))
    eval: Placement = Field(default_factory=Placement)
    queue_name: str | None = Field(None, description="Kueue LocalQueue: label kueue.x-k8s.io/queue-name and "
                                                     "create the jobs suspended, for Kueue to admit whole")
    labels: dict[str, str] = Field(default_factory=dict, description="extra labels on every object created "
                                                                     "(the chart adds app.kubernetes.io/instance)")
    hugging_face: HuggingFace = Field(default_factory=HuggingFace, description="HF_ENDPOINT / HF_TOKEN of "
                                      "every container, for hf:// models")
    client: ClientSecrets = Field(default_factory=ClientSecrets, description="TLS trust and API key of every "
                                  "container's calls to the roles")
    work_size_limit: str = "200Gi"
    tmp_size_limit: str = "10Gi"
    shm_size_limit: str | None = Field(None, description=f"/dev/shm of a trainer pod; unset: "
                                       f"{SHM_GIB_PER_PROCESS}Gi per training process (nproc_per_node)")
    eval_work_size_limit: str = "20Gi"
    data_size_limit: str = Field("20Gi", description="data volume of a trainer pod that fetches an s3:// data set")


def quantity_bytes(quantity: str | int) -> int:
    """Bytes of a Kubernetes quantity ("200Gi", "500M", "1024")."""
    text = str(quantity)
    for unit, factor in _QUANTITY_UNITS.items():
        if text.endswith(unit):
            return int(float(text[: -len(unit)]) * factor)
    return int(float(text))


def _format_bytes(n: int) -> str:
    for unit in ("Ti", "Gi", "Mi", "Ki"):
        if n and n % _QUANTITY_UNITS[unit] == 0:
            return f"{n // _QUANTITY_UNITS[unit]}{unit}"
    return str(n)


def scratch_request(volumes: list[dict[str, Any]]) -> str | None:
    """The ephemeral-storage a pod's container requests: the size limits of its disk-backed
    emptyDirs (``/work``, ``/tmp``; memory-backed ones count as memory), so the scheduler places it
    on a node with that much local disk instead of evicting it there when the disk fills."""
    total = sum(quantity_bytes(v["emptyDir"]["sizeLimit"]) for v in volumes
                if "emptyDir" in v and v["emptyDir"].get("medium") != "Memory" and v["emptyDir"].get("sizeLimit"))
    return _format_bytes(total) if total else None


def with_scratch(resources: dict[str, Any] | None, volumes: list[dict[str, Any]]) -> dict[str, Any] | None:
    """``resources`` with ``requests.ephemeral-storage`` from :func:`scratch_request`, unless it sets one."""
    out = copy.deepcopy(resources or {})
    scratch = scratch_request(volumes)
    if scratch:
        out["requests"] = {EPHEMERAL_STORAGE: scratch, **out.get("requests", {})}
    return out or None


def _drop_empty(d: dict[str, Any]) -> dict[str, Any]:
    """Leave out unset fields (None, empty lists and maps) the way the API server would show them."""
    return {k: v for k, v in d.items() if v not in (None, "", [], {})}


def hf_env(hf: HuggingFace) -> list[dict[str, Any]]:
    """``HF_ENDPOINT`` and ``HF_TOKEN`` (by ``secretKeyRef``: the token is never copied) when set."""
    env: list[dict[str, Any]] = []
    if hf.endpoint:
        env.append({"name": "HF_ENDPOINT", "value": hf.endpoint})
    if hf.token_secret:
        env.append({"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": hf.token_secret,
                                                                       "key": hf.token_key_ref}}})
    return env


def client_secrets(c: ClientSecrets) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
    """(env, volumes, mounts) of the client credentials: Secret files mounted read-only (owner
    and group only), their paths in ``P2R_CLIENT_*``; nothing when none is set."""
    env: list[dict[str, Any]] = []
    volumes: list[dict[str, Any]] = []
    mounts: list[dict[str, Any]] = []
    if c.tls_secret:
        files = ["ca.crt", *(["tls.crt", "tls.key"] if c.client_cert else [])]
        volumes.append({"name": "client-tls", "secret": {"secretName": c.tls_secret, "defaultMode": 0o440,
                                                         "items": [{"key": f, "path": f} for f in files]}})
        mounts.append({"name": "client-tls", "mountPath": CLIENT_TLS_DIR, "readOnly": True})
        env.append({"name": "P2R_CLIENT_CA_FILE", "value": f"{CLIENT_TLS_DIR}/ca.crt"})
        if c.client_cert:
            env += [{"name": "P2R_CLIENT_CERT_FILE", "value": f"{CLIENT_TLS_DIR}/tls.crt"},
                    {"name": "P2R_CLIENT_KEY_FILE", "value": f"{CLIENT_TLS_DIR}/tls.key"}]
    if c.api_key_secret:
        volumes.append({"name": "client-api-key", "secret": {
            "secretName": c.api_key_secret, "defaultMode": 0o440,
            "items": [{"key": c.api_key_key_ref, "path": "api-key"}]}})
        mounts.append({"name": "client-api-key", "mountPath": CLIENT_API_KEY_DIR, "readOnly": True})
        env.append({"name": "P2R_CLIENT_API_KEY_FILE", "value": f"{CLIENT_API_KEY_DIR}/api-key"})
    return env, volumes, mounts


def container(t: PodTemplate, *, name: str, image: str, pull_policy: str, command: list[str],
              env: list[dict[str, Any]], mounts: list[dict[str, Any]], resources: dict[str, Any] | None = None,
              args: list[str] | None = None, ports: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """One container: the template's security context, HOME/TMPDIR on scratch volumes, the
    Hugging Face settings, the client credentials' env and mounts (their volumes: :func:`pod_spec`)."""
    client_env, _, client_mounts = client_secrets(t.client)
    return _drop_empty({
        "name": name, "image": image, "imagePullPolicy": pull_policy, "command": command, "args": args,
        "ports": ports, "env": [*copy.deepcopy(BASE_ENV), *hf_env(t.hugging_face), *client_env, *env],
        "resources": resources, "securityContext": copy.deepcopy(t.container_security_context),
        "volumeMounts": [*mounts, *client_mounts],
    })


def pod_spec(t: PodTemplate, placement: Placement, containers: list[dict[str, Any]], volumes: list[dict[str, Any]],
             *, restart_policy: str | None = None, service_account: str | None = None) -> dict[str, Any]:
    """The pod spec every training-run pod shares. Service links are off: their
    ``P2R_<SERVICE>_PORT`` variables would land in p2r's ``P2R_*`` settings. The client
    credentials' Secret volumes come last, so the overlays' volume indexes stay put."""
    return _drop_empty({
        "restartPolicy": restart_policy,
        "serviceAccountName": service_account,
        "automountServiceAccountToken": t.api_access,
        "enableServiceLinks": False,
        "securityContext": copy.deepcopy(t.security_context),
        "imagePullSecrets": copy.deepcopy(t.image_pull_secrets),
        "priorityClassName": placement.priority_class_name,
        "nodeSelector": dict(placement.node_selector),
        "tolerations": copy.deepcopy(placement.tolerations),
        "affinity": copy.deepcopy(placement.affinity),
        "containers": containers,
        "volumes": [*volumes, *client_secrets(t.client)[1]],
    })


def _metadata(name: str, namespace: str | None, labels: dict[str, str], t: PodTemplate,
              owner: dict[str, Any] | None) -> dict[str, Any]:
    labels = {**labels, **t.labels}
    if t.queue_name:
        labels[KUEUE_QUEUE_LABEL] = t.queue_name
    meta: dict[str, Any] = {"name": name}
    if namespace:
        meta["namespace"] = namespace
    meta["labels"] = labels
    if owner:
        meta["ownerReferences"] = [copy.deepcopy(owner)]
    return meta


def data_volume(claim: str | None, mount: str, read_only: bool = True) -> tuple[dict[str, Any], dict[str, Any]]:
    """(volume, mount) of the training data: a claim, or an emptyDir when there is none."""
    if claim:
        volume = {"name": "data", "persistentVolumeClaim": _drop_empty({"claimName": claim,
                                                                        "readOnly": read_only or None})}
    else:
        volume = {"name": "data", "emptyDir": {"sizeLimit": "1Gi"}}
    return volume, _drop_empty({"name": "data", "mountPath": mount, "readOnly": read_only or None})


def trainer_resources(resources: dict[str, Any] | None, nproc_per_node: int,
                      gpu_resource: str | None) -> dict[str, Any] | None:
    """A trainer pod's container resources: ``resources`` (CPU, memory: per pod, sized for all its
    ranks) plus, with ``gpu_resource``, one device per training process in requests and limits."""
    out = copy.deepcopy(resources or {})
    if gpu_resource:
        for kind in ("requests", "limits"):
            out[kind] = {**out.get(kind, {}), gpu_resource: nproc_per_node}
    return out or None


def pytorchjob(t: PodTemplate, *, name: str, namespace: str | None, labels: dict[str, str],
               pod_labels: dict[str, str], image: str, pull_policy: str, role: str, config_map: str,
               config_file: str, env: list[dict[str, Any]], resources: dict[str, Any] | None, workers: int,
               data_pvc: str | None, data_mount: str, metrics_port: int | None, restart_policy: str,
               backoff_limit: int, nproc_per_node: int = 1, gpu_resource: str | None = None,
               suspend: bool = False, owner: dict[str, Any] | None = None,
               service_account: str | None = None, data_uri: str | None = None,
               data_env: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """A stage's PyTorchJob: ``workers`` pods (Master + workers-1 Workers) x ``nproc_per_node``
    training processes each (``spec.nprocPerNode``), started by torchrun (:data:`TORCHRUN`) in
    the ``pytorch`` container, which runs ``p2r train`` as its args. With ``gpu_resource`` every
    process has one GPU of the pod (requests = limits = nproc_per_node), so the ranks of a pod talk
    over NVLink and shared memory; only traffic between pods crosses the pod network. The
    reference run is one pod with 4 GPUs (``workers=1, nproc_per_node=4``); multi-node is N pods
    x G GPUs. Rank 0 (in the Master) serves the trainer's metrics on the port named ``metrics``
    (the chart's PodMonitor scrapes it). Volumes in this order (overlays patch them by index):
    config, data, work, tmp, dshm. With ``data_uri`` (``s3://BUCKET/PREFIX``, no claim) an init
    container ``fetch-data`` copies that set into the data volume (``p2r data fetch``, checked
    against its manifest) with ``data_env`` (the S3 endpoint and keys) before training starts."""
    data, data_mount_spec = data_volume(data_pvc, data_mount)
    init: list[dict[str, Any]] = []
    if data_uri and not data_pvc:
        data = {"name": "data", "emptyDir": {"sizeLimit": t.data_size_limit}}
        init = [container(t, name="fetch-data", image=image, pull_policy=pull_policy,
                          command=["p2r", "data", "fetch", data_uri, data_mount], env=copy.deepcopy(data_env or []),
                          mounts=[{"name": "data", "mountPath": data_mount}, {"name": "work", "mountPath": WORK_DIR},
                                  {"name": "tmp", "mountPath": "/tmp"}],
                          resources={"requests": {"cpu": "250m", "memory": "512Mi"}, "limits": {"memory": "1Gi"}})]
    shm = t.shm_size_limit or f"{SHM_GIB_PER_PROCESS * nproc_per_node}Gi"
    volumes = [{"name": "config", "configMap": {"name": config_map}}, data,
               {"name": "work", "emptyDir": {"sizeLimit": t.work_size_limit}},
               {"name": "tmp", "emptyDir": {"sizeLimit": t.tmp_size_limit}},
               # NCCL between local ranks, PyTorch's data workers and the engine use /dev/shm; the
               # container default (64 MiB) is too small. Memory-backed: counted in the pod's memory.
               {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": shm}}]
    mounts = [{"name": "config", "mountPath": TRAIN_CONFIG_DIR, "readOnly": True}, data_mount_spec,
              {"name": "work", "mountPath": WORK_DIR}, {"name": "tmp", "mountPath": "/tmp"},
              {"name": "dshm", "mountPath": "/dev/shm"}]
    args = ["train", "--role", role, "--config", f"{TRAIN_CONFIG_DIR}/{config_file}", "--resume", "auto"]
    pod_resources = with_scratch(trainer_resources(resources, nproc_per_node, gpu_resource), volumes)

    def replica(replicas: int, master: bool) -> dict[str, Any]:
        ports = [{"name": "pytorchjob-port", "containerPort": MASTER_PORT, "protocol": "TCP"}]
        if master and metrics_port:
            ports.append({"name": "metrics", "containerPort": metrics_port, "protocol": "TCP"})
        c = container(t, name="pytorch", image=image, pull_policy=pull_policy, command=list(TORCHRUN),
                      args=list(args), env=copy.deepcopy(env), mounts=copy.deepcopy(mounts),
                      resources=copy.deepcopy(pod_resources), ports=ports)
        spec = pod_spec(t, t.trainer, [c], copy.deepcopy(volumes), service_account=service_account)
        if init:
            spec["initContainers"] = copy.deepcopy(init)
        return {"replicas": replicas, "restartPolicy": restart_policy,
                "template": {"metadata": {"labels": {**pod_labels, **t.labels}}, "spec": spec}}

    specs = {"Master": replica(1, True)}
    if workers > 1:
        specs["Worker"] = replica(workers - 1, False)
    return {
        "apiVersion": "kubeflow.org/v1", "kind": "PyTorchJob",
        "metadata": _metadata(name, namespace, labels, t, owner),
        "spec": {"runPolicy": {"cleanPodPolicy": "None", "backoffLimit": backoff_limit,
                               "suspend": bool(suspend or t.queue_name)},
                 # a string in the CRD (it also takes auto / cpu / gpu); torchrun reads it as PET_NPROC_PER_NODE
                 "nprocPerNode": str(nproc_per_node),
                 "pytorchReplicaSpecs": specs},
    }


def eval_job(t: PodTemplate, *, name: str, namespace: str | None, labels: dict[str, str],
             pod_labels: dict[str, str], image: str, pull_policy: str, command: list[str], args: list[str] | None,
             env: list[dict[str, Any]], resources: dict[str, Any] | None, data_pvc: str | None,
             data_mount: str | None, restart_policy: str, backoff_limit: int, suspend: bool = False,
             ttl_seconds: int | None = None, owner: dict[str, Any] | None = None,
             service_account: str | None = None) -> dict[str, Any]:
    """The evaluation Job: one ``eval`` container running ``p2r eval`` against the role services
    (no GPU of its own), with ``resources`` (default :data:`EVAL_RESOURCES`) and the
    ephemeral-storage of its scratch volumes. Volumes: data (when a claim is given), work, tmp."""
    volumes, mounts = [], []
    if data_pvc and data_mount:
        volume, mount = data_volume(data_pvc, data_mount)
        volumes.append(volume)
        mounts.append(mount)
    volumes += [{"name": "work", "emptyDir": {"sizeLimit": t.eval_work_size_limit}},
                {"name": "tmp", "emptyDir": {"sizeLimit": t.tmp_size_limit}}]
    mounts += [{"name": "work", "mountPath": WORK_DIR}, {"name": "tmp", "mountPath": "/tmp"}]
    c = container(t, name="eval", image=image, pull_policy=pull_policy, command=command, args=args, env=env,
                  mounts=mounts, resources=with_scratch(resources or EVAL_RESOURCES, volumes))
    spec = _drop_empty({"suspend": bool(suspend or t.queue_name), "backoffLimit": backoff_limit,
                        "ttlSecondsAfterFinished": ttl_seconds})
    spec["template"] = {"metadata": {"labels": {**pod_labels, **t.labels}},
                        "spec": pod_spec(t, t.eval, [c], volumes, restart_policy=restart_policy,
                                         service_account=service_account)}
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": _metadata(name, namespace, labels, t, owner),
            "spec": spec}


def owner_reference(obj: dict[str, Any]) -> dict[str, Any]:
    """An ownerReference to ``obj`` (as read from the API): deleting it (``helm uninstall``)
    makes the garbage collector delete what it owns. ``blockOwnerDeletion`` stays off: it needs
    update rights on the owner's finalizers and nothing here must hold a deletion up."""
    meta = obj["metadata"]
    return {"apiVersion": obj.get("apiVersion") or "v1", "kind": obj.get("kind") or "ConfigMap",
            "name": meta["name"], "uid": meta["uid"], "controller": False, "blockOwnerDeletion": False}

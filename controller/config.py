"""``pipeline.yaml``: what one P2R pipeline run trains, where it stores checkpoints, and how it
retries. Validated completely before anything starts, so a typo fails in a second with one line,
not an hour into stage 1.

Credentials are never part of this file (it is checked into repositories and printed in bug
reports): S3 keys come from the environment (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
``P2R_S3_ENDPOINT``) locally and from a Kubernetes Secret (named here, never inlined) in the
cluster. Keys that look like credentials are refused with a message saying so.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from p2r.controller.pods import PodTemplate
from p2r.core.errors import UserError
from p2r.services.config import ServeConfig
from p2r.trainer.config import TrainConfig

NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,38}[a-z0-9])?$")
"""Run names become Kubernetes object names (``RUN-stage1-2``, ``p2r-pipeline-RUN``): DNS-1123
labels, short enough that every derived name stays under 63 characters."""

SECRET_KEY = re.compile(r"(^|_)(password|passwd|secret_key|access_key|access_key_id|secret_access_key|token|api_key|"
                        r"credentials?)$", re.IGNORECASE)

# Fields of TrainConfig the controller sets itself: a stage section may not override them.
CONTROLLED_TRAIN_FIELDS = {"role", "model", "data", "image_prefix", "output", "workdir", "reasoner_endpoint",
                           "perceiver_endpoint", "verifier_endpoint", "metrics_port"}
CONTROLLED_SERVE_FIELDS = {"roles", "model", "host", "port", "metrics_port", "http_port", "perceiver_endpoint",
                           "reasoner_endpoint", "checkpoint_cache"}


class ConfigError(UserError):
    """A pipeline config that cannot run; the message names the field."""


def _find_secrets(node: Any, path: str = "") -> str | None:
    """The dotted path of the first key that looks like a credential, else None."""
    if isinstance(node, dict):
        for key, value in node.items():
            here = f"{path}.{key}" if path else str(key)
            if SECRET_KEY.search(str(key)):
                return here
            found = _find_secrets(value, here)
            if found:
                return found
    elif isinstance(node, list):
        for i, value in enumerate(node):
            found = _find_secrets(value, f"{path}[{i}]")
            if found:
                return found
    return None


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Retry(Strict):
    """Per-step retries: attempt k+1 starts ``min(backoff_max_s, backoff_s * 2**(k-1))`` after
    attempt k failed; after ``max_attempts`` failures the pipeline stops with the last error."""

    max_attempts: int = Field(3, ge=1)
    backoff_s: float = Field(10.0, ge=0)
    backoff_max_s: float = Field(600.0, ge=0)

    def delay(self, failed_attempts: int) -> float:
        return min(self.backoff_max_s, self.backoff_s * 2 ** max(0, failed_attempts - 1))


class Prepare(Strict):
    """Local bootstrap: build the tiny model and synthetic sets when they are missing (the README
    main command runs from a fresh checkout)."""

    tiny_model: bool = Field(False, description="write the tiny Qwen3-VL checkpoint at base_model if absent")
    train_samples: int = Field(0, ge=0, description="write this many synthetic samples at data's folder if absent")
    eval_samples: int = Field(0, ge=0, description="write this many synthetic samples at eval.data if absent")
    task: str = Field("objects", description="which synthetic task (p2r.data.synth.TASKS) the prepared sets hold")
    pretrain: dict[str, Any] | None = Field(
        None, description="with tiny_model: train the tiny model supervised on the dot task first "
        "(p2r.models.pretrain.PretrainConfig fields; {} for the defaults), the stand-in for an instruction-tuned "
        "base; cached by the digest of its inputs. null: the random tiny model")
    pretrain_time_budget_s: float = Field(600.0, gt=0, description="the pretraining stops after this long")
    seed: int = 0

    @field_validator("task")
    @classmethod
    def _task(cls, value: str) -> str:
        from p2r.data.synth import TASKS

        if value not in TASKS:
            raise ValueError(f"unknown synthetic task {value!r} (expected one of: {', '.join(TASKS)})")
        return value

    @model_validator(mode="after")
    def _pretrain(self) -> Prepare:
        if self.pretrain is not None:
            if not self.tiny_model:
                raise ValueError("pretrain trains the tiny model: set tiny_model: true")
            from p2r.models.pretrain import PretrainConfig

            try:
                PretrainConfig(**self.pretrain)
            except TypeError as e:
                raise ValueError(f"pretrain: {e}") from None
        return self


MATRIX_ROWS: dict[str, tuple[str, str, str, str]] = {
    "base-default": ("base / default", "default", "base", "base"),
    "base-p2r": ("base / p2r", "p2r", "base", "base"),
    "stage1-base-p2r": ("stage-1 perceiver + base reasoner / p2r", "p2r", "base", "stage1"),
    "final-default": ("final / default", "default", "final", "final"),
    "final-p2r": ("final / p2r", "p2r", "final", "final"),
}
"""The evaluation matrix that measures the P2R claim: row name (its folder under the eval output)
-> (label, mode, answering model, perceiver model); models are ``base`` (base_model), ``stage1``
(the verified stage-1 checkpoint) and ``final`` (the verified stage-2 one). In this order the
rows of one checkpoint follow each other, so the shared engine reloads weights least."""


class Eval(Strict):
    """The evaluation step: ``p2r eval`` on the final checkpoint (both roles, as in production),
    or the evaluation matrix (``matrix``) that compares it with the base model and stage 1."""

    task: str = "synthetic"
    grade_free_form: bool = Field(
        True, description="grade free_form answers with the running verifier service (--verifier-endpoint)")
    args: list[str] = Field(default_factory=list, description="extra p2r eval flags (e.g. --max-new-tokens 32)")
    data: str | None = Field(None, description="DIR for --data; default: the folder of the training parquet")
    mode: Literal["default", "thinking", "p2r"] = Field("p2r", description="the single evaluation's mode (the "
                                                        "matrix rows name their own)")
    matrix: bool | list[str] | None = Field(
        None, description="evaluate the matrix rows (MATRIX_ROWS: base-default, base-p2r, stage1-base-p2r, "
        "final-default, final-p2r) in one p2r eval into EVAL/ROW/, and report them with the training curves: "
        "true (all), a list of row names, false (the single evaluation); default: true on backend local")
    limit: int | None = Field(None, ge=1)
    timeout_s: float = Field(3600.0, gt=0)

    @field_validator("matrix")
    @classmethod
    def _rows(cls, value: bool | list[str] | None) -> bool | list[str] | None:
        if isinstance(value, list):
            unknown = [r for r in value if r not in MATRIX_ROWS]
            if unknown:
                raise ValueError(f"unknown row {unknown[0]!r} (rows: {', '.join(MATRIX_ROWS)})")
            if not value:
                raise ValueError("an empty list: use false for the single evaluation")
        return value

    def matrix_rows(self, backend: str) -> list[str]:
        """The matrix rows this run evaluates, in MATRIX_ROWS order; [] for the single evaluation."""
        chosen = self.matrix if self.matrix is not None else backend == "local"
        if chosen is True:
            return list(MATRIX_ROWS)
        return [r for r in MATRIX_ROWS if r in chosen] if isinstance(chosen, list) else []


class Kubernetes(Strict):
    """Where and how the Kubernetes backend runs the steps. ``deployments`` are the chart's role
    Deployments: the controller never writes them. A run serves each role from its own Deployment,
    built from the chart's pod template, except the roles ``serving_roles`` names, whose chart
    Deployment it loads in place (``Admin.LoadCheckpoint``; see kube.py)."""

    namespace: str = "default"
    kubeconfig: str | None = Field(None, description="kubeconfig file; default: in-cluster, then ~/.kube/config")
    context: str | None = None
    image: str = Field("p2r-platform:latest", description="image with the p2r command (trainer and eval)")
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"
    service_account: str | None = None
    deployments: dict[str, str] = Field(
        default_factory=lambda: {"reasoner": "p2r-reasoner", "perceiver": "p2r-perceiver", "verifier": "p2r-verifier"},
        description="role -> Deployment name (a Service of the same name fronts it)")
    server_container: str = Field("serve", description="container of the role Deployments that runs p2r serve")
    serving_roles: list[Literal["reasoner", "perceiver", "verifier"]] = Field(
        default_factory=list, description="roles whose chart Deployment (the pods users call) a run loads its "
        "checkpoints into, in place; every other role gets the run's own Deployment (the default: none)")
    admin_port: int = Field(50052, ge=1, le=65535, description="role servers' admin gRPC port (LoadCheckpoint), "
                            "where the pod does not name a port 'admin'")
    admin_timeout_s: float = Field(30.0, gt=0, description="deadline of an admin Status call")
    load_timeout_s: float = Field(3600.0, gt=0, description="how long the replicas of a role may take to be "
                                  "ready and load a checkpoint (downloads included)")
    grpc_port: int = Field(50051, ge=1, le=65535)
    cluster_domain: str = Field(
        "cluster.local", pattern=r"^[a-z0-9.-]+$",  # as the chart's schema (clusterDomain)
        description="the cluster's DNS domain: pods call the roles at dns:///NAME.NAMESPACE.svc.DOMAIN:grpc_port "
                    "(the chart's clusterDomain)")
    s3_endpoint: str | None = Field(None, description="host:port pods reach S3 at; default: the controller's "
                                                      "P2R_S3_ENDPOINT")
    s3_secure: bool = False
    s3_secret: str | None = Field(None, description="Secret holding the S3 keys (the chart's); pods read them "
                                                   "through secretKeyRef, nothing is copied")
    s3_access_key_ref: str = Field("AWS_ACCESS_KEY_ID", description="key of the access key id in s3_secret")
    s3_secret_key_ref: str = Field("AWS_SECRET_ACCESS_KEY", description="key of the secret key in s3_secret")
    env: dict[str, str] = Field(default_factory=dict, description="extra plain env for trainer and eval pods")
    workers: int = Field(1, ge=1, description="PyTorchJob pods (nodes) per stage: 1 Master + (workers-1) "
                                              "Workers, each running nproc_per_node training processes")
    nproc_per_node: int = Field(1, ge=1, description="training processes per pod, started by torchrun "
                                "(spec.nprocPerNode); the reference run is 1 pod x 4 (one GPU each)")
    gpu_resource: str | None = Field(None, pattern=r"^([a-z0-9.-]+/)?[a-z0-9]([a-z0-9._-]*[a-z0-9])?$",
                                     description="device each training process gets one of (nvidia.com/gpu): "
                                     "trainer pods request and are limited to nproc_per_node of it; null: CPU "
                                     "training (gloo)")
    trainer_metrics_port: int | None = Field(9090, ge=1, le=65535, description="rank 0's Prometheus port (the "
                                             "chart's PodMonitor scrapes the port named metrics); null disables")
    resources: dict[str, Any] = Field(default_factory=dict, description="container resources of a trainer pod "
                                      "(CPU, memory for all its nproc_per_node ranks); GPUs come from gpu_resource")
    eval_resources: dict[str, Any] = Field(default_factory=dict)
    data_pvc: str | None = Field(None, description="PersistentVolumeClaim mounted at data_mount in every pod")
    data_mount: str = "/data"
    pod: PodTemplate = Field(default_factory=PodTemplate, description="security, placement, Kueue queue and "
                             "labels of the trainer and eval pods (controller/pods.py)")
    owner_config_map: str | None = Field(
        None, description="ConfigMap (the chart's pipeline.yaml) that owns every object the controller creates: "
                          "deleting it (helm uninstall) garbage-collects the jobs, their pods and the run state")
    inputs_poll_s: float = Field(30.0, gt=0, description="how often missing inputs (models, data claim, "
                                                         "PyTorchJob CRD) are checked again")
    poll_s: float = Field(5.0, gt=0)
    rollout_timeout_s: float = Field(1800.0, gt=0)
    job_timeout_s: float = Field(7 * 86400.0, gt=0)

    @model_validator(mode="after")
    def _layout(self) -> Kubernetes:
        """The GPUs of a trainer pod follow from nproc_per_node and gpu_resource, nowhere else: a
        GPU count in ``resources`` could disagree with the processes torchrun starts."""
        for kind, values in self.resources.items():
            for key in values if isinstance(values, dict) else ():
                if key == self.gpu_resource or str(key).endswith("/gpu"):
                    raise ValueError(f"resources.{kind}.{key}: a trainer pod's GPUs are set by nproc_per_node "
                                     "(one per process) and gpu_resource; remove it")
        return self

    @field_validator("deployments")
    @classmethod
    def _roles(cls, value: dict[str, str]) -> dict[str, str]:
        missing = {"reasoner", "perceiver", "verifier"} - set(value)
        if missing:
            raise ValueError(f"needs a Deployment for {', '.join(sorted(missing))}")
        return value


class PipelineConfig(Strict):
    """One pipeline run. Paths are resolved against the working directory at load time."""

    name: str = Field(description="run name: state, job names and checkpoint prefixes derive from it")
    backend: Literal["local", "kubernetes"] = "local"
    base_model: str = Field(description="stage 1's start and the frozen reasoner (dir, file:// or s3://)")
    verifier_model: str | None = Field(None, description="grades free_form answers; default base_model")
    data: str = Field(description="training parquet (P2R-10k layout): a path as the trainer sees it, or (kubernetes) "
                                  "s3://BUCKET/PREFIX/FILE.parquet, a set written by `p2r data upload` that every "
                                  "trainer pod fetches into kubernetes.data_mount first and eval reads from S3")
    image_prefix: str | None = None
    storage: str = Field(description="checkpoint root: a directory, file:// or s3://BUCKET[/PREFIX]; "
                                     "checkpoints land in STORAGE/NAME/stage1/step-N/")
    workdir: str = Field("p2r-pipeline", description="local: state, logs, configs, service caches")
    stage1: dict[str, Any] = Field(default_factory=dict, description="p2r train settings of stage 1 (perceiver)")
    stage2: dict[str, Any] = Field(default_factory=dict, description="p2r train settings of stage 2 (reasoner)")
    baseline: dict[str, Any] | None = Field(
        None, description="p2r train settings of the optional plain-GRPO baseline (role baseline: from "
        "base_model, the original image, the no-evidence reasoner prompt, its own answer graded) on the same "
        "data, to compare P2R with vanilla GRPO; checkpoints in STORAGE/NAME/baseline/. null: not run")
    serve: dict[str, Any] = Field(default_factory=dict, description="p2r serve settings of the local role servers")
    eval: Eval = Field(default_factory=Eval)
    retry: Retry = Field(default_factory=Retry)
    prepare: Prepare | None = None
    kubernetes: Kubernetes = Field(default_factory=Kubernetes)
    metrics_port: int | None = Field(None, ge=0, le=65535, description="controller Prometheus endpoint")
    step_timeout_s: float = Field(7 * 86400.0, gt=0, description="local: a trainer running longer is killed")

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not NAME_RE.match(value):
            raise ValueError("must be lower-case letters, digits and '-', at most 40 characters")
        return value

    @field_validator("storage")
    @classmethod
    def _storage(cls, value: str) -> str:
        if "://" in value and not value.startswith(("s3://", "file://")):
            raise ValueError("use a directory, file:// or s3://BUCKET[/PREFIX]")
        if value.startswith("s3://") and not value[5:].strip("/"):
            raise ValueError("s3:// needs a bucket")
        return value.rstrip("/")

    @model_validator(mode="after")
    def _backend(self) -> PipelineConfig:
        if self.backend == "kubernetes":
            if self.prepare is not None:
                raise ValueError("prepare builds local files: use it with backend: local only")
            if not self.storage.startswith("s3://"):
                raise ValueError("backend: kubernetes needs storage: s3://BUCKET (pods cannot see local paths)")
        if self.data.startswith("s3://"):
            if self.backend != "kubernetes":
                raise ValueError("data: s3:// is fetched by the trainer pods: use it with backend: kubernetes")
            if self.kubernetes.data_pvc:
                raise ValueError("data is s3://, so the pods fetch it into kubernetes.data_mount: set "
                                 "kubernetes.data_pvc to null")
            if "/" not in self.data[5:].strip("/") or not self.data.endswith(".parquet"):
                raise ValueError("data: expected s3://BUCKET/PREFIX/FILE.parquet")
        elif "://" in self.data:
            raise ValueError("data: use a path as the pods see it or s3://BUCKET/PREFIX/FILE.parquet")
        return self

    @model_validator(mode="after")
    def _stages(self) -> PipelineConfig:
        for section, fields, known in (("stage1", CONTROLLED_TRAIN_FIELDS, TrainConfig.model_fields),
                                       ("stage2", CONTROLLED_TRAIN_FIELDS, TrainConfig.model_fields),
                                       ("baseline", CONTROLLED_TRAIN_FIELDS, TrainConfig.model_fields),
                                       ("serve", CONTROLLED_SERVE_FIELDS, ServeConfig.model_fields)):
            values: dict[str, Any] = getattr(self, section) or {}
            for key in values:
                if key in fields:
                    raise ValueError(f"{section}.{key} is set by the pipeline, remove it")
                if key not in known:
                    raise ValueError(f"{section}.{key}: unknown setting")
        return self

    # ----------------------------------------------------------------------------- derived

    @property
    def run_root(self) -> str:
        """``STORAGE/NAME``: every URI of this run lives under it."""
        return f"{self.storage}/{self.name}"

    def stage_root(self, stage: str) -> str:
        return f"{self.run_root}/{stage}"

    @property
    def eval_out(self) -> str:
        return f"{self.run_root}/eval"

    @property
    def verifier(self) -> str:
        return self.verifier_model or self.base_model

    @property
    def data_source(self) -> str | None:
        """``s3://BUCKET/PREFIX`` the trainer pods fetch the data set from (data is s3://), else None."""
        return self.data.rsplit("/", 1)[0] if self.data.startswith("s3://") else None

    @property
    def trainer_data(self) -> str:
        """The parquet as ``p2r train`` sees it: ``data``, or its copy under kubernetes.data_mount."""
        if self.data_source:
            return f"{self.kubernetes.data_mount.rstrip('/')}/{self.data.rsplit('/', 1)[1]}"
        return self.data

    @property
    def eval_data(self) -> str:
        if self.eval.data:
            return self.eval.data
        if "://" in self.data:  # Path() would fold s3://b into s3:/b
            return self.data.rsplit("/", 1)[0]
        return str(Path(self.data).parent)

    @property
    def workdir_path(self) -> Path:
        return Path(self.workdir)

    def train_config(self, stage: str, role: str, model: str, endpoints: dict[str, str],
                     workdir: str) -> dict[str, Any]:
        """The ``p2r train`` YAML of one stage: the stage section plus what the pipeline decides.
        Validated with the trainer's own model so a bad value fails before any job starts."""
        values: dict[str, Any] = {
            **getattr(self, stage), "role": role, "model": model, "data": self.trainer_data,
            "output": self.stage_root(stage), "workdir": workdir, **{f"{r}_endpoint": e for r, e in endpoints.items()},
        }
        if self.image_prefix:
            values["image_prefix"] = self.image_prefix
        TrainConfig.model_validate(values)
        return values


def _one_line(error: Any, prefix: str = "") -> str:
    """The first problem of a pydantic ValidationError as ``field.path: what is wrong``."""
    first = error.errors()[0]
    where = ".".join([prefix, *(str(p) for p in first["loc"])] if prefix else [str(p) for p in first["loc"]])
    message = str(first["msg"]).removeprefix("Value error, ")
    return f"{where}: {message}" if where else message


def _absolute(value: str) -> str:
    """Local paths are resolved now: the trainer and servers run in other working directories."""
    if "://" in value:
        return value
    return str(Path(value).expanduser().resolve())


def load_pipeline_config(path: Path) -> PipelineConfig:
    """Parse and validate ``path``; ConfigError with one line naming the field on any problem."""
    from pydantic import ValidationError

    if not path.is_file():
        raise ConfigError(f"--config: no such file {path}")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of settings")
    secret = _find_secrets(raw)
    if secret:
        raise ConfigError(f"{secret}: credentials do not belong in the pipeline config; set them in the "
                          "environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY) or a Kubernetes Secret "
                          "(kubernetes.s3_secret)")
    try:
        config = PipelineConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_one_line(e)) from None
    if config.backend == "local":
        updates: dict[str, Any] = {"workdir": _absolute(config.workdir), "storage": _absolute(config.storage),
                                   "base_model": _absolute(config.base_model), "data": _absolute(config.data)}
        for key in ("verifier_model", "image_prefix"):
            if getattr(config, key):
                updates[key] = _absolute(getattr(config, key))
        if config.eval.data:
            updates["eval"] = config.eval.model_copy(update={"data": _absolute(config.eval.data)})
        config = config.model_copy(update=updates)
        prep = config.prepare
        if "://" not in config.base_model and not Path(config.base_model).exists() and not (prep and prep.tiny_model):
            raise ConfigError(f"base_model: no such directory {config.base_model}")
        if not Path(config.data).is_file() and not (prep and prep.train_samples):
            raise ConfigError(f"data: no such file {config.data}")
    # Trainer settings fail now, with the trainer's own validation, not when the stage starts.
    stages = [("stage1", "perceiver", "reasoner"), ("stage2", "reasoner", "perceiver")]
    if config.baseline is not None:
        stages.append(("baseline", "baseline", None))
    for stage, role, endpoint in stages:
        try:
            endpoints = {"verifier": "x:1", **({endpoint: "x:1"} if endpoint else {})}
            config.train_config(stage, role, config.base_model, endpoints, "w")
        except ValidationError as e:
            raise ConfigError(_one_line(e, stage)) from None
    return config

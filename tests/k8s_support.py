"""Shared helpers of the Kubernetes packaging tests: render the chart with the real Helm engine,
build kustomize overlays with the real kubectl, and validate every object strictly.

Why strict, and why custom schemas: ``kubernetes-validate --strict`` rejects unknown fields of
built-in kinds but passes custom resources silently (it has no schema for them). PyTorchJobs are
therefore checked against a schema built from the training operator's generated SDK models
(kubeflow-training) and kubernetes-validate's strict Kubernetes schemas, closed to unknown keys so
a misspelt key fails, plus the rules the training operator's webhook enforces. Nothing here reads
outside the repository.
The Prometheus Operator CRDs are not on this machine: ``MONITORING_SCHEMAS`` transcribes, from
the prometheus-operator API reference (monitoring.coreos.com/v1), the fields of ServiceMonitor,
PodMonitor and PrometheusRule that the chart can emit, closed to unknown keys the same way.
"""

from __future__ import annotations

import functools
import json
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
import jsonschema
import kubernetes_validate
import yaml

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "charts" / "p2r"
MANIFESTS = ROOT / "manifests"
KUBECTL = ROOT / ".venv" / "bin" / "kubectl"

# The newest release kubernetes-validate bundles and the oldest the chart supports (kubeVersion
# >=1.27: gRPC probes went GA there).
KUBE_VERSIONS = ("1.27.0", "1.37.0")
RELEASE, NAMESPACE = "p2r", "p2r"
ROLES = ("perceiver", "reasoner", "verifier", "gateway")


# ----------------------------------------------------------------------------------- render


@functools.cache
def _chart() -> Any:
    import helm_python

    return helm_python.Chart.load(str(CHART))


def profiles() -> dict[str, dict[str, Any]]:
    """The chart's documented value profiles: the defaults and every ci/*-values.yaml."""
    out: dict[str, dict[str, Any]] = {"default": {}}
    for path in sorted((CHART / "ci").glob("*-values.yaml")):
        out[path.name.removesuffix("-values.yaml")] = yaml.safe_load(path.read_text()) or {}
    return out


def render(values: dict[str, Any] | None = None, *, hooks: bool = True) -> list[dict[str, Any]]:
    """Every object the chart renders for ``values`` (NOTES.txt excluded), via the Helm library."""
    rendered = _chart().render(values or {}, name=RELEASE, namespace=NAMESPACE, is_install=True)
    docs: list[dict[str, Any]] = []
    for path, text in sorted(rendered.items()):
        if path.endswith("NOTES.txt"):
            continue
        for doc in yaml.safe_load_all(text):
            if doc:
                docs.append(doc)
    if not hooks:
        docs = [d for d in docs if "helm.sh/hook" not in d["metadata"].get("annotations", {})]
    return docs


def merged_values(values: dict[str, Any] | None = None) -> dict[str, Any]:
    """The values a release would use (chart defaults coalesced with ``values``)."""
    return _chart().merge_values(values or {})


def kustomize(overlay: str) -> list[dict[str, Any]]:
    """``kubectl kustomize manifests/overlays/<overlay>`` parsed into objects."""
    out = subprocess.run([str(KUBECTL), "kustomize", str(MANIFESTS / "overlays" / overlay)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def find(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]


def one(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = find(docs, kind, name)
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
    return found[0]


def pod_specs(docs: list[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(object name, pod spec) of every workload: Deployments, StatefulSets, Jobs, PyTorchJob replicas."""
    for d in docs:
        name = f"{d['kind']}/{d['metadata']['name']}"
        if d["kind"] in ("Deployment", "StatefulSet", "Job"):
            yield name, d["spec"]["template"]["spec"]
        elif d["kind"] == "PyTorchJob":
            for replica, spec in d["spec"]["pytorchReplicaSpecs"].items():
                yield f"{name}/{replica}", spec["template"]["spec"]


def containers(spec: dict[str, Any]) -> list[dict[str, Any]]:
    return [*spec.get("initContainers", []), *spec["containers"]]


def pod_security_errors(name: str, spec: dict[str, Any]) -> list[str]:
    """Where a pod spec falls short of the security every P2R pod meets (PSA "restricted" and
    more): non-root, RuntimeDefault seccomp, no Service links, and per container a read-only
    root, no privilege escalation, every capability dropped and none added, a writable /tmp.
    The one check for the chart's pods, the manifests' and the pods the controller creates."""
    errors = []
    sc = spec.get("securityContext") or {}
    if sc.get("runAsNonRoot") is not True:
        errors.append(f"{name}: securityContext.runAsNonRoot is not true")
    if sc.get("seccompProfile") != {"type": "RuntimeDefault"}:
        errors.append(f"{name}: securityContext.seccompProfile is {sc.get('seccompProfile')}, not RuntimeDefault")
    if spec.get("enableServiceLinks") is not False:  # P2R_<SERVICE>_PORT would reach p2r's P2R_* settings
        errors.append(f"{name}: enableServiceLinks is not false")
    for c in containers(spec):
        where, csc = f"{name}/{c['name']}", c.get("securityContext") or {}
        if csc.get("readOnlyRootFilesystem") is not True:
            errors.append(f"{where}: readOnlyRootFilesystem is not true")
        if csc.get("allowPrivilegeEscalation") is not False:
            errors.append(f"{where}: allowPrivilegeEscalation is not false")
        caps = csc.get("capabilities") or {}
        if caps.get("drop") != ["ALL"] or caps.get("add"):
            errors.append(f"{where}: capabilities are {caps}, not drop [ALL] with nothing added")
        if "/tmp" not in {m["mountPath"] for m in c.get("volumeMounts", [])}:
            errors.append(f"{where}: no writable /tmp volume under the read-only root")
    return errors


# ------------------------------------------------------------------------------- validation


# The kubeflow.org/v1 types, from the training operator's own generated Python SDK
# (kubeflow-training, a project dependency): every model lists its fields with their JSON names
# and types. Kubernetes types they embed (the pod template, ObjectMeta, Quantity, ...) resolve to
# kubernetes-validate's strict schemas of the same Kubernetes release, so a PyTorchJob's pod
# template is checked exactly as a Deployment's is. Every object is closed to unknown keys.
_SCALARS: dict[str, dict[str, Any]] = {"str": {"type": "string"}, "int": {"type": "integer"},
                                       "bool": {"type": "boolean"}, "float": {"type": "number"},
                                       "datetime": {"type": "string"}, "object": {}}
_K8S_GROUPED = re.compile(r"^K8sIoApi([A-Z][a-z]+)(V\d+(?:(?:alpha|beta)\d+)?)([A-Z]\w*)$")


def _k8s_definition(name: str, definitions: dict[str, Any]) -> str:
    """The kubernetes-validate definition key of an SDK type name such as ``V1PodTemplateSpec``
    or ``K8sIoApiAutoscalingV2MetricSpec``; exactly one must match, or the schema is not built."""
    if name == "Quantity":
        suffix = ".pkg.api.resource.Quantity"
    elif m := _K8S_GROUPED.match(name):
        suffix = f".api.{m.group(1).lower()}.{m.group(2).lower()}.{m.group(3)}"
    elif m := re.match(r"^(V\d+(?:(?:alpha|beta)\d+)?)([A-Z]\w*)$", name):
        suffix = f".{m.group(1).lower()}.{m.group(2)}"
    else:
        raise LookupError(f"not a Kubernetes type name: {name}")
    found = [k for k in definitions if k.endswith(suffix)]
    if len(found) != 1:
        raise LookupError(f"{name}: {len(found)} Kubernetes definitions end with {suffix}: {found}")
    return found[0]


def _sdk_schema(type_name: str, definitions: dict[str, Any]) -> dict[str, Any]:
    """JSON schema of one SDK type string (``'dict(str, KubeflowOrgV1ReplicaSpec)'``, ...)."""
    import inspect

    from kubeflow.training import models

    if type_name in _SCALARS:
        return dict(_SCALARS[type_name])
    if m := re.fullmatch(r"list\[(.+)\]", type_name):
        return {"type": "array", "items": _sdk_schema(m.group(1), definitions)}
    if m := re.fullmatch(r"dict\(str, (.+)\)", type_name):
        return {"type": "object", "additionalProperties": _sdk_schema(m.group(1), definitions)}
    if not type_name.startswith("KubeflowOrgV1"):  # a Kubernetes type the SDK re-exports
        return {"$ref": f"/api/_definitions.json#/$defs/{_k8s_definition(type_name, definitions)}"}
    model = getattr(models, type_name)
    properties, required = {}, []
    for attr, sub in model.openapi_types.items():
        key = model.attribute_map[attr]
        properties[key] = _sdk_schema(sub, definitions)
        # The generator makes a setter reject None exactly for the fields the API requires.
        if "must not be `None`" in inspect.getsource(getattr(model, attr).fset):
            required.append(key)
    schema: dict[str, Any] = {"type": "object", "properties": properties, "additionalProperties": False}
    if required:
        schema["required"] = required
    return schema


@functools.cache
def _kube_definitions(version: str) -> tuple[Any, dict[str, Any]]:
    """(referencing registry, definitions) of kubernetes-validate's strict schemas for ``version``."""
    from referencing import Registry, Resource

    folder = Path(kubernetes_validate.__file__).parent / "kubernetes-json-schema"
    wanted = tuple(int(x) for x in version.split(".")[:2])
    available = sorted(tuple(int(x) for x in p.name[1:].split("-")[0].split(".")[:2])
                       for p in folder.glob("v*-local-strict"))
    best = max(v for v in available if v <= wanted)
    text = (folder / f"v{best[0]}.{best[1]}.0-local-strict" / "_definitions.json").read_text()
    contents = json.loads(text)
    return Resource.from_contents(contents) @ Registry(), contents["$defs"]


@functools.cache
def pytorchjob_schema(version: str = KUBE_VERSIONS[-1]) -> dict[str, Any]:
    """kubeflow.org/v1 PyTorchJob, closed to unknown keys, with Kubernetes ``version``'s types."""
    _, definitions = _kube_definitions(version)
    schema = _sdk_schema("KubeflowOrgV1PyTorchJob", definitions)
    schema["properties"]["apiVersion"] = {"const": "kubeflow.org/v1"}
    schema["properties"]["kind"] = {"const": "PyTorchJob"}
    schema["required"] = ["apiVersion", "kind", "metadata", "spec"]
    # Beside kubernetes-validate's own schemas, so their "/api/_definitions.json" refs resolve.
    schema["$id"] = "https://kubernetes.io/api/pytorchjob-kubeflow/v1"
    return schema


def pytorchjob_errors(job: dict[str, Any], version: str = KUBE_VERSIONS[-1]) -> list[str]:
    """Schema errors plus the training operator webhook's rules (no schema encodes them)."""
    registry, _ = _kube_definitions(version)
    validator = jsonschema.Draft202012Validator(pytorchjob_schema(version), registry=registry)
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(job)]
    specs = job.get("spec", {}).get("pytorchReplicaSpecs", {})
    for replica, spec in specs.items():
        if replica not in ("Master", "Worker"):
            errors.append(f"pytorchReplicaSpecs: unknown replica type {replica} (Master / Worker only)")
        if spec.get("restartPolicy") not in (None, "Always", "OnFailure", "Never", "ExitCode"):
            errors.append(f"{replica}.restartPolicy: {spec.get('restartPolicy')}")
        pod_containers = spec.get("template", {}).get("spec", {}).get("containers", [])
        names = [c.get("name") for c in pod_containers]
        pytorch = [c for c in pod_containers if c.get("name") == "pytorch"]
        if not pytorch or not pytorch[0].get("image"):
            errors.append(f"{replica}: needs a container named 'pytorch' with an image (has {names})")
    if "Master" in specs and specs["Master"].get("replicas", 1) != 1:
        errors.append("Master.replicas must be 1")
    return errors


_DURATION = {"type": "string",
             "pattern": r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"}
_STRMAP = {"type": "object", "additionalProperties": {"type": "string"}}
_LABEL_SELECTOR = {"type": "object", "additionalProperties": False, "properties": {
    "matchLabels": _STRMAP,
    "matchExpressions": {"type": "array", "items": {
        "type": "object", "additionalProperties": False, "required": ["key", "operator"],
        "properties": {"key": {"type": "string"}, "operator": {"type": "string"},
                       "values": {"type": "array", "items": {"type": "string"}}}}}}}
_ACTIONS = ["replace", "keep", "drop", "hashmod", "labelmap", "labeldrop", "labelkeep", "lowercase", "uppercase",
            "keepequal", "dropequal"]
_RELABEL = {"type": "object", "additionalProperties": False, "properties": {
    "sourceLabels": {"type": "array", "items": {"type": "string", "pattern": r"^[a-zA-Z_][a-zA-Z0-9_]*$"}},
    "separator": {"type": "string"}, "targetLabel": {"type": "string"}, "regex": {"type": "string"},
    "modulus": {"type": "integer", "minimum": 0}, "replacement": {"type": "string"},
    "action": {"enum": _ACTIONS + [a.capitalize() for a in _ACTIONS]}}}
_ENDPOINT_COMMON = {
    "port": {"type": "string"}, "path": {"type": "string"}, "scheme": {"enum": ["http", "https", "HTTP", "HTTPS"]},
    "params": {"type": "object"}, "interval": _DURATION, "scrapeTimeout": _DURATION, "honorLabels": {"type": "boolean"},
    "honorTimestamps": {"type": "boolean"}, "relabelings": {"type": "array", "items": _RELABEL},
    "metricRelabelings": {"type": "array", "items": _RELABEL}, "followRedirects": {"type": "boolean"},
    "enableHttp2": {"type": "boolean"}, "tlsConfig": {"type": "object"}, "authorization": {"type": "object"},
}
_NAMESPACE_SELECTOR = {"type": "object", "additionalProperties": False, "properties": {
    "any": {"type": "boolean"}, "matchNames": {"type": "array", "items": {"type": "string"}}}}
_META = {"type": "object", "required": ["name"], "properties": {
    "name": {"type": "string"}, "namespace": {"type": "string"}, "labels": _STRMAP, "annotations": _STRMAP}}


def _cr(kind: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {"type": "object", "additionalProperties": False, "required": ["apiVersion", "kind", "metadata", "spec"],
            "properties": {"apiVersion": {"const": "monitoring.coreos.com/v1"}, "kind": {"const": kind},
                           "metadata": _META, "spec": spec}}


MONITORING_SCHEMAS: dict[str, dict[str, Any]] = {
    "ServiceMonitor": _cr("ServiceMonitor", {
        "type": "object", "additionalProperties": False, "required": ["selector", "endpoints"], "properties": {
            "jobLabel": {"type": "string"}, "targetLabels": {"type": "array", "items": {"type": "string"}},
            "podTargetLabels": {"type": "array", "items": {"type": "string"}},
            "endpoints": {"type": "array", "minItems": 1, "items": {
                "type": "object", "additionalProperties": False,
                "properties": {**_ENDPOINT_COMMON, "targetPort": {"type": ["integer", "string"]},
                               "bearerTokenSecret": {"type": "object"}}}},
            "selector": _LABEL_SELECTOR, "namespaceSelector": _NAMESPACE_SELECTOR,
            "sampleLimit": {"type": "integer", "minimum": 0}, "targetLimit": {"type": "integer", "minimum": 0}}}),
    "PodMonitor": _cr("PodMonitor", {
        "type": "object", "additionalProperties": False, "required": ["selector", "podMetricsEndpoints"],
        "properties": {
            "jobLabel": {"type": "string"}, "podTargetLabels": {"type": "array", "items": {"type": "string"}},
            "podMetricsEndpoints": {"type": "array", "minItems": 1, "items": {
                "type": "object", "additionalProperties": False,
                "properties": {**_ENDPOINT_COMMON, "portNumber": {"type": "integer", "minimum": 1, "maximum": 65535},
                               "filterRunning": {"type": "boolean"}}}},
            "selector": _LABEL_SELECTOR, "namespaceSelector": _NAMESPACE_SELECTOR,
            "sampleLimit": {"type": "integer", "minimum": 0}}}),
    "PrometheusRule": _cr("PrometheusRule", {
        "type": "object", "additionalProperties": False, "properties": {
            "groups": {"type": "array", "items": {
                "type": "object", "additionalProperties": False, "required": ["name", "rules"], "properties": {
                    "name": {"type": "string", "minLength": 1}, "interval": _DURATION, "limit": {"type": "integer"},
                    "partial_response_strategy": {"type": "string"}, "labels": _STRMAP,
                    "rules": {"type": "array", "items": {
                        "type": "object", "additionalProperties": False, "required": ["expr"], "properties": {
                            "record": {"type": "string"}, "alert": {"type": "string"},
                            "expr": {"type": ["string", "integer"]}, "for": _DURATION, "keep_firing_for": _DURATION,
                            "labels": _STRMAP, "annotations": _STRMAP}}}}}}}}),
}

CUSTOM_GROUPS = {"kubeflow.org", "monitoring.coreos.com"}


def validation_errors(obj: dict[str, Any], version: str) -> list[str]:
    """Strict errors of one object: Kubernetes OpenAPI for built-in kinds, CRD schemas otherwise.
    A kind that neither knows is an error, never a pass."""
    group = obj.get("apiVersion", "").split("/")[0] if "/" in obj.get("apiVersion", "") else ""
    if group in CUSTOM_GROUPS:
        if obj["kind"] == "PyTorchJob":
            return pytorchjob_errors(obj, version)
        schema = MONITORING_SCHEMAS.get(obj["kind"])
        if schema is None:
            return [f"no schema for {obj['apiVersion']} {obj['kind']}"]
        v = jsonschema.Draft7Validator(schema)
        return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in v.iter_errors(obj)]
    try:
        kubernetes_validate.validate(obj, version, strict=True)
    except kubernetes_validate.ValidationError as e:
        return [f"{'/'.join(map(str, e.path))}: {e.message}"]
    except kubernetes_validate.SchemaNotFoundError as e:
        return [f"no Kubernetes {version} schema: {e}"]
    return []


# ------------------------------------------------------------------------------- credentials

CREDENTIAL_NAME = re.compile(r"(SECRET|PASSWORD|PASSWD|(^|_)TOKEN($|_)|ACCESS_KEY|PRIVATE_KEY|CREDENTIAL)", re.I)


def plaintext_credentials(docs: list[dict[str, Any]]) -> list[str]:
    """Places where a credential is written in clear: credential-named env vars with a literal
    value, credential-looking keys in ConfigMaps, and Secrets with literal stringData."""
    found: list[str] = []
    for name, spec in pod_specs(docs):
        for c in containers(spec):
            for env in c.get("env", []):
                if CREDENTIAL_NAME.search(env["name"]) and "value" in env:
                    found.append(f"{name}/{c['name']}: env {env['name']} has a literal value")
                if CREDENTIAL_NAME.search(env["name"]) and "secretKeyRef" not in env.get("valueFrom", {}):
                    found.append(f"{name}/{c['name']}: env {env['name']} is not read from a Secret")
    for cm in find(docs, "ConfigMap"):
        for key, text in (cm.get("data") or {}).items():
            for line in str(text).splitlines():
                m = re.match(r"\s*[\"']?([A-Za-z_.-]+)[\"']?\s*[:=]\s*(\S+)", line)
                # keys naming an endpoint, a Secret key, a file or Secrets (image_pull_secrets) hold no credential
                if m and CREDENTIAL_NAME.search(m.group(1)) and not m.group(1).endswith(
                        ("_endpoint", "Ref", "_file", "pull_secrets")):
                    found.append(f"ConfigMap/{cm['metadata']['name']}/{key}: {m.group(1)} = {m.group(2)}")
    return found


TORCHRUN_OPERATOR_ENV = {"PET_NNODES": "2", "PET_NPROC_PER_NODE": "4", "PET_NODE_RANK": "0",
                         "MASTER_ADDR": "job-master-0", "MASTER_PORT": "23456"}
"""Example values of what the training operator puts into a PyTorchJob container's env (the pods
expand ``$(VAR)`` in torchrun's flags from it); only the types matter to the parse check."""


def operator_env(job: dict[str, Any], replica: str, index: int) -> dict[str, str]:
    """What the training operator (kubeflow.org/v1, pkg/controller.v1/pytorch/envvar.go) adds to
    the env of pod ``index`` of ``replica``: the values torchrun's flags are expanded from."""
    specs = job["spec"]["pytorchReplicaSpecs"]
    ports = specs["Master"]["template"]["spec"]["containers"][0]["ports"]
    return {"PET_NNODES": str(sum(s["replicas"] for s in specs.values())),
            "PET_NPROC_PER_NODE": job["spec"].get("nprocPerNode", "auto"),
            "PET_NODE_RANK": str(index + (1 if replica == "Worker" else 0)),
            "MASTER_ADDR": f"{job['metadata']['name']}-master-0",
            "MASTER_PORT": str(next(p["containerPort"] for p in ports if p["name"] == "pytorchjob-port"))}


def torchrun_launch(argv: list[str]) -> tuple[Any, list[str]]:
    """(torchrun's parsed options, the ``p2r ...`` argv it starts) of a ``torchrun ... -m p2r.cli
    ...`` command line, parsed by torch's own torchrun parser after the operator's ``$(VAR)``s are
    expanded (:data:`TORCHRUN_OPERATOR_ENV`)."""
    from torch.distributed.run import get_args_parser

    assert argv[0] == "torchrun", argv
    expanded = [re.sub(r"\$\((\w+)\)", lambda m: TORCHRUN_OPERATOR_ENV.get(m.group(1), m.group(0)), a)
                for a in argv[1:]]
    opts = get_args_parser().parse_args(expanded)
    assert opts.module and opts.training_script == "p2r.cli", argv  # `-m p2r.cli`: the p2r command line
    return opts, ["p2r", *opts.training_script_args]


def parse_p2r_command(argv: list[str]) -> click.Context:
    """Parse a container's `p2r ...` command line with the real click commands (nothing runs), so
    a manifest or template cannot carry a flag or choice the CLI does not accept. A trainer's
    ``torchrun ... -m p2r.cli ...`` launch is checked by torchrun's parser, then its p2r part."""
    from p2r.cli import cli

    if argv and argv[0] == "torchrun":
        argv = torchrun_launch(argv)[1]
    assert argv[0] == "p2r", argv
    ctx = cli.make_context("p2r", list(argv[1:]))
    cmd: click.Command = cli
    rest = [*ctx.protected_args, *ctx.args]
    while isinstance(cmd, click.Group) and rest:
        name, sub, rest = cmd.resolve_command(ctx, rest)
        assert sub is not None, argv
        ctx = sub.make_context(name or "", rest, parent=ctx)
        cmd, rest = sub, [*ctx.protected_args, *ctx.args]
    return ctx

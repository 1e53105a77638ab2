"""The README's Kubernetes section walked as written: the commands of its first block, parsed
from the README itself, render (``helm install … -f PROFILE``) or build (``kubectl apply -k``)
objects that validate strictly, and what the section says of a default, a gpu-production and a
cpu-smoke install is true of those objects."""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.k8s_support import KUBE_VERSIONS, ROOT, find, kustomize, render, validation_errors

README = ROOT / "README.md"


def _commands() -> list[tuple[list[str], str]]:
    """(argv, trailing comment) of each line of the Kubernetes section's first bash block."""
    text = README.read_text()
    section = text[text.index("## Kubernetes"):]
    start = section.index("```bash\n") + len("```bash\n")
    block = section[start : section.index("```", start)]
    out = []
    for line in block.splitlines():
        command, _, comment = line.partition("#")
        if command.strip():
            out.append((shlex.split(command), comment.strip()))
    return out


def _installs() -> dict[str, list[str]]:
    """The README's `helm install` lines by profile ("default" without -f)."""
    out: dict[str, list[str]] = {}
    for argv, _ in _commands():
        if argv[:2] == ["helm", "install"]:
            files = [argv[i + 1] for i, a in enumerate(argv) if a in ("-f", "--values")]
            name = Path(files[-1]).name.removesuffix("-values.yaml") if files else "default"
            out[name] = argv
    return out


def _values(argv: list[str]) -> dict[str, Any]:
    """The values a `helm install` line passes, -f files merged in order as Helm does."""
    merged: dict[str, Any] = {}

    def merge(into: dict[str, Any], new: dict[str, Any]) -> None:
        for k, v in new.items():
            if isinstance(v, dict) and isinstance(into.get(k), dict):
                merge(into[k], v)
            else:
                into[k] = v

    for i, a in enumerate(argv):
        if a in ("-f", "--values"):
            merge(merged, yaml.safe_load((ROOT / argv[i + 1]).read_text()) or {})
        if a == "--set":
            raise AssertionError("the README's install lines use -f files only; parse --set here if that changes")
    return merged


def _serve_config(docs: list[dict[str, Any]], role: str) -> dict[str, Any]:
    [cm] = [d for d in find(docs, "ConfigMap") if d["metadata"]["name"] == f"p2r-{role}"]
    return yaml.safe_load(cm["data"]["serve.yaml"])


def _gpus(docs: list[dict[str, Any]], name: str) -> int:
    [dep] = find(docs, "Deployment", name)
    limits = [c.get("resources", {}).get("limits", {}) for c in dep["spec"]["template"]["spec"]["containers"]]
    return sum(int(lim.get("nvidia.com/gpu", 0)) for lim in limits)


def test_the_readme_shows_the_three_installs_and_the_overlays() -> None:
    installs = _installs()
    assert set(installs) == {"default", "gpu-production", "cpu-smoke"}, installs
    for argv in installs.values():
        assert argv[2:4] == ["p2r", "charts/p2r"] and "--create-namespace" in argv
        assert argv[argv.index("-n") + 1] == "p2r"
    applies = [(argv, comment) for argv, comment in _commands() if argv[:2] == ["kubectl", "apply"]]
    assert [argv[argv.index("-k") + 1] for argv, _ in applies] == ["manifests/overlays/gpu-production"]


@pytest.mark.parametrize("profile", ["default", "gpu-production", "cpu-smoke"])
def test_each_readme_install_renders_valid_objects(profile: str) -> None:
    docs = render(_values(_installs()[profile]))
    errors = [f"{d['kind']}/{d['metadata']['name']}: {e}" for d in docs for v in KUBE_VERSIONS
              for e in validation_errors(d, v)]
    assert not errors, errors[:10]


def test_what_the_readme_says_of_a_default_install() -> None:
    """"the perceiver and reasoner serve hf://Qwen/Qwen3-VL-4B-Instruct (one GPU each), the
    controller is off, the verifier runs only with the controller and MinIO only when something
    uses S3"; the /cache volume is a claim per model role."""
    docs = render(_values(_installs()["default"]))
    deployments = {d["metadata"]["name"] for d in find(docs, "Deployment")}
    assert deployments == {"p2r-perceiver", "p2r-reasoner", "p2r-gateway"}
    assert not find(docs, "StatefulSet") and not [d for d in find(docs, "Secret") if "s3" in d["metadata"]["name"]]
    for role in ("perceiver", "reasoner"):
        assert _serve_config(docs, role)["model"] == "hf://Qwen/Qwen3-VL-4B-Instruct"
        assert _gpus(docs, f"p2r-{role}") == 1
        [dep] = find(docs, "Deployment", f"p2r-{role}")
        volumes = {v["name"]: v for v in dep["spec"]["template"]["spec"]["volumes"]}
        assert volumes["cache"]["persistentVolumeClaim"]["claimName"] == f"p2r-{role}-cache"
    assert _gpus(docs, "p2r-gateway") == 0


def test_what_the_readme_says_of_gpu_production() -> None:
    """"gpu-production serves hf://Qwen/Qwen3-VL-4B-Instruct@<commit> (pinned)"."""
    docs = render(_values(_installs()["gpu-production"]))
    for role in ("perceiver", "reasoner"):
        model = _serve_config(docs, role)["model"]
        assert re.fullmatch(r"hf://Qwen/Qwen3-VL-4B-Instruct@[0-9a-f]{40}", model), model


def test_what_the_readme_says_of_cpu_smoke() -> None:
    """The CPU profile trains with no manual step: its controller, MinIO and the seed Job (a plain
    resource, not a hook) are in the release, and the seed Job writes the data the controller
    reads."""
    values = _values(_installs()["cpu-smoke"])
    docs = render(values)
    assert find(docs, "Deployment", "p2r-controller") and find(docs, "StatefulSet", "p2r-minio")
    seeds = [j for j in find(docs, "Job") if j["metadata"]["name"].startswith("p2r-seed-")]
    assert len(seeds) == 1 and "helm.sh/hook" not in seeds[0]["metadata"].get("annotations", {})
    args = " ".join(" ".join(c.get("args", []) + c.get("command", []))
                    for c in seeds[0]["spec"]["template"]["spec"].get("initContainers", [])
                    + seeds[0]["spec"]["template"]["spec"]["containers"])
    [controller_cm] = find(docs, "ConfigMap", "p2r-pipeline")
    pipeline = yaml.safe_load(next(iter(controller_cm["data"].values())))
    data = pipeline["data"]
    assert data.startswith("s3://") and data.rsplit("/", 1)[0] in args, (data, args)


@pytest.mark.parametrize("overlay", ["gpu-production", "gpu-multinode", "cpu-smoke"])
def test_the_readme_overlays_build_valid_jobs(overlay: str) -> None:
    """`kubectl apply -k manifests/overlays/gpu-production  # or gpu-multinode, cpu-smoke`."""
    [(argv, comment)] = [(a, c) for a, c in _commands() if a[:2] == ["kubectl", "apply"]]
    named = {Path(argv[argv.index("-k") + 1]).name, *re.findall(r"[\w-]+", comment.removeprefix("or "))}
    assert overlay in named
    docs = kustomize(overlay)
    jobs = find(docs, "PyTorchJob")
    assert jobs and not [e for d in docs for v in KUBE_VERSIONS for e in validation_errors(d, v)]
    if overlay == "gpu-production":  # the reference: one pod with 4 GPUs under torchrun
        for job in jobs:
            specs = job["spec"]["pytorchReplicaSpecs"]
            assert set(specs) == {"Master"} and str(job["spec"]["nprocPerNode"]) == "4"
            [c] = specs["Master"]["template"]["spec"]["containers"]
            assert c["command"][0] == "torchrun" and int(c["resources"]["limits"]["nvidia.com/gpu"]) == 4

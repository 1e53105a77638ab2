"""GitOps-stable renders (issue 24, item 5): `helm template` - what Argo CD and Flux run - twice
on the same values gives byte-identical output on the README's existing-Secret path, the admin
token included; and no pod template carries a checksum of freshly generated keys, so a re-render
never restarts pods (only the generated Secret objects themselves differ, which is why GitOps
needs the existing-Secret path)."""

from __future__ import annotations

import re
from typing import Any

import yaml

from tests.k8s_support import NAMESPACE, RELEASE, ROOT


def helm_template(values: dict[str, Any]) -> str:
    """`helm template` output (Helm's client-side dry-run install, no cluster: `lookup` sees nothing)."""
    import helm_python

    from tests import k8s_support

    release = helm_python.Config(storage_driver="memory").install(
        str(k8s_support.CHART), RELEASE, values, namespace=NAMESPACE, dry_run="client")
    return str(release["manifest"])


def gitops_values() -> dict[str, Any]:
    """The values of the README's GitOps block (the fenced YAML after `<!-- gitops-values -->`)."""
    text = (ROOT / "README.md").read_text()
    match = re.search(r"<!-- gitops-values -->\s*```yaml\n(.*?)```", text, re.S)
    assert match, "README: no GitOps values block"
    values = yaml.safe_load(match.group(1))
    assert isinstance(values, dict)
    return values


def test_gitops_path_renders_byte_identical() -> None:
    values = gitops_values()
    first, second = helm_template(values), helm_template(values)
    assert first == second
    docs = [d for d in yaml.safe_load_all(first) if d]
    assert docs and not [d["metadata"]["name"] for d in docs if d["kind"] == "Secret"]  # nothing generated
    # The documented path names every Secret a pod mounts: the admin token among them.
    volumes = [v for d in docs if d["kind"] == "Deployment" for v in d["spec"]["template"]["spec"]["volumes"]]
    assert {v["secret"]["secretName"] for v in volumes if v["name"] == "admin-token"} == {
        values["security"]["admin"]["secretName"]}


def _pod_templates(manifest: str) -> dict[str, Any]:
    return {f"{d['kind']}/{d['metadata']['name']}": d["spec"]["template"]
            for d in yaml.safe_load_all(manifest) if d and "template" in d.get("spec", {})}


def test_no_checksum_of_generated_keys() -> None:
    """With the chart generating its Secrets (default values, MinIO on), two renders differ in
    those Secrets' data only: every pod template is identical, so an Argo CD sync or a repeated
    `helm template | kubectl apply` restarts nothing."""
    values = {"minio": {"enabled": True}, "controller": {"enabled": True}}
    first, second = helm_template(values), helm_template(values)
    assert first != second  # the generated keys: this is what GitOps must not use
    a, b = _pod_templates(first), _pod_templates(second)
    assert a and a == b, sorted(k for k in a if a[k] != b.get(k))
    assert not [k for k, t in a.items() if "checksum/s3-credentials" in t["metadata"].get("annotations", {})]

    def without_generated(manifest: str) -> list[Any]:
        docs = [d for d in yaml.safe_load_all(manifest) if d]
        for d in docs:
            if d["kind"] == "Secret":
                d.pop("data", None)
        return docs

    assert without_generated(first) == without_generated(second)

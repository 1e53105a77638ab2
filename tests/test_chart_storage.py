"""Issue 24, storage and convergence: one storage layout, checked against the rendered MinIO
policy with IAM semantics; every install path (``helm install --wait``, Argo CD sync waves)
replayed against the rendered objects; cpu-smoke seeding its own model and data so the
controller's inputs check passes; the seed Job's env and its skip of unchanged objects.

Nothing here stands in for a component at run time: the policy is the JSON the chart hands to
``mc admin policy create``, the replay reads what each rendered object needs and provides from
its spec, and the seeding runs the real ``p2r`` commands against a real S3 server (moto)."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.k8s_support import (
    KUBECTL,
    MANIFESTS,
    ROOT,
    containers,
    find,
    merged_values,
    pod_specs,
    profiles,
    render,
)

PROFILES = profiles()
OVERLAYS = ("cpu-smoke", "gpu-production", "gpu-multinode")
PINNED_HF = re.compile(r"^hf://[\w.-]+/[\w.-]+@[0-9a-f]{40}$")


# ------------------------------------------------------------------------------ IAM policy


def _wildcard(pattern: str, value: str) -> bool:
    """IAM's matching of Action and Resource: ``*`` any run of characters, ``?`` one; whole string."""
    rx = "".join(".*" if ch == "*" else "." if ch == "?" else re.escape(ch) for ch in pattern)
    return re.fullmatch(rx, value, flags=re.DOTALL) is not None


def iam_allows(policy: dict[str, Any], action: str, resource: str) -> bool:
    """IAM evaluation of one request: an explicit Deny wins, else any matching Allow, else the
    implicit deny. Action matching is case-insensitive, Resource case-sensitive."""
    allowed = False
    for st in policy["Statement"]:
        actions = st["Action"] if isinstance(st["Action"], list) else [st["Action"]]
        resources = st["Resource"] if isinstance(st["Resource"], list) else [st["Resource"]]
        if not any(_wildcard(a.lower(), action.lower()) for a in actions):
            continue
        if not any(_wildcard(r, resource) for r in resources):
            continue
        if st["Effect"] == "Deny":
            return False
        allowed = allowed or st["Effect"] == "Allow"
    return allowed


def can_put(policy: dict[str, Any], uri: str) -> bool:
    """Whether the policy lets its user write object ``uri`` (s3://BUCKET/KEY)."""
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    return iam_allows(policy, "s3:PutObject", f"arn:aws:s3:::{bucket}/{key}")


def test_the_evaluator_follows_iam_semantics() -> None:
    policy = {"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Action": ["s3:PutObject"], "Resource": ["arn:aws:s3:::b/runs/*"]},
        {"Effect": "Allow", "Action": ["s3:*"], "Resource": ["arn:aws:s3:::b/open/*"]},
        {"Effect": "Deny", "Action": ["s3:PutObject"], "Resource": ["arn:aws:s3:::b/runs/locked/*"]}]}
    assert can_put(policy, "s3://b/runs/x/stage1/model.safetensors")
    assert can_put(policy, "s3://b/open/a")  # action wildcard
    assert not can_put(policy, "s3://b/runs/locked/a")  # an explicit Deny wins
    assert not can_put(policy, "s3://b/kustomize/run1/stage1/a")  # implicit deny
    assert not can_put(policy, "s3://other/runs/a")  # another bucket
    assert not can_put(policy, "s3://b/runsx/a")  # a prefix is not a path segment's start
    assert not iam_allows(policy, "s3:DeleteObject", "arn:aws:s3:::b/runs/a")
    assert not can_put(policy, "s3://b/RUNS/a")  # resources are case-sensitive


def _with_controller(values: dict[str, Any]) -> dict[str, Any]:
    """A profile with its controller on (the writer of runs), as a user enables it."""
    out = json.loads(json.dumps(values))
    out.setdefault("controller", {})["enabled"] = True
    return out


def _minio_pod(docs: list[dict[str, Any]]) -> dict[str, Any] | None:
    sts = [d for d in find(docs, "StatefulSet") if d["metadata"]["name"].endswith("-minio")]
    return sts[0]["spec"]["template"]["spec"] if sts else None


def writer_policy(docs: list[dict[str, Any]]) -> dict[str, Any]:
    """The writer user's policy as MinIO receives it: the JSON the provision script writes to
    /tmp/writer.json before `mc admin policy create ... /tmp/writer.json`."""
    pod = _minio_pod(docs)
    assert pod is not None, "no MinIO in the release"
    script = next(c for c in pod["containers"] if c["name"] == "provision")["args"][0]
    m = re.search(r"cat > /tmp/writer\.json <<'EOF'\n(.*?)\nEOF\n", script, re.DOTALL)
    assert m, script
    assert re.search(r"mc admin policy create p2r \S+-writer /tmp/writer\.json", script)
    return json.loads(m.group(1))


def pipeline_config(docs: list[dict[str, Any]]) -> dict[str, Any]:
    cm = next(d for d in find(docs, "ConfigMap") if d["metadata"]["name"].endswith("-pipeline"))
    return yaml.safe_load(cm["data"]["pipeline.yaml"])


def controller_writes(cfg: dict[str, Any]) -> list[str]:
    """Objects the controller's run writes (through its trainer and eval pods): every stage's
    checkpoint files, the baseline's, the eval results (controller/config.py's layout)."""
    from p2r.controller.config import PipelineConfig

    run = PipelineConfig.model_validate(cfg)
    return [*(f"{run.stage_root(s)}/step-2/model.safetensors" for s in ("stage1", "stage2", "baseline")),
            *(f"{run.stage_root(s)}/step-2/manifest.json" for s in ("stage1", "stage2")),
            f"{run.eval_out}/summary.json"]


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_every_controller_write_of_every_profile_is_allowed(profile: str) -> None:
    """The controller of each profile (turned on) writes only where its S3 user may write, in the
    profile's s3.bucket; the policy and the paths come from the same values (s3.layout.runs)."""
    values = _with_controller(PROFILES[profile])
    docs = render(values)
    cfg = pipeline_config(docs)
    bucket = merged_values(values)["s3"]["bucket"]
    writes = controller_writes(cfg)
    for uri in writes:
        assert uri.startswith(f"s3://{bucket}/"), (uri, bucket)  # external-s3: p2r-prod, not p2r
    for key in ("base_model", "verifier_model", "data"):
        if str(cfg.get(key) or "").startswith("s3://"):
            assert cfg[key].startswith(f"s3://{bucket}/"), (key, cfg[key])
    if _minio_pod(docs) is None:  # external S3: the platform team's Secret and policy
        assert cfg["kubernetes"]["s3_secret"] == merged_values(values)["s3"]["existingSecret"]
        return
    policy = writer_policy(docs)
    assert cfg["kubernetes"]["s3_secret"].endswith("-s3-writer")
    for uri in writes:
        assert can_put(policy, uri), (profile, uri, policy)
    # and the writer is least-privilege: models, data and other buckets stay read-only
    assert not can_put(policy, f"s3://{bucket}/models/tiny/config.json")
    assert not can_put(policy, f"s3://{bucket}/data/synth/train.parquet")


def test_storage_outside_the_writable_prefix_fails_the_render() -> None:
    import helm_python  # noqa: F401  (the render error type comes from it)

    with pytest.raises(Exception, match=r"outside s3://p2r/runs/"):
        render({"controller": {"enabled": True, "config": {"storage": "s3://p2r/elsewhere"}}})
    with pytest.raises(Exception, match=r"not in s3\.bucket"):
        render({"controller": {"enabled": True, "config": {"base_model": "s3://other/models/x"}}})
    # a deeper prefix under runs/ is still the writer's
    docs = render({"controller": {"enabled": True, "config": {"storage": "s3://p2r/runs/team-a"}}})
    assert pipeline_config(docs)["storage"] == "s3://p2r/runs/team-a"


def test_the_layout_moves_paths_and_policy_together() -> None:
    """Changing s3.layout.runs / s3.bucket moves both the controller's paths and the policy."""
    values = {"controller": {"enabled": True}, "s3": {"bucket": "team-bkt", "layout": {"runs": "training"}}}
    docs = render(values)
    policy, cfg = writer_policy(docs), pipeline_config(docs)
    assert cfg["storage"] == "s3://team-bkt/training"
    assert all(can_put(policy, uri) for uri in controller_writes(cfg))
    assert not can_put(policy, "s3://team-bkt/runs/run1/stage1/x")


def _kustomize_dir(path: Path) -> list[dict[str, Any]]:
    out = subprocess.run([str(KUBECTL), "kustomize", str(path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def _env(c: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e.get("value", "") for e in c.get("env", [])}


def manifest_writes(docs: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """(S3 Secret used, object URI written) of every hand-applied job: each trainer's checkpoint
    (its P2R_TRAIN_OUTPUT) and the eval Job's --out, with $(VAR) expanded as the kubelet does."""
    out: list[tuple[str, str]] = []
    for _, spec in pod_specs(docs):
        for c in containers(spec):
            env = _env(c)
            secret = next((e["valueFrom"]["secretKeyRef"]["name"] for e in c.get("env", [])
                           if e["name"] == "AWS_ACCESS_KEY_ID" and "valueFrom" in e), "")
            if "P2R_TRAIN_OUTPUT" in env:
                out.append((secret, f"{env['P2R_TRAIN_OUTPUT']}/step-30/model.safetensors"))
            for arg in [*c.get("command", []), *c.get("args", [])]:
                if arg.startswith("--out="):
                    value = re.sub(r"\$\((\w+)\)", lambda m, env=env: env[m.group(1)], arg.split("=", 1)[1])
                    out.append((secret, f"{value}/summary.json"))
    return out


@pytest.mark.parametrize("layer", [*(f"overlays/{o}" for o in OVERLAYS), "baseline"])
def test_every_manifest_write_is_allowed_to_the_writer_user(layer: str) -> None:
    """`kubectl apply -k` of every overlay and of manifests/baseline writes only where the
    default release's writer user may write (finding 1: s3://p2r/kustomize/ was denied)."""
    docs = _kustomize_dir(MANIFESTS / layer)
    chart = render({"roles": {"verifier": {"enabled": True}}, "controller": {"enabled": True}})
    policy = writer_policy(chart)
    writer_secret = next(s["metadata"]["name"] for s in find(chart, "Secret")
                         if s["metadata"]["name"].endswith("-s3-writer"))
    writes = manifest_writes(docs)
    assert len(writes) >= (1 if layer == "baseline" else 3), writes
    for secret, uri in writes:
        assert secret == writer_secret, (secret, uri)
        assert can_put(policy, uri), (layer, uri)
    if layer == "baseline":
        assert writes[0][1].startswith("s3://p2r/runs/kustomize/baseline/")


def test_manifests_follow_the_release_bucket(tmp_path: Path) -> None:
    """external-s3's bucket in release.yaml reaches every S3 URI of the manifests (and the
    baseline), and those paths are writable under a policy rendered for that bucket."""
    import shutil

    shutil.copytree(MANIFESTS, tmp_path / "manifests")
    external = merged_values(PROFILES["external-s3"])["s3"]
    for rel in ("overlays/gpu-production/release.yaml", "overlays/cpu-smoke/release.yaml", "baseline/release.yaml"):
        path = tmp_path / "manifests" / rel
        doc = yaml.safe_load(path.read_text())
        doc["data"]["bucket"] = external["bucket"]
        path.write_text(yaml.safe_dump(doc))
    policy = writer_policy(render({"controller": {"enabled": True}, "s3": {"bucket": external["bucket"]}}))
    for layer in ("overlays/cpu-smoke", "overlays/gpu-production", "baseline"):
        docs = _kustomize_dir(tmp_path / "manifests" / layer)
        text = yaml.safe_dump_all(docs)
        assert "s3://p2r/" not in text, layer
        for _, uri in manifest_writes(docs):
            assert uri.startswith(f"s3://{external['bucket']}/") and can_put(policy, uri), uri


# ------------------------------------------------------------- converging from empty: replay


HOOK_PHASES = {"pre-install": "pre", "pre-upgrade": "pre", "post-install": "post", "post-upgrade": "post"}


def _hooks(obj: dict[str, Any]) -> list[str]:
    return [h.strip() for h in obj["metadata"].get("annotations", {}).get("helm.sh/hook", "").split(",") if h.strip()]


def _pod_spec(obj: dict[str, Any]) -> dict[str, Any] | None:
    if obj["kind"] in ("Deployment", "StatefulSet", "Job"):
        return obj["spec"]["template"]["spec"]
    if obj["kind"] == "Pod":
        return obj["spec"]
    return None


def _all_containers(spec: dict[str, Any]) -> list[dict[str, Any]]:
    return [*spec.get("initContainers", []), *spec.get("containers", [])]


def provides(obj: dict[str, Any]) -> set[str]:
    """What an object makes exist once it is applied (Secrets, ConfigMaps, Services) or done
    (a workload Ready, a Job complete): read from its spec."""
    kind, name = obj["kind"], obj["metadata"]["name"]
    if kind in ("Secret", "ConfigMap", "Service", "ServiceAccount"):
        return {f"{kind}/{name}"}
    out: set[str] = set()
    spec = _pod_spec(obj)
    if spec is None:
        return out
    out.add(f"ready:{kind}/{name}")
    for c in _all_containers(spec):
        script = " ".join([*c.get("command", []), *c.get("args", [])])
        env = _env(c)
        if "mc mb" in script and env.get("P2R_S3_BUCKET"):
            out.add(f"bucket:{env['P2R_S3_BUCKET']}")
        if "mc admin user add" in script:
            out.add("s3-users")
        argv = c.get("args", [])
        if c.get("command") == ["p2r"] and argv[:2] in (["models", "upload"], ["data", "upload"]):
            out.add(f"object:{argv[3]}")
    if kind == "StatefulSet" and any(c["name"] == "minio" for c in spec["containers"]):
        out.add(f"s3:{name}:9000")
    return out


def needs(obj: dict[str, Any], rendered: set[str]) -> set[str]:
    """What an object cannot become Ready (or complete) without. Secrets and ConfigMaps the
    chart does not render are the user's (s3.existingSecret, TLS...), there before the install."""
    spec = _pod_spec(obj)
    if spec is None:
        return set()
    out: set[str] = set()
    for v in spec.get("volumes", []):
        if "secret" in v:
            out.add(f"Secret/{v['secret']['secretName']}")
        if "configMap" in v:
            out.add(f"ConfigMap/{v['configMap']['name']}")
    for c in _all_containers(spec):
        for e in c.get("env", []):
            ref = e.get("valueFrom", {})
            if "secretKeyRef" in ref and not ref["secretKeyRef"].get("optional"):
                out.add(f"Secret/{ref['secretKeyRef']['name']}")
            if "configMapKeyRef" in ref:
                out.add(f"ConfigMap/{ref['configMapKeyRef']['name']}")
        for src in c.get("envFrom", []):
            if "secretRef" in src:
                out.add(f"Secret/{src['secretRef']['name']}")
        env = _env(c)
        endpoint = env.get("P2R_S3_ENDPOINT", "")
        argv = [*c.get("command", []), *c.get("args", [])]
        if argv[:3] == ["p2r", "models", "wait"]:  # waits for an object (or the bucket) in S3
            uri = argv[3].removeprefix("s3://")
            bucket, _, key = uri.partition("/")
            out |= {f"bucket:{bucket}", *([f"object:s3://{uri}"] if key else [])}
            if endpoint:
                out.add(f"s3:{endpoint.split(':')[0]}:9000" if endpoint.endswith(":9000") else f"s3:{endpoint}")
            secret = next((e["valueFrom"]["secretKeyRef"]["name"] for e in c.get("env", [])
                           if e["name"] == "AWS_ACCESS_KEY_ID" and "valueFrom" in e), "")
            if secret.endswith(("-s3-reader", "-s3-writer")):
                out.add("s3-users")
    # the role servers load their model at start: an s3:// model must be there first
    if obj["kind"] == "Deployment":
        for v in spec.get("volumes", []):
            if "configMap" in v:
                out.add(f"ConfigMap/{v['configMap']['name']}")
    return {n for n in out if not n.startswith(("Secret/", "ConfigMap/")) or n in rendered}


def _role_models(docs: list[dict[str, Any]]) -> dict[str, str]:
    """Deployment -> the model its serve.yaml names (the ConfigMap it mounts)."""
    out: dict[str, str] = {}
    maps = {d["metadata"]["name"]: d for d in find(docs, "ConfigMap")}
    for dep in find(docs, "Deployment"):
        for v in dep["spec"]["template"]["spec"].get("volumes", []):
            cm = maps.get(v.get("configMap", {}).get("name", ""))
            if cm and "serve.yaml" in cm.get("data", {}):
                model = yaml.safe_load(cm["data"]["serve.yaml"]).get("model")
                if model:
                    out[dep["metadata"]["name"]] = str(model)
    return out


def _dependencies(docs: list[dict[str, Any]]) -> dict[str, set[str]]:
    rendered = {f"{d['kind']}/{d['metadata']['name']}" for d in docs}
    made = set().union(*(provides(d) for d in docs))
    # an S3 endpoint no rendered object serves is an external one, there before the install
    deps = {f"{d['kind']}/{d['metadata']['name']}": {n for n in needs(d, rendered)
                                                     if not n.startswith("s3:") or n in made} for d in docs}
    for dep, model in _role_models(docs).items():
        if model.startswith("s3://"):  # the server fails without it: it must exist before Ready
            deps[f"Deployment/{dep}"].add(f"object:{model}")
    return deps


def _settle(batch: list[dict[str, Any]], have: set[str], deps: dict[str, set[str]]) -> set[str]:
    """Apply a batch at once and let it run: objects finish as their needs appear (among the
    batch too). Returns the keys of the objects that finished; ``have`` grows."""
    for obj in batch:  # applying makes Secrets, ConfigMaps, Services exist at once
        if _pod_spec(obj) is None:
            have |= provides(obj)
    done: set[str] = set()
    progress = True
    while progress:
        progress = False
        for obj in batch:
            key = f"{obj['kind']}/{obj['metadata']['name']}"
            if key not in done and deps[key] <= have:
                done.add(key)
                have |= provides(obj)
                progress = True
    return done


def _stuck(batch: list[dict[str, Any]], done: set[str], have: set[str], deps: dict[str, set[str]],
           where: str, later: list[dict[str, Any]]) -> list[str]:
    made_later = {p: f"{o['kind']}/{o['metadata']['name']}" for o in later for p in provides(o)}
    out = []
    for obj in batch:
        key = f"{obj['kind']}/{obj['metadata']['name']}"
        if key not in done and obj["kind"] != "Service":
            missing = sorted(deps[key] - have)
            out.append(f"{where}: {key} waits for " + ", ".join(
                f"{m} (made by {made_later.get(m, 'nothing in the release')})" for m in missing))
    return out


def replay_helm_install_wait(docs: list[dict[str, Any]]) -> list[str]:
    """`helm install --wait --wait-for-jobs`: pre-install hooks one by one (by weight, each run
    to completion), then every other object at once, waited for until Ready / complete, then the
    post-install hooks. Returns the deadlocks: objects that wait on something made later or never."""
    deps = _dependencies(docs)
    objs = [d for d in docs if "test" not in _hooks(d)]
    phase = {id(d): next((HOOK_PHASES[h] for h in _hooks(d) if h in HOOK_PHASES), "main") for d in objs}
    weight = {id(d): int(d["metadata"].get("annotations", {}).get("helm.sh/hook-weight", "0")) for d in objs}
    pre = sorted((d for d in objs if phase[id(d)] == "pre"), key=lambda d: weight[id(d)])
    main = [d for d in objs if phase[id(d)] == "main"]
    post = sorted((d for d in objs if phase[id(d)] == "post"), key=lambda d: weight[id(d)])
    have: set[str] = set()
    problems: list[str] = []
    for i, hook in enumerate(pre):
        done = _settle([hook], have, deps)
        problems += _stuck([hook], done, have, deps, "pre-install hook", [*pre[i + 1:], *main, *post])
    done = _settle(main, have, deps)
    problems += _stuck(main, done, have, deps, "--wait", post)
    for i, hook in enumerate(post):
        done = _settle([hook], have, deps)
        problems += _stuck([hook], done, have, deps, "post-install hook", post[i + 1:])
    return problems


def replay_argocd_sync(docs: list[dict[str, Any]]) -> list[str]:
    """An Argo CD sync: Helm hooks mapped as Argo does (pre-install -> PreSync, post-install ->
    PostSync, helm.sh/hook-weight -> wave; test hooks skipped), then per phase the waves in order
    (argocd.argoproj.io/sync-wave, default 0); each wave is applied and must turn Healthy (Ready,
    Job complete) before the next one starts."""
    deps = _dependencies(docs)
    phases: dict[str, dict[int, list[dict[str, Any]]]] = {"PreSync": {}, "Sync": {}, "PostSync": {}}
    for d in docs:
        hooks, ann = _hooks(d), d["metadata"].get("annotations", {})
        if "test" in hooks or "test-success" in hooks:
            continue
        if any(h in ("pre-install", "pre-upgrade") for h in hooks):
            phase, wave = "PreSync", int(ann.get("helm.sh/hook-weight", "0"))
        elif any(h in ("post-install", "post-upgrade") for h in hooks):
            phase, wave = "PostSync", int(ann.get("helm.sh/hook-weight", "0"))
        else:
            phase, wave = "Sync", int(ann.get("argocd.argoproj.io/sync-wave", "0"))
        phases[phase].setdefault(wave, []).append(d)
    ordered = [(p, w, phases[p][w]) for p in ("PreSync", "Sync", "PostSync") for w in sorted(phases[p])]
    have: set[str] = set()
    problems: list[str] = []
    for i, (phase, wave, batch) in enumerate(ordered):
        done = _settle(batch, have, deps)
        later = [o for _, _, b in ordered[i + 1:] for o in b]
        problems += _stuck(batch, done, have, deps, f"{phase} wave {wave}", later)
    return problems


# gpu-production as the "S3 when the user seeds it": models seeded by the chart.
SEEDED_GPU = {**json.loads(json.dumps(PROFILES["gpu-production"])),
              "models": {"seed": {"enabled": True, "models": [{"source": "/models/Qwen3-VL-4B-Instruct",
                                                              "name": "Qwen3-VL-4B-Instruct"}]},
                         "pvc": {"claimName": "p2r-models"}}}
for _role in ("perceiver", "reasoner", "verifier"):
    SEEDED_GPU["roles"][_role]["model"] = "s3://p2r/models/Qwen3-VL-4B-Instruct"
REPLAY_CASES = {**PROFILES, **{f"{k}+controller": _with_controller(v) for k, v in PROFILES.items()},
                "gpu-production+s3-models": SEEDED_GPU}


@pytest.mark.parametrize("case", sorted(REPLAY_CASES))
def test_install_converges_from_empty(case: str) -> None:
    """No object waits on one made later, under `helm install --wait` and under Argo CD."""
    docs = render(REPLAY_CASES[case])
    assert replay_helm_install_wait(docs) == []
    assert replay_argocd_sync(docs) == []


def test_the_replay_finds_a_deadlock() -> None:
    """The replay fails where the issue saw the deadlock: a role serving an s3:// model that a
    post-install hook seeds, and the bucket and users made by a post-install hook."""
    docs = render(SEEDED_GPU)
    seed = next(d for d in find(docs, "Job") if "seed" in d["metadata"]["name"])
    seed["metadata"].setdefault("annotations", {})["helm.sh/hook"] = "post-install,post-upgrade"
    problems = replay_helm_install_wait(docs)
    assert any("Deployment/p2r-perceiver waits for object:s3://p2r/models/Qwen3-VL-4B-Instruct" in p
               and "made by Job/" in p for p in problems), problems
    assert replay_argocd_sync(docs)
    # a bucket hook after the roles (today's chart): the role pods' model wait needs the bucket
    docs = render(SEEDED_GPU)
    sts = next(d for d in find(docs, "StatefulSet") if d["metadata"]["name"].endswith("-minio"))
    sts["spec"]["template"]["spec"]["containers"] = [
        c for c in sts["spec"]["template"]["spec"]["containers"] if c["name"] != "provision"]
    assert any("bucket:p2r" in p for p in replay_helm_install_wait(docs))


def test_role_pods_wait_for_their_s3_model_with_a_clear_status() -> None:
    docs = render(SEEDED_GPU)
    deployments = {d["metadata"]["name"]: d for d in find(docs, "Deployment")}
    for role in ("perceiver", "reasoner"):
        spec = deployments[f"p2r-{role}"]["spec"]["template"]["spec"]
        wait = next(c for c in spec.get("initContainers", []) if c["name"] == "wait-model")
        assert wait["command"] == ["p2r", "models", "wait", "s3://p2r/models/Qwen3-VL-4B-Instruct"]
        env = _env(wait)
        assert env["P2R_S3_ENDPOINT"] == "p2r-minio:9000"
        from tests.k8s_support import parse_p2r_command

        assert parse_p2r_command(wait["command"]).command.name == "wait"
    # hf:// models: nothing to wait for
    for dep in find(render(PROFILES["gpu-production"]), "Deployment"):
        assert all(c["name"] != "wait-model" for c in dep["spec"]["template"]["spec"].get("initContainers", []))


def test_wait_says_what_it_waits_for(s3_server: dict[str, str], tmp_path: Path) -> None:
    """`p2r models wait` reports "waiting for model URI: no bucket / no manifest.json yet" and
    returns once the manifest is there; it never exits non-zero while waiting (no crash loop)."""
    import os

    from p2r.controller.storage import wait_for

    env = {**os.environ, **s3_server}
    uri = "s3://waitbkt/models/m"
    said: list[str] = []
    slept: list[float] = []
    os.environ.update(s3_server)
    try:
        assert wait_for(uri, poll_s=0.01, timeout_s=0.05, say=said.append, sleep=slept.append) is False
        assert said[0] == f"waiting for model {uri}: no bucket waitbkt yet", said
        proc = subprocess.Popen([sys.executable, "-m", "p2r.cli", "models", "wait", uri, "--poll-s", "0.2"],
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(3)
        assert proc.poll() is None  # still waiting, not failed
        model = tmp_path / "m"
        model.mkdir()
        (model / "config.json").write_text("{}")
        (model / "model.safetensors").write_bytes(b"x" * 16)
        up = subprocess.run([sys.executable, "-m", "p2r.cli", "models", "upload", str(model), uri], env=env,
                            capture_output=True, text=True, timeout=120)
        assert up.returncode == 0, up.stderr
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        assert f"waiting for model {uri}: no bucket waitbkt yet" in err
        assert f"{uri}: ready" in out
    finally:
        for k in s3_server:
            os.environ.pop(k, None)


def test_gpu_production_serves_pinned_models_and_notes_say_which() -> None:
    from tests.k8s_support import _chart

    values = PROFILES["gpu-production"]
    for role in ("perceiver", "reasoner", "verifier"):
        assert PINNED_HF.match(values["roles"][role]["model"]), values["roles"][role]["model"]
    notes = _chart().render(values, name="p2r", namespace="p2r", is_install=True)["p2r/templates/NOTES.txt"]
    assert re.search(r"perceiver: hf://Qwen/Qwen3-VL-4B-Instruct@[0-9a-f]{40} \(Hugging Face Hub, pinned", notes)
    seeded = _chart().render(SEEDED_GPU, name="p2r", namespace="p2r", is_install=True)["p2r/templates/NOTES.txt"]
    assert "perceiver: s3://p2r/models/Qwen3-VL-4B-Instruct (S3: the pod waits" in seeded
    assert "/models/Qwen3-VL-4B-Instruct -> s3://p2r/models/Qwen3-VL-4B-Instruct" in seeded


def test_the_values_say_why_minio_provisions_itself() -> None:
    text = (ROOT / "charts" / "p2r" / "values.yaml").read_text()
    assert "a pre-install hook could not" in text and "post-install hook runs only after" in text


# ------------------------------------------------------------------------------- seed Job


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_every_env_name_is_set_once(profile: str) -> None:
    """Server-side apply rejects a container whose env names a variable twice (HF_HOME was)."""
    values = json.loads(json.dumps(PROFILES[profile]))
    values.setdefault("models", {}).setdefault("seed", {}).update(
        enabled=True, models=[{"source": "tiny", "name": "tiny"}])
    docs = render(values)
    seen = 0
    for name, spec in pod_specs(docs):
        for c in containers(spec):
            names = [e["name"] for e in c.get("env", [])]
            assert len(names) == len(set(names)), (name, c["name"], names)
            seen += "HF_HOME" in names
    assert seen >= 2


def test_seed_job_is_a_plain_resource_named_by_its_content() -> None:
    docs = render(PROFILES["cpu-smoke"])
    seed = [d for d in find(docs, "Job") if d["metadata"]["labels"]["app.kubernetes.io/component"] == "seed-models"]
    assert len(seed) == 1
    meta = seed[0]["metadata"]
    assert "helm.sh/hook" not in meta.get("annotations", {})
    assert meta["annotations"]["argocd.argoproj.io/sync-wave"] == "-1"
    other = render({**PROFILES["cpu-smoke"], "models": {**PROFILES["cpu-smoke"]["models"], "seed": {
        **PROFILES["cpu-smoke"]["models"]["seed"], "data": [{"source": "synth", "name": "synth", "samples": 8}]}}})
    other_seed = next(d for d in find(other, "Job") if "seed" in d["metadata"]["name"])
    assert other_seed["metadata"]["name"] != meta["name"]  # a changed list is a new Job (immutable template)
    again = next(d for d in find(render(PROFILES["cpu-smoke"]), "Job") if "seed" in d["metadata"]["name"])
    assert again["metadata"]["name"] == meta["name"]  # the same list: the same Job, left alone


def _seed_steps(docs: list[dict[str, Any]]) -> list[list[str]]:
    seed = next(d for d in find(docs, "Job") if "seed" in d["metadata"]["name"])
    return [[*c["command"], *c["args"]] for c in _all_containers(seed["spec"]["template"]["spec"])]


def _run_steps(steps: list[list[str]], scratch: Path, env: dict[str, str]) -> list[str]:
    """Run the seed Job's commands for real, its /cache scratch volume mapped to ``scratch``."""
    outputs = []
    for argv in steps:
        argv = [a.replace("/cache/", f"{scratch}/") for a in argv]
        assert argv[0] == "p2r"
        done = subprocess.run([sys.executable, "-m", "p2r.cli", *argv[1:]], env=env, capture_output=True,
                              text=True, timeout=600)
        assert done.returncode == 0, (shlex.join(argv), done.stderr[-2000:])
        outputs.append(done.stdout)
    return outputs


def test_cpu_smoke_seeds_itself_and_the_controller_inputs_pass(s3_server: dict[str, str], tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """cpu-smoke from empty: the seed Job's own commands (run for real against S3) write the
    tiny model and the synthetic set; the controller's pipeline.yaml, rendered by the chart, then
    finds every input (kmock cluster with the release's Deployments and the PyTorchJob CRD), its
    trainer pods fetch the set from s3:// (init container) and train on the fetched parquet, and
    eval reads s3:// itself. A second seeding uploads nothing (every manifest entry matches)."""
    import os

    from p2r.controller.config import PipelineConfig
    from p2r.controller.kube import KubeBackend
    from p2r.data.dataset import load_samples
    from tests.k8s_emulator import Cluster, emulator, write_kubeconfig

    docs = render(PROFILES["cpu-smoke"])
    cfg = pipeline_config(docs)
    env = {**os.environ, **s3_server, "HOME": str(tmp_path / "home")}
    steps = _seed_steps(docs)
    assert steps[0] == ["p2r", "models", "wait", "s3://p2r"]
    steps = [s for s in steps if s[1:3] != ["models", "wait"]]  # the bucket: created below, as MinIO does
    import boto3

    boto3.client("s3", endpoint_url=f"http://{s3_server['P2R_S3_ENDPOINT']}", region_name="us-east-1",
                 aws_access_key_id="testing", aws_secret_access_key="testing").create_bucket(Bucket="p2r")
    first = _run_steps(steps, tmp_path / "scratch", env)
    assert any("s3://p2r/data/synth" in o for o in first)
    second = _run_steps(steps, tmp_path / "scratch2", env)  # an upgrade: a fresh scratch volume
    uploads = [o for o in second if "uploaded" in o]
    assert len(uploads) == 2 and all(re.search(r": 0 of \d+ files uploaded", o) for o in uploads), second

    for key, value in s3_server.items():
        monkeypatch.setenv(key, value)
    with emulator() as em:
        c = Cluster(em.url, "p2r")
        for role in ("perceiver", "reasoner", "verifier"):
            c.create_deployment(f"p2r-{role}", role)
        c.create_owner(cfg["kubernetes"]["owner_config_map"], "6f1c2e0a-0000-4000-8000-00000000c0de")
        kube = {**cfg["kubernetes"], "kubeconfig": str(write_kubeconfig(tmp_path / "kubeconfig", em.url))}
        config = PipelineConfig.model_validate({**cfg, "kubernetes": kube, "workdir": str(tmp_path / "work")})
        backend = KubeBackend(config)
        assert backend.missing_inputs() == []
        # the trainer pods fetch the set from S3 into their data volume and train on the copy
        job = backend.pytorchjob("smoke-stage1-1", "stage1", "perceiver", 1)
        for replica in job["spec"]["pytorchReplicaSpecs"].values():
            init = replica["template"]["spec"]["initContainers"]
            assert init[0]["command"] == ["p2r", "data", "fetch", "s3://p2r/data/synth", "/data"]
            assert {"name": "data", "mountPath": "/data"} in init[0]["volumeMounts"]
        train = config.train_config("stage1", "perceiver", config.base_model, {"verifier": "x:1", "reasoner": "x:1"},
                                    "/work/p2r-train")
        assert train["data"] == "/data/train.parquet"
        assert config.eval_data == "s3://p2r/data/synth"
        fetched = tmp_path / "pod-data"
        done = subprocess.run([sys.executable, "-m", "p2r.cli", *init[0]["command"][1:4], str(fetched)], env=env,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        assert len(load_samples(fetched / "train.parquet", None)) == 64

    # before seeding, the same check names the missing data set (so the assertion above can fail)
    with emulator() as em:
        c = Cluster(em.url, "p2r")
        for role in ("perceiver", "reasoner", "verifier"):
            c.create_deployment(f"p2r-{role}", role)
        empty = {**cfg, "data": "s3://p2r/data/absent/train.parquet", "workdir": str(tmp_path / "work"),
                 "kubernetes": {**cfg["kubernetes"],
                                "kubeconfig": str(write_kubeconfig(tmp_path / "kubeconfig2", em.url))}}
        missing = KubeBackend(PipelineConfig.model_validate(empty)).missing_inputs()
        assert missing == ["data s3://p2r/data/absent: no manifest.json (upload it: p2r data upload DIR "
                           "s3://p2r/data/absent)"], missing


def test_e2e_runs_the_cpu_smoke_pipeline_with_no_manual_step() -> None:
    """tests/e2e/run.sh installs cpu-smoke with its controller and waits for the finished eval,
    with nothing seeded, uploaded or claimed by hand in that part."""
    text = (ROOT / "tests" / "e2e" / "run.sh").read_text()
    marker = "# 9. cpu-smoke as installed"
    assert marker in text
    part = text[text.index(marker):]
    assert re.search(r"helm upgrade --install \S+ charts/p2r .*-f charts/p2r/ci/cpu-smoke-values\.yaml", part)
    assert "controller.enabled=true" in part and "--wait" in part
    assert "p2r-pipeline-smoke" in part and '"eval"' in part
    for manual in ("models upload", "data synth", "PersistentVolumeClaim", "data upload"):
        assert manual not in part, manual

"""Checks after ``tests/e2e/run.sh`` drove the pipeline on a real cluster (kubeconfig's current
context; S3 through the script's port-forward, keys from the environment). Exits non-zero with
the first failed check; prints one line per passed check."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def check(ok: bool, what: str) -> None:
    if not ok:
        print(f"e2e check FAILED: {what}", file=sys.stderr)
        sys.exit(1)
    print(f"ok  {what}")


def conditions(obj: dict[str, Any]) -> set[str]:
    return {c["type"] for c in (obj.get("status") or {}).get("conditions") or [] if c.get("status") == "True"}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--cancelled", action="store_true", help="check a cancelled run instead")
    args = parser.parse_args()

    from kubernetes import client, config

    from p2r.controller.config import load_pipeline_config
    from p2r.controller.storage import read_json, verify_checkpoint

    cfg = load_pipeline_config(args.config)
    ns, run = cfg.kubernetes.namespace, cfg.name
    config.load_kube_config()
    core, apps, batch, custom = client.CoreV1Api(), client.AppsV1Api(), client.BatchV1Api(), client.CustomObjectsApi()
    state = json.loads(core.read_namespaced_config_map(f"p2r-pipeline-{run}", ns).data["state.json"])
    jobs = {j["metadata"]["name"]: j for j in custom.list_namespaced_custom_object(
        "kubeflow.org", "v1", ns, "pytorchjobs", label_selector=f"p2r.io/run={run}")["items"]}

    if args.cancelled:
        check(state["status"] == "cancelled", f"run {run} is cancelled in its state ConfigMap")
        check(state["steps"]["stage1"]["status"] == "cancelled", "stage1 is marked cancelled")
        check(f"{run}-stage1-1" not in jobs, "the running PyTorchJob was deleted")
        return

    check(state["status"] == "succeeded", f"run {run} succeeded (state ConfigMap p2r-pipeline-{run})")
    attempts = {s: r["attempts"] for s, r in state["steps"].items()}
    check(set(attempts.values()) == {1}, f"every step ran once despite the controller kill: {attempts}")
    check(sorted(jobs) == [f"{run}-stage1-1", f"{run}-stage2-1"], f"exactly one PyTorchJob per stage: {sorted(jobs)}")
    for name, job in jobs.items():
        check("Succeeded" in conditions(job), f"PyTorchJob {name} has condition Succeeded")
        replicas = job["spec"]["pytorchReplicaSpecs"]
        check(replicas["Master"]["replicas"] == 1 and replicas.get("Worker", {}).get("replicas") == 1,
              f"{name}: Master + 1 Worker (two-process gloo training)")
    eval_job = batch.read_namespaced_job(f"{run}-eval-1", ns)
    check(any(c.type == "Complete" and c.status == "True" for c in eval_job.status.conditions or []),
          f"eval Job {run}-eval-1 completed")

    stage1 = state["steps"]["verify_stage1"]["outputs"]["checkpoint"]
    stage2 = state["steps"]["verify_stage2"]["outputs"]["checkpoint"]
    for uri in (stage1, stage2):
        info = verify_checkpoint(uri)
        check(info["files"] >= 5, f"{uri}: every file matches its manifest ({info['files']} files, {info['bytes']} B)")
    check(stage1.startswith(f"{cfg.storage}/{run}/stage1/step-"), "stage 1 checkpoint under STORAGE/RUN/stage1/")
    check(stage2.startswith(f"{cfg.storage}/{run}/stage2/step-"), "stage 2 checkpoint under STORAGE/RUN/stage2/")

    perceiver = apps.read_namespaced_deployment(cfg.kubernetes.deployments["perceiver"], ns)
    server = next(c for c in perceiver.spec.template.spec.containers if c.name == cfg.kubernetes.server_container)
    model = next((e.value for e in server.env or [] if e.name == "P2R_MODEL"), None)
    check(model == stage1, f"the perceiver Deployment serves the stage 1 checkpoint ({model})")
    check((perceiver.status.ready_replicas or 0) >= (perceiver.spec.replicas or 1), "and its pods are ready")

    summary = read_json(f"{cfg.eval_out}/summary.json")
    check(summary["n"] == cfg.eval.limit and summary["mode"] == "p2r", f"eval answered {summary['n']} questions")
    check(bool(summary["categories"]), f"per-category accuracy: {summary['categories']}")
    report = state["steps"]["report"]["outputs"]
    check(report["overall"] == summary["overall"], "the run state records the eval summary")


if __name__ == "__main__":
    main()

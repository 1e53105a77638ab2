"""Write the chart's Grafana dashboards (charts/p2r/files/dashboards/*.json) from the panel lists below.

Why a generator: three dashboards of a dozen panels each are mostly layout and boilerplate
(grid positions, datasource references, template variables); keeping only the queries and
titles here makes the PromQL reviewable, and tests/test_monitoring.py checks that the committed
JSON is exactly what this script writes and that every metric a query names is exported by a
live service, trainer or controller.

Every query filters on the template variables ``$namespace`` and ``$component``; the chart's
ServiceMonitors / PodMonitor (or the scrape configuration documented in values.yaml) put a
``component`` label (perceiver, reasoner, verifier, gateway, controller, trainer) on each target.

Usage: ``.venv/bin/python scripts/dashboards.py`` (rewrites the files).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

OUT = Path(__file__).resolve().parent.parent / "charts" / "p2r" / "files" / "dashboards"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
SEL = 'namespace=~"$namespace", component=~"$component"'
# Exporters outside P2R label series by namespace and pod only: the DCGM exporter (GPU metrics,
# kubernetes pod mapping on) and kube-state-metrics. Joining them with `up` of the P2R targets
# (the ServiceMonitors add namespace and pod) gives each pod its component.
BY_POD = f"on (namespace, pod) group_left (component) max by (namespace, pod, component) (up{{{SEL}}})"


@dataclass
class Panel:
    """One panel: a title, PromQL targets as (expr, legend) pairs, and how to show them."""

    title: str
    targets: list[tuple[str, str]]
    unit: str = "short"
    kind: str = "timeseries"
    description: str = ""
    width: int = 12
    stack: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


def quantiles(metric: str, by: str, qs: tuple[float, ...] = (0.5, 0.95, 0.99),
              extra: str = "") -> list[tuple[str, str]]:
    """histogram_quantile targets for a histogram, one per quantile."""
    legend_by = "".join(f"{{{{{label}}}}} " for label in by.split(", "))
    return [(f"histogram_quantile({q}, sum by ({by}, le) (rate({metric}_bucket{{{SEL}{extra}}}[$__rate_interval])))",
             f"{legend_by}p{round(q * 100)}") for q in qs]


SERVING = [
    Panel("Request rate by method", [
        (f"sum by (component, method) (rate(p2r_requests_total{{{SEL}}}[$__rate_interval]))",
         "{{component}} {{method}}"),
    ], unit="reqps"),
    Panel("Errors by code", [
        (f'sum by (component, code) (rate(p2r_requests_total{{{SEL}, code!="OK"}}[$__rate_interval]))',
         "{{component}} {{code}}"),
    ], unit="reqps", description="Non-OK gRPC status codes per second (INVALID_ARGUMENT is the client's input)."),
    Panel("Error ratio (server-side)", [
        (f'sum by (component) (rate(p2r_requests_total{{{SEL}, code!~"OK|INVALID_ARGUMENT|CANCELLED"}}'
         f'[$__rate_interval])) / sum by (component) (rate(p2r_requests_total{{{SEL}}}[$__rate_interval]))',
         "{{component}}"),
    ], unit="percentunit", description="The quantity P2RHighErrorRate alerts on."),
    Panel("RPC latency p50 / p95 / p99", quantiles("p2r_request_latency_seconds", "component",
                                                   extra=', method!="LoadCheckpoint"'), unit="s"),
    Panel("In-flight work items", [
        (f"sum by (component) (p2r_in_flight_items{{{SEL}}})", "{{component}} in flight"),
        (f"sum by (component) (p2r_max_in_flight_items{{{SEL}}})", "{{component}} admission limit"),
    ]),
    Panel("Engine queue: waiting / running requests", [
        (f'sum by (component) (vllm:num_requests_waiting{{{SEL}}})', "{{component}} waiting"),
        (f'sum by (component) (vllm:num_requests_running{{{SEL}}})', "{{component}} running"),
    ], description="vLLM's scheduler queue; the HPA scales on waiting requests."),
    Panel("Queue time p95 by role", quantiles("p2r_queue_latency_seconds", "component, role", qs=(0.95,)), unit="s"),
    Panel("Engine time (prefill + decode) p95 by role",
          quantiles("p2r_engine_latency_seconds", "component, role", qs=(0.95,)), unit="s"),
    Panel("KV-cache use", [
        (f'max by (component, pod) (vllm:kv_cache_usage_perc{{{SEL}}})', "{{component}} {{pod}}"),
    ], unit="percentunit", extra={"max": 1}),
    Panel("Tokens per second", [
        (f'sum by (component) (rate(vllm:generation_tokens_total{{{SEL}}}[$__rate_interval]))',
         "{{component}} generated"),
        (f'sum by (component) (rate(vllm:prompt_tokens_total{{{SEL}}}[$__rate_interval]))',
         "{{component}} prompt"),
        (f"sum by (role) (rate(p2r_generated_tokens_total{{{SEL}}}[$__rate_interval]))", "role {{role}} generated"),
    ], unit="short"),
    Panel("Time to first token p95", quantiles("vllm:time_to_first_token_seconds", "component", qs=(0.95,)),
          unit="s"),
    Panel("Prefix / multimodal cache hit ratio", [
        (f'sum by (component) (rate(vllm:prefix_cache_hits_total{{{SEL}}}[$__rate_interval])) / '
         f'sum by (component) (rate(vllm:prefix_cache_queries_total{{{SEL}}}[$__rate_interval]))',
         "{{component}} prefix"),
        (f'sum by (component) (rate(vllm:mm_cache_hits_total{{{SEL}}}[$__rate_interval])) / '
         f'sum by (component) (rate(vllm:mm_cache_queries_total{{{SEL}}}[$__rate_interval]))',
         "{{component}} multimodal"),
    ], unit="percentunit"),
    Panel("Images processed per second", [
        (f"sum by (role) (rate(p2r_images_processed_total{{{SEL}}}[$__rate_interval]))", "{{role}}"),
    ], unit="short"),
    Panel("Refused and aborted", [
        (f"sum by (component) (rate(p2r_rejected_items_total{{{SEL}}}[$__rate_interval]))",
         "{{component}} refused (admission)"),
        (f"sum by (component) (rate(p2r_engine_aborted_requests_total{{{SEL}}}[$__rate_interval]))",
         "{{component}} aborted (deadline / cancel)"),
    ], unit="short"),
    Panel("Engine queue time p95 (vLLM)", quantiles("vllm:request_queue_time_seconds", "component", qs=(0.95,)),
          unit="s", description="Time a request waits in vLLM's scheduler before its prefill starts."),
    Panel("Preemptions per second (vLLM)", [
        (f"sum by (component) (rate(vllm:num_preemptions_total{{{SEL}}}[$__rate_interval]))", "{{component}}"),
    ], description="Sequences evicted from the KV cache and recomputed: the cache is too small for max_num_seqs."),
    Panel("Load shed (RESOURCE_EXHAUSTED)", [
        (f'sum by (component) (rate(p2r_requests_total{{{SEL}, code="RESOURCE_EXHAUSTED"}}[$__rate_interval]))',
         "{{component}}"),
    ], unit="reqps", description="Refused by admission (max_in_flight); P2RLoadShedding alerts on its ratio."),
    Panel("Pod restarts", [
        (f"sum by (component) (increase(kube_pod_container_status_restarts_total{{namespace=~\"$namespace\"}}"
         f"[$__range]) * {BY_POD})", "{{component}}"),
    ], kind="bargauge", description="Container restarts in the time range (kube-state-metrics)."),
    Panel("GPU utilisation (DCGM)", [
        (f'avg by (component, pod) (DCGM_FI_DEV_GPU_UTIL{{namespace=~"$namespace"}} * {BY_POD})',
         "{{component}} {{pod}}"),
    ], unit="percent", description="NVIDIA DCGM exporter; empty on CPU clusters."),
    Panel("GPU memory used (DCGM)", [
        (f'sum by (component, pod) (DCGM_FI_DEV_FB_USED{{namespace=~"$namespace"}} * {BY_POD})',
         "{{component}} {{pod}}"),
    ], unit="decmbytes"),
    Panel("GPU power (DCGM)", [
        (f'sum by (component, pod) (DCGM_FI_DEV_POWER_USAGE{{namespace=~"$namespace"}} * {BY_POD})',
         "{{component}} {{pod}}"),
    ], unit="watt"),
    Panel("Loaded checkpoint", [
        (f"max by (component, pod, uri) (p2r_checkpoint_info{{{SEL}}})", "{{component}} {{pod}} {{uri}}"),
    ], kind="table", width=24, extra={"format": "table", "instant": True}),
]

TSEL = f'{SEL}, training_job=~"$training_job"'
TRAINER_BY_POD = f"on (namespace, pod) group_left max by (namespace, pod) (up{{{TSEL}}})"

TRAINING = [
    Panel("Reward mean ± std", [
        (f"p2r_train_reward_mean{{{TSEL}}}", "{{training_job}} mean"),
        (f"p2r_train_reward_mean{{{TSEL}}} + p2r_train_reward_std{{{TSEL}}}", "{{training_job}} mean + std"),
        (f"p2r_train_reward_mean{{{TSEL}}} - p2r_train_reward_std{{{TSEL}}}", "{{training_job}} mean - std"),
    ], description="In the reasoner stage the reward is the answer's correctness, so this is its accuracy."),
    Panel("Reward by answer form", [
        (f"p2r_train_reward_mean_mca{{{TSEL}}}", "mca"),
        (f"p2r_train_reward_mean_na{{{TSEL}}}", "na"),
        (f"p2r_train_reward_mean_free_form{{{TSEL}}}", "free_form"),
    ], description="Per answer form: accuracy on multiple choice, numeric and free-form questions (reasoner stage)."),
    Panel("KL to the reference", [(f"p2r_train_kl{{{TSEL}}}", "{{training_job}}")]),
    Panel("Entropy", [(f"p2r_train_entropy{{{TSEL}}}", "{{training_job}}")]),
    Panel("Response length (tokens)", [(f"p2r_train_response_len{{{TSEL}}}", "{{training_job}}")]),
    Panel("Boxes per perceiver response", [(f"p2r_train_bbox_count{{{TSEL}}}", "{{training_job}}")],
          description="Perceiver stage only."),
    Panel("Step time split", [
        (f"p2r_train_rollout_s{{{TSEL}}}", "rollout"),
        (f"p2r_train_reward_s{{{TSEL}}}", "reward (services)"),
        (f"p2r_train_update_s{{{TSEL}}}", "update"),
        (f"p2r_train_sync_s{{{TSEL}}}", "weight sync"),
    ], unit="s", stack=True),
    Panel("Rollouts per second", [(f"p2r_train_samples_per_s{{{TSEL}}}", "{{training_job}}")]),
    Panel("Step", [(f"p2r_train_step{{{TSEL}}}", "{{training_job}}")], kind="stat",
          description="P2RTrainingStalled fires when this stops moving."),
    Panel("Dropped samples per step", [
        (f"p2r_train_dropped{{{TSEL}}}", "dropped (reward could not be computed)"),
        (f"p2r_train_kept{{{TSEL}}}", "kept"),
    ]),
    Panel("Clip fraction and gradient norm", [
        (f"p2r_train_clip_fraction{{{TSEL}}}", "clip fraction"),
        (f"p2r_train_grad_norm{{{TSEL}}}", "grad norm"),
    ]),
    Panel("Loss and learning rate", [
        (f"p2r_train_loss{{{TSEL}}}", "loss"),
        (f"p2r_train_lr{{{TSEL}}}", "lr"),
    ]),
    Panel("Trainer GPU utilisation (DCGM)", [
        (f'avg by (pod) (DCGM_FI_DEV_GPU_UTIL{{namespace=~"$namespace"}} * {TRAINER_BY_POD})', "{{pod}}"),
    ], unit="percent", description="NVIDIA DCGM exporter, joined to the trainer pods of the selected jobs."),
    Panel("Trainer GPU memory used (DCGM)", [
        (f'sum by (pod) (DCGM_FI_DEV_FB_USED{{namespace=~"$namespace"}} * {TRAINER_BY_POD})', "{{pod}}"),
    ], unit="decmbytes"),
]

PIPELINE = [
    Panel("Running", [(f"max(p2r_pipeline_running{{{SEL}}})", "running")], kind="stat", width=6),
    Panel("Current step", [(f"max by (step) (p2r_pipeline_current_step{{{SEL}}}) == 1", "{{step}}")],
          kind="stat", width=6, extra={"textMode": "name"}),
    Panel("Runs by outcome", [
        (f"sum by (outcome) (increase(p2r_pipeline_runs_total{{{SEL}}}[$__range]))", "{{outcome}}"),
    ], kind="stat", width=12),
    Panel("Mean step duration", [
        (f"sum by (step, outcome) (increase(p2r_pipeline_step_duration_seconds_sum{{{SEL}}}[$__range])) / "
         f"sum by (step, outcome) (increase(p2r_pipeline_step_duration_seconds_count{{{SEL}}}[$__range]))",
         "{{step}} {{outcome}}"),
    ], unit="s", kind="bargauge", width=12),
    Panel("Step duration p95", quantiles("p2r_pipeline_step_duration_seconds", "step", qs=(0.95,)), unit="s"),
    Panel("Attempts per step", [(f"max by (step) (p2r_pipeline_step_attempts{{{SEL}}})", "{{step}}")]),
    Panel("Step failures", [
        (f"sum by (step) (increase(p2r_pipeline_step_failures_total{{{SEL}}}[$__range]))", "{{step}}"),
    ], kind="bargauge"),
]


def variable(name: str, label: str, query: str) -> dict[str, Any]:
    """A multi-value query variable with an "All" option matching any value."""
    return {"name": name, "label": label, "type": "query", "datasource": DATASOURCE,
            "query": {"query": query, "refId": f"{name}-var"}, "definition": query, "refresh": 2,
            "includeAll": True, "multi": True, "allValue": ".*", "current": {}, "sort": 1}


def panel_json(p: Panel, pid: int, x: int, y: int) -> dict[str, Any]:
    """Grafana panel JSON for one Panel at grid position (x, y)."""
    targets = []
    for i, (expr, legend) in enumerate(p.targets):
        t: dict[str, Any] = {"refId": chr(ord("A") + i), "datasource": DATASOURCE, "expr": expr,
                             "legendFormat": legend, "range": not p.extra.get("instant", False)}
        if p.extra.get("instant"):
            t |= {"instant": True, "format": p.extra.get("format", "time_series")}
        targets.append(t)
    defaults: dict[str, Any] = {"unit": p.unit}
    if "max" in p.extra:
        defaults["max"] = p.extra["max"]
    if p.kind == "timeseries":
        defaults["custom"] = {"drawStyle": "line", "fillOpacity": 30 if p.stack else 10, "lineWidth": 1,
                              "stacking": {"mode": "normal" if p.stack else "none", "group": "A"}}
    out: dict[str, Any] = {
        "id": pid, "type": p.kind, "title": p.title, "datasource": DATASOURCE,
        "gridPos": {"h": 8, "w": p.width, "x": x, "y": y}, "targets": targets,
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "options": {"legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
                    "tooltip": {"mode": "multi", "sort": "desc"}} if p.kind == "timeseries" else {},
    }
    if p.kind == "stat":
        out["options"] = {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                          "textMode": p.extra.get("textMode", "value"), "colorMode": "value"}
    if p.description:
        out["description"] = p.description
    return out


def dashboard(uid: str, title: str, panels: list[Panel], component_query: str, tags: list[str],
              extra_vars: tuple[tuple[str, str], ...] = ()) -> dict[str, Any]:
    """A whole dashboard: panels laid out left to right, rows of 24 grid units; ``extra_vars``
    are (name, label) query variables over ``component_query`` after namespace and component."""
    laid: list[dict[str, Any]] = []
    x = y = 0
    for i, p in enumerate(panels, start=1):
        if x + p.width > 24:
            x, y = 0, y + 8
        laid.append(panel_json(p, i, x, y))
        x += p.width
    return {
        "uid": uid, "title": title, "tags": ["p2r", *tags], "editable": True, "schemaVersion": 39,
        "version": 1, "timezone": "browser", "refresh": "30s", "graphTooltip": 1,
        "time": {"from": "now-6h", "to": "now"}, "fiscalYearStartMonth": 0, "liveNow": False,
        "annotations": {"list": []}, "links": [],
        "templating": {"list": [
            {"name": "datasource", "label": "Data source", "type": "datasource", "query": "prometheus",
             "current": {}, "hide": 0, "refresh": 1},
            variable("namespace", "Namespace", f"label_values({component_query}, namespace)"),
            variable("component", "Component", f"label_values({component_query}, component)"),
            *(variable(name, label, f"label_values({component_query}, {name})") for name, label in extra_vars),
        ]},
        "panels": laid,
    }


DASHBOARDS = {
    "serving": dashboard("p2r-serving", "P2R / Serving", SERVING, "p2r_in_flight_items", ["serving"]),
    "training": dashboard("p2r-training", "P2R / Training (PRA-GRPO)", TRAINING, "p2r_train_step", ["training"],
                          extra_vars=(("training_job", "Training job"),)),
    "pipeline": dashboard("p2r-pipeline", "P2R / Pipeline", PIPELINE, "p2r_pipeline_running", ["pipeline"]),
}


def render() -> dict[str, str]:
    """File name -> JSON text of every dashboard (what main() writes and the tests compare)."""
    return {f"{name}.json": json.dumps(d, indent=2) + "\n" for name, d in DASHBOARDS.items()}


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    for name, text in render().items():
        (OUT / name).write_text(text)
        print(f"wrote {OUT / name}")


if __name__ == "__main__":
    main()

{{/*
The alert rules (Prometheus rule-file `groups`), shared by the PrometheusRule and the ConfigMap.
Thresholds come from monitoring.alerts. tests/test_monitoring.py runs `promtool check rules` and
one `promtool test rules` case per alert on the rendered output.
*/}}
{{- define "p2r.alertRules" -}}
{{- $a := .Values.monitoring.alerts -}}
{{- $stall := int $a.trainingStallMinutes -}}
groups:
  - name: p2r-serving
    rules:
      - alert: P2RHighErrorRate
        # Server-side failures only: a client's bad input or cancellation is not our error.
        expr: |-
          sum by (namespace, component) (rate(p2r_requests_total{code!~"OK|INVALID_ARGUMENT|CANCELLED"}[5m]))
            / sum by (namespace, component) (rate(p2r_requests_total[5m])) > {{ $a.errorRatio }}
        for: {{ $a.for }}
        labels:
          severity: critical
        annotations:
          summary: "P2R {{ "{{ $labels.component }}" }} fails {{ "{{ $value | humanizePercentage }}" }} of its RPCs"
          description: "More than {{ round (mulf $a.errorRatio 100) 2 }}% of RPCs end in a server-side error (INTERNAL, UNAVAILABLE, RESOURCE_EXHAUSTED, DEADLINE_EXCEEDED, ...). Check p2r_requests_total by code on the serving dashboard and the pod logs."
      - alert: P2RHighLatency
        expr: |-
          histogram_quantile(0.95, sum by (namespace, component, le) (rate(p2r_request_latency_seconds_bucket{method!="LoadCheckpoint"}[5m])))
            > {{ $a.latencyP95Seconds }}
        for: {{ $a.for }}
        labels:
          severity: warning
        annotations:
          summary: "P2R {{ "{{ $labels.component }}" }} p95 latency is {{ "{{ $value | humanizeDuration }}" }}"
          description: "p95 end-to-end RPC latency above {{ $a.latencyP95Seconds }} s: look at queue time and KV-cache use on the serving dashboard; scale the role or lower max_num_seqs."
  - name: p2r-training
    rules:
      - alert: P2RTrainingStalled
        # The step gauge has not moved for the whole window, and the trainer was already stepping
        # at its start (so engine start-up and a fresh restart do not count).
        expr: |-
          changes(p2r_train_step[{{ $stall }}m]) == 0
            and p2r_train_step offset {{ $stall }}m
        for: 5m
        labels:
          severity: warning
        annotations:
          summary: "P2R training made no step in {{ $stall }} minutes"
          description: "p2r_train_step of {{ "{{ $labels.instance }}" }} has not changed for {{ $stall }} minutes: check rollout / reward time on the training dashboard and the reward services."
  - name: p2r-pipeline
    rules:
      - alert: P2RPipelineFailed
        # A failed run, including the first one (its counter series appears already at 1).
        expr: |-
          increase(p2r_pipeline_runs_total{outcome="failed"}[15m]) > 0
            or (p2r_pipeline_runs_total{outcome="failed"} unless p2r_pipeline_runs_total{outcome="failed"} offset 15m)
        labels:
          severity: critical
        annotations:
          summary: "P2R pipeline run failed"
          description: "A pipeline run ended in failure: see p2r_pipeline_step_failures_total by step on the pipeline dashboard and the controller's logs."
{{- end -}}

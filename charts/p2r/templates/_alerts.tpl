{{/*
The alert rules (Prometheus rule-file `groups`), shared by the PrometheusRule and the ConfigMap.
Thresholds come from monitoring.alerts. tests/test_monitoring.py runs `promtool check rules` and
one `promtool test rules` case per alert on the rendered output.
*/}}
{{- define "p2r.alertRules" -}}
{{- $a := .Values.monitoring.alerts -}}
{{- $stall := int $a.trainingStallMinutes -}}
{{- $ns := .Release.Namespace -}}
{{- /* Ratio alerts apply only above minRequestRate RPCs/s per component: one failure among a
handful of calls is not an outage. */ -}}
{{- $traffic := printf "sum by (namespace, component) (rate(p2r_requests_total[5m])) > %v" $a.minRequestRate -}}
groups:
  - name: p2r-serving
    rules:
      - alert: P2RHighErrorRate
        # Server-side failures only: a client's bad input or cancellation is not our error, and
        # RESOURCE_EXHAUSTED is load shedding (P2RLoadShedding), which clients retry.
        expr: |-
          (sum by (namespace, component) (rate(p2r_requests_total{code!~"OK|INVALID_ARGUMENT|CANCELLED|RESOURCE_EXHAUSTED"}[5m]))
            / sum by (namespace, component) (rate(p2r_requests_total[5m])) > {{ $a.errorRatio }})
          and on (namespace, component) ({{ $traffic }})
        for: {{ $a.for }}
        labels:
          severity: critical
        annotations:
          summary: "P2R {{ "{{ $labels.component }}" }} fails {{ "{{ $value | humanizePercentage }}" }} of its RPCs"
          description: "More than {{ round (mulf $a.errorRatio 100) 2 }}% of RPCs end in a server-side error (INTERNAL, UNAVAILABLE, DEADLINE_EXCEEDED, ...; load shedding is P2RLoadShedding). Check p2r_requests_total by code on the serving dashboard and the pod logs."
          runbook_url: {{ printf "%s#p2rhigherrorrate" $a.runbookBaseUrl | quote }}
      - alert: P2RLoadShedding
        # Admission is full (max_in_flight): requests are refused with RESOURCE_EXHAUSTED and
        # clients back off. Not an error of the server, but capacity is short.
        expr: |-
          (sum by (namespace, component) (rate(p2r_requests_total{code="RESOURCE_EXHAUSTED"}[5m]))
            / sum by (namespace, component) (rate(p2r_requests_total[5m])) > {{ $a.sheddingRatio }})
          and on (namespace, component) ({{ $traffic }})
        for: {{ $a.for }}
        labels:
          severity: warning
        annotations:
          summary: "P2R {{ "{{ $labels.component }}" }} sheds {{ "{{ $value | humanizePercentage }}" }} of its RPCs (RESOURCE_EXHAUSTED)"
          description: "More than {{ round (mulf $a.sheddingRatio 100) 2 }}% of RPCs are refused because the server's admission (max_in_flight) is full: scale the role (replicas, HPA maxReplicas) or raise max_in_flight if the engine has headroom."
          runbook_url: {{ printf "%s#p2rloadshedding" $a.runbookBaseUrl | quote }}
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
          runbook_url: {{ printf "%s#p2rhighlatency" $a.runbookBaseUrl | quote }}
  - name: p2r-availability
    rules:
      {{- /* One rule per deployed component: every target down (up == 0), or no target at all
      (absent: all pods gone, so even their request metrics vanish). */}}
      {{- $components := list }}
      {{- range $name := list "perceiver" "reasoner" "verifier" "gateway" }}
      {{- if include "p2r.roleEnabled" (dict "root" $ "role" $name) }}{{ $components = append $components $name }}{{ end }}
      {{- end }}
      {{- if .Values.controller.enabled }}{{ $components = append $components "controller" }}{{ end }}
      {{- range $c := $components }}
      {{- $alert := printf "P2R%sUnavailable" (title $c) }}
      - alert: {{ $alert }}
        expr: |-
          max by (namespace, component) (up{namespace="{{ $ns }}", component="{{ $c }}"}) == 0
            or absent(up{namespace="{{ $ns }}", component="{{ $c }}"})
        for: 5m
        labels:
          severity: critical
        annotations:
          summary: "P2R {{ $c }} has no pod answering in {{ $ns }}"
          description: "Prometheus scrapes no live {{ $c }} target (every pod down, or none scheduled). Check the Deployment's pods, events and logs (kubectl -n {{ $ns }} get pods -l app.kubernetes.io/component={{ $c }})."
          runbook_url: {{ printf "%s#%s" $.Values.monitoring.alerts.runbookBaseUrl (lower $alert) | quote }}
      {{- end }}
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
          runbook_url: {{ printf "%s#p2rtrainingstalled" $a.runbookBaseUrl | quote }}
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
          runbook_url: {{ printf "%s#p2rpipelinefailed" $a.runbookBaseUrl | quote }}
{{- end -}}

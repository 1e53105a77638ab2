{{/*
Names, labels and the small computations every template shares.
*/}}

{{- define "p2r.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* "<release>-p2r", or the release name alone when it already contains the chart name. */}}
{{- define "p2r.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "p2r.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Selector labels of one component: call with (dict "root" $ "component" "perceiver"). */}}
{{- define "p2r.selectorLabels" -}}
app.kubernetes.io/name: {{ include "p2r.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "p2r.labels" -}}
{{ include "p2r.selectorLabels" . }}
app.kubernetes.io/part-of: p2r
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
helm.sh/chart: {{ include "p2r.chart" .root }}
{{- end -}}

{{- define "p2r.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{/*
Deep merge of two maps where the override wins, zero values included (sprig's mergeOverwrite
drops `0`, `false` and `[]`, which would make `gpus: 0` or `structured_perceiver: false`
impossible). Call with (dict "base" MAP "over" MAP); returns JSON.
*/}}
{{- define "p2r.deepMerge" -}}
{{- $out := deepCopy (.base | default dict) -}}
{{- range $k, $v := (.over | default dict) -}}
{{- if and (kindIs "map" $v) (kindIs "map" (get $out $k)) -}}
{{- $_ := set $out $k (include "p2r.deepMerge" (dict "base" (get $out $k) "over" $v) | fromJson) -}}
{{- else -}}
{{- $_ := set $out $k $v -}}
{{- end -}}
{{- end -}}
{{- toJson $out -}}
{{- end -}}

{{/* One role's settings: roleDefaults deep-merged with roles.<name>. Call with (dict "root" $ "role" NAME). */}}
{{- define "p2r.role" -}}
{{- include "p2r.deepMerge" (dict "base" .root.Values.roleDefaults "over" (get .root.Values.roles .role)) -}}
{{- end -}}

{{/* The gRPC service a role's readiness probe asks grpc.health.v1 about. */}}
{{- define "p2r.healthService" -}}
{{- $names := dict "perceiver" "p2r.v1.Perceiver" "reasoner" "p2r.v1.Reasoner" "verifier" "p2r.v1.Verifier" "gateway" "p2r.v1.P2R" -}}
{{- get $names . -}}
{{- end -}}

{{/* terminationGracePeriodSeconds: preStop delay + drain window + engine shutdown margin. */}}
{{- define "p2r.terminationGrace" -}}
{{- add .Values.drain.preStopSleepSeconds .Values.drain.gracePeriodSeconds .Values.drain.marginSeconds -}}
{{- end -}}

{{- define "p2r.s3SecretName" -}}
{{- if .Values.s3.existingSecret -}}
{{- .Values.s3.existingSecret -}}
{{- else -}}
{{- printf "%s-s3" (include "p2r.fullname" .) -}}
{{- end -}}
{{- end -}}

{{- define "p2r.s3Endpoint" -}}
{{- if .Values.minio.enabled -}}
{{- printf "%s-minio:9000" (include "p2r.fullname" .) -}}
{{- else -}}
{{- required "s3.externalEndpoint is required when minio.enabled is false (host:port of your S3 / MinIO)" .Values.s3.externalEndpoint -}}
{{- end -}}
{{- end -}}

{{/* S3 environment of a P2R container: endpoint and credentials, the latter only from the Secret. */}}
{{- define "p2r.s3Env" -}}
- name: P2R_S3_ENDPOINT
  value: {{ include "p2r.s3Endpoint" . | quote }}
- name: P2R_S3_SECURE
  value: {{ .Values.s3.secure | quote }}
- name: AWS_ACCESS_KEY_ID
  valueFrom:
    secretKeyRef:
      name: {{ include "p2r.s3SecretName" . }}
      key: {{ .Values.s3.accessKeyKey }}
- name: AWS_SECRET_ACCESS_KEY
  valueFrom:
    secretKeyRef:
      name: {{ include "p2r.s3SecretName" . }}
      key: {{ .Values.s3.secretKeyKey }}
{{- end -}}

{{/* Scrape annotations for a plain Prometheus (kubernetes-pods job), when the operator objects are off. */}}
{{- define "p2r.scrapeAnnotations" -}}
{{- if and .root.Values.monitoring.scrapeAnnotations (not .root.Values.monitoring.serviceMonitor.enabled) }}
prometheus.io/scrape: "true"
prometheus.io/port: {{ .port | quote }}
prometheus.io/path: /metrics
{{- end }}
{{- end -}}

{{/* Checks that cannot be expressed in values.schema.json, with messages that say what to change. */}}
{{- define "p2r.validate" -}}
{{- $window := mul .Values.probes.liveness.periodSeconds .Values.probes.liveness.failureThreshold -}}
{{- $drain := add .Values.drain.preStopSleepSeconds .Values.drain.gracePeriodSeconds -}}
{{- if lt (int $window) (int $drain) -}}
{{- fail (printf "probes.liveness: periodSeconds x failureThreshold = %ds is shorter than the drain (drain.preStopSleepSeconds + drain.gracePeriodSeconds = %ds); a draining pod would be killed by its liveness probe" (int $window) (int $drain)) -}}
{{- end -}}
{{- if and (not .Values.minio.enabled) (not .Values.s3.existingSecret) -}}
{{- fail "s3.existingSecret is required when minio.enabled is false: the chart never invents credentials for an external S3" -}}
{{- end -}}
{{- if and .Values.controller.enabled (not (and .Values.roles.perceiver.enabled .Values.roles.reasoner.enabled .Values.roles.verifier.enabled)) -}}
{{- fail "controller.enabled needs roles.perceiver, roles.reasoner and roles.verifier: the pipeline rolls them onto new checkpoints and its trainers call them" -}}
{{- end -}}
{{- $g := get .Values.roles "gateway" -}}
{{- if and $g.enabled (not $g.model) -}}
{{- if not (and .Values.roles.perceiver.enabled .Values.roles.reasoner.enabled) -}}
{{- fail "roles.gateway without a model calls the perceiver and reasoner: enable roles.perceiver and roles.reasoner, or give roles.gateway.model" -}}
{{- end -}}
{{- end -}}
{{- end -}}

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
{{- with .root.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/*
An image reference with global.imageRegistry applied: the registry part of REF (its first path
component when that names a host: has a "." or ":", or is "localhost") is replaced by it.
Call with (dict "root" $ "ref" "quay.io/minio/minio:TAG").
*/}}
{{- define "p2r.registry" -}}
{{- $registry := (.root.Values.global | default dict).imageRegistry | default "" -}}
{{- if $registry -}}
{{- $parts := splitList "/" .ref -}}
{{- $first := first $parts -}}
{{- if and (gt (len $parts) 1) (or (contains "." $first) (contains ":" $first) (eq $first "localhost")) -}}
{{- $parts = rest $parts -}}
{{- end -}}
{{- printf "%s/%s" (trimSuffix "/" $registry) (join "/" $parts) -}}
{{- else -}}
{{- .ref -}}
{{- end -}}
{{- end -}}

{{/* The P2R image: repository (with global.imageRegistry), then @digest when given, else :tag. */}}
{{- define "p2r.image" -}}
{{- $repo := include "p2r.registry" (dict "root" . "ref" .Values.image.repository) -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" $repo .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" $repo (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}
{{- end -}}

{{/* imagePullSecrets of a pod spec (empty when none are configured). */}}
{{- define "p2r.imagePullSecrets" -}}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{/*
Helm's merge semantics for two maps, the override winning with zero values included (sprig's
mergeOverwrite drops `0`, `false` and `[]`, which would make `gpus: 0` or `structured_perceiver:
false` impossible):
- `null` removes a key (so a role can drop a default, e.g. `roles.gateway.nodeSelector: null`);
- a map under a key named in `replace` replaces the default map whole (`nodeSelector: {}` clears
  it), any other map merges key by key;
- lists and scalars replace.
Call with (dict "base" MAP "over" MAP ["replace" LIST]); returns JSON.
*/}}
{{- define "p2r.merge" -}}
{{- $out := deepCopy (.base | default dict) -}}
{{- $replace := .replace | default list -}}
{{- range $k, $v := (.over | default dict) -}}
{{- if kindIs "invalid" $v -}}
{{- $_ := unset $out $k -}}
{{- else if kindIs "map" $v -}}
{{- $base := get $out $k -}}
{{- if or (has $k $replace) (not (kindIs "map" $base)) -}}{{- $base = dict -}}{{- end -}}
{{- $_ := set $out $k (include "p2r.merge" (dict "base" $base "over" $v) | fromJson) -}}
{{- else -}}
{{- $_ := set $out $k $v -}}
{{- end -}}
{{- end -}}
{{- toJson $out -}}
{{- end -}}

{{/* Role keys whose map is copied verbatim into a Kubernetes field: a role's value replaces
roleDefaults' whole (serveConfig, autoscaling, pdb, service, ephemeral merge key by key). */}}
{{- define "p2r.replacedRoleKeys" -}}
{{- toJson (list "nodeSelector" "affinity" "resources" "podAnnotations" "podLabels" "updateStrategy") -}}
{{- end -}}

{{/* One role's settings: roleDefaults merged with roles.<name> (p2r.merge). Call with (dict "root" $ "role" NAME). */}}
{{- define "p2r.role" -}}
{{- include "p2r.merge" (dict "base" .root.Values.roleDefaults "over" (get .root.Values.roles .role) "replace" (include "p2r.replacedRoleKeys" . | fromJsonArray)) -}}
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

{{/*
S3 credentials. Three Secrets at most: the admin one (s3.existingSecret or "<fullname>-s3": MinIO's
root user and the hooks) and, with s3.users.create on the release's MinIO, a read-only user for
the role servers and a read-write one for the controller and its trainers ("<fullname>-s3-reader",
"-s3-writer", or s3.users.<user>.existingSecret).
*/}}
{{/* Secret name of USER's credentials: (dict "root" $ "user" "admin"|"reader"|"writer"). */}}
{{- define "p2r.s3UserSecret" -}}
{{- $s3 := .root.Values.s3 -}}
{{- if eq .user "admin" -}}
{{- include "p2r.s3SecretName" .root -}}
{{- else if (get $s3.users .user).existingSecret -}}
{{- (get $s3.users .user).existingSecret -}}
{{- else if and .root.Values.minio.enabled $s3.users.create -}}
{{- printf "%s-s3-%s" (include "p2r.fullname" .root) .user -}}
{{- else -}}
{{- include "p2r.s3SecretName" .root -}}
{{- end -}}
{{- end -}}

{{/* The Secrets this chart generates: JSON list of [secret name, user]. */}}
{{- define "p2r.generatedS3Secrets" -}}
{{- $out := list -}}
{{- if .Values.minio.enabled -}}
{{- if not .Values.s3.existingSecret -}}{{- $out = append $out (list (include "p2r.s3SecretName" .) "admin") -}}{{- end -}}
{{- if .Values.s3.users.create -}}
{{- range $user := list "reader" "writer" -}}
{{- if not (get $.Values.s3.users $user).existingSecret -}}
{{- $out = append $out (list (include "p2r.s3UserSecret" (dict "root" $ "user" $user)) $user) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- toJson $out -}}
{{- end -}}

{{/*
The data (base64 values) of an S3 Secret as this render sees it, the same in every template of
one render: the object in the cluster when `lookup` finds it (upgrades keep their keys), else new
random keys for a Secret the chart generates (install), else {} (an existing Secret that `helm
template` cannot read). Call with (dict "root" $ "user" USER); returns JSON.
*/}}
{{- define "p2r.s3SecretData" -}}
{{- $name := include "p2r.s3UserSecret" . -}}
{{- $memo := .root.Values.s3 -}}
{{- if not (hasKey $memo "__p2rSecretData") -}}{{- $_ := set $memo "__p2rSecretData" dict -}}{{- end -}}
{{- $cache := get $memo "__p2rSecretData" -}}
{{- if not (hasKey $cache $name) -}}
{{- $data := dict -}}
{{- $existing := lookup "v1" "Secret" .root.Release.Namespace $name -}}
{{- if and $existing $existing.data -}}
{{- $data = $existing.data -}}
{{- else -}}
{{- range $g := include "p2r.generatedS3Secrets" .root | fromJsonArray -}}
{{- if eq (index $g 0) $name -}}
{{- $user := index $g 1 | replace "admin" "root" -}}
{{- $_ := set $data $.root.Values.s3.accessKeyKey (printf "p2r-%s-%s" $user (randAlphaNum 12 | lower) | b64enc) -}}
{{- $_ := set $data $.root.Values.s3.secretKeyKey (randAlphaNum 40 | b64enc) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- $_ := set $cache $name $data -}}
{{- end -}}
{{- toJson (get $cache $name) -}}
{{- end -}}

{{/* checksum/s3-credentials of USER's Secret (empty when its data is unknown to this render):
pods roll when the keys they read change. Call with (dict "root" $ "user" USER). */}}
{{- define "p2r.s3Checksum" -}}
{{- $data := include "p2r.s3SecretData" . | fromJson -}}
{{- if $data -}}{{- toJson $data | sha256sum -}}{{- end -}}
{{- end -}}

{{/* S3 environment of a P2R container: endpoint and USER's credentials, the latter only from
its Secret. Call with (dict "root" $ "user" "admin"|"reader"|"writer"). */}}
{{- define "p2r.s3Env" -}}
{{- $secret := include "p2r.s3UserSecret" . -}}
- name: P2R_S3_ENDPOINT
  value: {{ include "p2r.s3Endpoint" .root | quote }}
- name: P2R_S3_SECURE
  value: {{ .root.Values.s3.secure | quote }}
- name: AWS_ACCESS_KEY_ID
  valueFrom:
    secretKeyRef:
      name: {{ $secret }}
      key: {{ .root.Values.s3.accessKeyKey }}
- name: AWS_SECRET_ACCESS_KEY
  valueFrom:
    secretKeyRef:
      name: {{ $secret }}
      key: {{ .root.Values.s3.secretKeyKey }}
{{- end -}}

{{/* Hugging Face settings of a container that may download hf:// models: the cache on /cache,
the mirror (HF_ENDPOINT) and the token from its Secret. */}}
{{- define "p2r.hfEnv" -}}
{{- $hf := .Values.models.huggingFace -}}
- {name: HF_HOME, value: /cache/huggingface}
{{- with $hf.endpoint }}
- {name: HF_ENDPOINT, value: {{ . | quote }}}
{{- end }}
{{- with $hf.tokenSecret }}
- name: HF_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: {{ $hf.tokenSecretKey }}
{{- end }}
{{- end -}}

{{/* gRPC target of a role for in-cluster clients: dns:/// of its headless Service, so the
client's round_robin sees every pod. Call with (dict "root" $ "role" NAME). */}}
{{- define "p2r.roleTarget" -}}
{{- printf "dns:///%s-%s.%s.svc.%s:%v" (include "p2r.fullname" .root) .role .root.Release.Namespace .root.Values.clusterDomain .root.Values.ports.grpc -}}
{{- end -}}

{{/* The /cache volume of a role pod: a shared claim, a per-pod ephemeral claim or an emptyDir. */}}
{{- define "p2r.cacheVolume" -}}
- name: cache
  {{- if .Values.cache.existingClaim }}
  persistentVolumeClaim:
    claimName: {{ .Values.cache.existingClaim }}
  {{- else if .Values.cache.ephemeral.enabled }}
  {{- $tpl := deepCopy .Values.cache.ephemeral.volumeClaimTemplate }}
  {{- if not $tpl.spec.storageClassName }}{{- $_ := unset $tpl.spec "storageClassName" }}{{- end }}
  ephemeral:
    volumeClaimTemplate:
      {{- toYaml $tpl | nindent 6 }}
  {{- else }}
  emptyDir:
    sizeLimit: {{ .Values.cache.sizeLimit }}
  {{- end }}
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

{{/* S3 policy (MinIO IAM JSON) of a chart user: list and read the whole bucket, write only under
PREFIXES (none: read-only). Call with (dict "bucket" NAME "prefixes" LIST). */}}
{{- define "p2r.s3Policy" -}}
{{- $statements := list
      (dict "Effect" "Allow" "Action" (list "s3:GetBucketLocation" "s3:ListBucket" "s3:ListBucketMultipartUploads") "Resource" (list (printf "arn:aws:s3:::%s" .bucket)))
      (dict "Effect" "Allow" "Action" (list "s3:GetObject") "Resource" (list (printf "arn:aws:s3:::%s/*" .bucket))) -}}
{{- if .prefixes -}}
{{- $resources := list -}}
{{- range $p := .prefixes }}{{ $resources = append $resources (printf "arn:aws:s3:::%s/%s*" $.bucket $p) }}{{ end -}}
{{- $statements = append $statements (dict "Effect" "Allow" "Action" (list "s3:PutObject" "s3:DeleteObject" "s3:AbortMultipartUpload" "s3:ListMultipartUploadParts") "Resource" $resources) -}}
{{- end -}}
{{- toJson (dict "Version" "2012-10-17" "Statement" $statements) -}}
{{- end -}}

{{/* The common part of the `helm test` containers: environment, resources, security, /tmp. */}}
{{- define "p2r.testContainer" -}}
{{- $sec := .Values.security | default dict -}}
{{- $tls := ($sec.tls | default dict) -}}
env:
  - {name: HOME, value: /tmp}
  {{- if $tls.secretName }}
  - {name: P2R_CLIENT_CA_FILE, value: /etc/p2r/tls/ca.crt}
  {{- if $tls.requireClientCert }}
  - {name: P2R_CLIENT_CERT_FILE, value: /etc/p2r/tls/tls.crt}
  - {name: P2R_CLIENT_KEY_FILE, value: /etc/p2r/tls/tls.key}
  {{- end }}
  {{- end }}
  {{- with .Values.tests.apiKeySecret }}
  - name: P2R_CLIENT_API_KEY
    valueFrom:
      secretKeyRef: {name: {{ .name }}, key: {{ .key }}}
  {{- end }}
resources:
  requests: {cpu: 100m, memory: 256Mi}
  limits: {memory: 1Gi}
securityContext:
  {{- toYaml .Values.containerSecurityContext | nindent 2 }}
volumeMounts:
  - {name: tmp, mountPath: /tmp}
  {{- if $tls.secretName }}
  - {name: tls, mountPath: /etc/p2r/tls, readOnly: true}
  {{- end }}
{{- end -}}

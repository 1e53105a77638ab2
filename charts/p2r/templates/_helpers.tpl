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

{{/* One role's settings: roleDefaults merged with roles.<name> (p2r.merge), then the values the
chart derives when they are left unset (null):
- enabled: the verifier runs only when the pipeline controller does (every training stage and the
  baseline grade free_form answers with it, and eval does with eval.grade_free_form); any other
  role runs;
- updateStrategy: a GPU role (gpus > 0) replaces its pods one at a time without a surge pod
  (maxSurge 0, maxUnavailable 1: no spare GPU needed); a CPU role surges one first (maxSurge 1,
  maxUnavailable 0).
Call with (dict "root" $ "role" NAME). */}}
{{- define "p2r.role" -}}
{{- $r := include "p2r.merge" (dict "base" .root.Values.roleDefaults "over" (get .root.Values.roles .role) "replace" (include "p2r.replacedRoleKeys" . | fromJsonArray)) | fromJson -}}
{{- if or (not (hasKey $r "enabled")) (kindIs "invalid" (index $r "enabled")) -}}
{{- $_ := set $r "enabled" (ternary (and .root.Values.controller.enabled true) true (eq .role "verifier")) -}}
{{- end -}}
{{- if not (get $r "updateStrategy") -}}
{{- $_ := set $r "updateStrategy" (ternary (dict "maxSurge" 0 "maxUnavailable" 1) (dict "maxSurge" 1 "maxUnavailable" 0) (gt (int $r.gpus) 0)) -}}
{{- end -}}
{{- toJson $r -}}
{{- end -}}

{{/* "true" when the role runs (p2r.role's enabled, derived for the verifier), else empty. Call
with (dict "root" $ "role" NAME). */}}
{{- define "p2r.roleEnabled" -}}
{{- if (include "p2r.role" . | fromJson).enabled }}true{{ end -}}
{{- end -}}

{{/* "true" when something in the release uses object storage, else empty: MinIO switched on by
hand, an external endpoint or credentials given, the pipeline controller (checkpoints, eval
results), the seeding Job, or a running role serving an s3:// model. Without any of them no pod
gets S3 settings and no storage object is rendered. */}}
{{- define "p2r.s3Used" -}}
{{- $used := or (eq (toString .Values.minio.enabled) "true") .Values.s3.externalEndpoint .Values.s3.existingSecret .Values.controller.enabled .Values.models.seed.enabled -}}
{{- range $name := list "perceiver" "reasoner" "verifier" "gateway" -}}
{{- $role := include "p2r.role" (dict "root" $ "role" $name) | fromJson -}}
{{- if and $role.enabled (hasPrefix "s3://" (toString $role.model)) -}}{{- $used = true -}}{{- end -}}
{{- end -}}
{{- if $used }}true{{ end -}}
{{- end -}}

{{/* "true" when the release runs its own MinIO, else empty: minio.enabled when set (true / false),
else (null) when object storage is used (p2r.s3Used) and no s3.externalEndpoint is given. */}}
{{- define "p2r.minioEnabled" -}}
{{- if kindIs "bool" .Values.minio.enabled -}}
{{- if .Values.minio.enabled }}true{{ end -}}
{{- else if and (include "p2r.s3Used" .) (not .Values.s3.externalEndpoint) -}}
true
{{- end -}}
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
{{- if include "p2r.minioEnabled" . -}}
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
{{- else if and (include "p2r.minioEnabled" .root) $s3.users.create -}}
{{- printf "%s-s3-%s" (include "p2r.fullname" .root) .user -}}
{{- else -}}
{{- include "p2r.s3SecretName" .root -}}
{{- end -}}
{{- end -}}

{{/* The Secrets this chart generates: JSON list of [secret name, user]. */}}
{{- define "p2r.generatedS3Secrets" -}}
{{- $out := list -}}
{{- if include "p2r.minioEnabled" . -}}
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

{{/* checksum/s3-credentials of USER's Secret, computed only from content the render knows: a
Secret of yours (existingSecret) that `lookup` reads from the cluster (helm install / upgrade), so
pods roll when you rotate its keys and upgrade. Empty - no annotation - for a Secret this chart
generates (its keys are made once and kept, so nothing to roll on; a checksum of freshly generated
keys would restart every pod on each `helm template` / Argo CD render) and wherever `lookup` sees
nothing (`helm template`, Argo CD). Call with (dict "root" $ "user" USER). */}}
{{- define "p2r.s3Checksum" -}}
{{- $name := include "p2r.s3UserSecret" . -}}
{{- $generated := false -}}
{{- range $g := include "p2r.generatedS3Secrets" .root | fromJsonArray -}}
{{- if eq (index $g 0) $name -}}{{- $generated = true -}}{{- end -}}
{{- end -}}
{{- if not $generated -}}
{{- $data := include "p2r.s3SecretData" . | fromJson -}}
{{- if $data -}}{{- toJson $data | sha256sum -}}{{- end -}}
{{- end -}}
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

{{/*
The kind of /cache volume a role pod gets (values cache.*; the first that applies):
- "existingClaim": cache.existingClaim, one claim shared by every role pod (kept beyond the release);
- "hostPath": cache.hostPath.path, a node-local directory (kept on the node across pods and releases);
- "ephemeral": cache.ephemeral.enabled, a generic ephemeral volume (created and deleted with the pod);
- "persistence": cache.persistence.enabled and the role serves a model: the role's own claim
  "<fullname>-<role>-cache" (kept across pod restarts, reschedules, rollouts and upgrades;
  deleted with the release);
- "emptyDir": otherwise (deleted with the pod), e.g. the model-less gateway.
Call with (dict "root" $ "role" ROLE-SETTINGS); returns the kind.
*/}}
{{- define "p2r.cacheKind" -}}
{{- $c := .root.Values.cache -}}
{{- if $c.existingClaim -}}existingClaim
{{- else if ($c.hostPath | default dict).path -}}hostPath
{{- else if $c.ephemeral.enabled -}}ephemeral
{{- else if and ($c.persistence | default dict).enabled .role.model -}}persistence
{{- else -}}emptyDir
{{- end -}}
{{- end -}}

{{/* The /cache volume of a role pod (p2r.cacheKind). Call with (dict "root" $ "name" NAME "role" ROLE-SETTINGS). */}}
{{- define "p2r.cacheVolume" -}}
{{- $c := .root.Values.cache -}}
{{- $kind := include "p2r.cacheKind" . -}}
- name: cache
  {{- if eq $kind "existingClaim" }}
  persistentVolumeClaim:
    claimName: {{ $c.existingClaim }}
  {{- else if eq $kind "hostPath" }}
  hostPath:
    path: {{ $c.hostPath.path }}
    type: Directory
  {{- else if eq $kind "ephemeral" }}
  {{- $tpl := deepCopy $c.ephemeral.volumeClaimTemplate }}
  {{- if not $tpl.spec.storageClassName }}{{- $_ := unset $tpl.spec "storageClassName" }}{{- end }}
  ephemeral:
    volumeClaimTemplate:
      {{- toYaml $tpl | nindent 6 }}
  {{- else if eq $kind "persistence" }}
  persistentVolumeClaim:
    claimName: {{ include "p2r.fullname" .root }}-{{ .name }}-cache
  {{- else }}
  emptyDir:
    sizeLimit: {{ include "p2r.cacheEmptyDirSize" . }}
  {{- end }}
{{- end -}}

{{/* Size limit of an emptyDir /cache: cache.sizeLimit for a role with a model, tmpSizeLimit for
one without (HOME and small caches only). Call with (dict "root" $ "role" ROLE-SETTINGS). */}}
{{- define "p2r.cacheEmptyDirSize" -}}
{{- if .role.model }}{{ .root.Values.cache.sizeLimit }}{{ else }}{{ .root.Values.tmpSizeLimit }}{{ end -}}
{{- end -}}

{{/* Bytes of a Kubernetes quantity ("40Gi", "500M", "1024", 2e9). */}}
{{- define "p2r.quantityBytes" -}}
{{- $q := toString . -}}
{{- $units := dict "Ki" 1024 "Mi" 1048576 "Gi" 1073741824 "Ti" 1099511627776 "k" 1000 "M" 1000000 "G" 1000000000 "T" 1000000000000 -}}
{{- $out := "" -}}
{{- range $u := list "Ki" "Mi" "Gi" "Ti" "k" "M" "G" "T" -}}
{{- if and (not $out) (hasSuffix $u $q) -}}
{{- $out = mulf (float64 (trimSuffix $u $q)) (get $units $u) | ceil | int64 | toString -}}
{{- end -}}
{{- end -}}
{{- $out | default (float64 $q | ceil | int64 | toString) -}}
{{- end -}}

{{/* requests.ephemeral-storage of a role's serve container: the size limits of its disk-backed
emptyDirs (/tmp, and /cache when p2r.cacheKind is emptyDir), so the scheduler places the pod
on a node with that much local disk. Call with (dict "root" $ "name" NAME "role" ROLE-SETTINGS). */}}
{{- define "p2r.roleScratch" -}}
{{- $bytes := include "p2r.quantityBytes" .root.Values.tmpSizeLimit | int64 -}}
{{- if eq (include "p2r.cacheKind" .) "emptyDir" -}}
{{- $bytes = add $bytes (include "p2r.quantityBytes" (include "p2r.cacheEmptyDirSize" .) | int64) -}}
{{- end -}}
{{- if eq (mod $bytes 1073741824) 0 -}}{{ div $bytes 1073741824 }}Gi
{{- else if eq (mod $bytes 1048576) 0 -}}{{ div $bytes 1048576 }}Mi
{{- else -}}{{ $bytes }}
{{- end -}}
{{- end -}}

{{/* progressDeadlineSeconds of a role Deployment: the startup probe's budget (initial delay +
periodSeconds x failureThreshold) plus roleDefaults.progressMarginSeconds (scheduling, image
pull), so a rollout is never declared failed while a pod may still legitimately be starting. */}}
{{- define "p2r.progressDeadline" -}}
{{- $s := .root.Values.probes.startup -}}
{{- add ($s.initialDelaySeconds | default 0) (mul $s.periodSeconds $s.failureThreshold) .role.progressMarginSeconds -}}
{{- end -}}

{{/* Scrape annotations for a plain Prometheus (the job in ConfigMap <release>-scrape-config,
monitoring.yaml), when the operator objects are off. Call with (dict "root" $ "port" PORT ["tls"
true]): "tls" for a port that serves HTTPS (the role servers under security.tls). */}}
{{- define "p2r.scrapeAnnotations" -}}
{{- if and .root.Values.monitoring.scrapeAnnotations (not .root.Values.monitoring.serviceMonitor.enabled) }}
prometheus.io/scrape: "true"
prometheus.io/scheme: {{ ternary "https" "http" (and (not (empty .tls)) (not (empty .root.Values.security.tls.secretName))) }}
prometheus.io/port: {{ .port | quote }}
prometheus.io/path: /metrics
{{- end }}
{{- end -}}

{{/* How Prometheus scrapes a role server's metrics port, as Prometheus Operator endpoint fields
(ServiceMonitor): plain HTTP, or under security.tls HTTPS checked against the TLS Secret's
ca.crt for the role Service's name (the certificate must name it), presenting the Secret's own
certificate when security.tls.requireClientCert demands client certificates. Call with (dict
"root" $ "component" ROLE); returns YAML (scheme, tlsConfig). */}}
{{- define "p2r.metricsEndpointTLS" -}}
{{- $tls := .root.Values.security.tls -}}
{{- if $tls.secretName -}}
scheme: https
tlsConfig:
  ca: {secret: {name: {{ $tls.secretName }}, key: ca.crt}}
  serverName: {{ printf "%s-%s" (include "p2r.fullname" .root) .component }}
  {{- if $tls.requireClientCert }}
  cert: {secret: {name: {{ $tls.secretName }}, key: tls.crt}}
  keySecret: {name: {{ $tls.secretName }}, key: tls.key}
  {{- end }}
{{- else -}}
scheme: http
{{- end -}}
{{- end -}}

{{/* Checks that cannot be expressed in values.schema.json, with messages that say what to change. */}}
{{- define "p2r.validate" -}}
{{- $window := mul .Values.probes.liveness.periodSeconds .Values.probes.liveness.failureThreshold -}}
{{- $drain := add .Values.drain.preStopSleepSeconds .Values.drain.gracePeriodSeconds -}}
{{- if lt (int $window) (int $drain) -}}
{{- fail (printf "probes.liveness: periodSeconds x failureThreshold = %ds is shorter than the drain (drain.preStopSleepSeconds + drain.gracePeriodSeconds = %ds); a draining pod would be killed by its liveness probe" (int $window) (int $drain)) -}}
{{- end -}}
{{- include "p2r.validateStorage" . -}}
{{- if and (include "p2r.s3Used" .) (not (include "p2r.minioEnabled" .)) (not .Values.s3.existingSecret) -}}
{{- fail "s3.existingSecret is required when minio.enabled is false: the chart never invents credentials for an external S3" -}}
{{- end -}}
{{- if and .Values.controller.enabled (not (and (include "p2r.roleEnabled" (dict "root" . "role" "perceiver")) (include "p2r.roleEnabled" (dict "root" . "role" "reasoner")) (include "p2r.roleEnabled" (dict "root" . "role" "verifier")))) -}}
{{- fail "controller.enabled needs roles.perceiver, roles.reasoner and roles.verifier: the pipeline rolls them onto new checkpoints and its trainers call them" -}}
{{- end -}}
{{- range $name := list "perceiver" "reasoner" "verifier" "gateway" -}}
{{- $role := include "p2r.role" (dict "root" $ "role" $name) | fromJson -}}
{{- if and $role.enabled (eq (include "p2r.cacheKind" (dict "root" $ "role" $role)) "persistence") (not (has "ReadWriteMany" $.Values.cache.persistence.accessModes)) (or $role.autoscaling.enabled (gt (int $role.replicas) 1)) -}}
{{- fail (printf "roles.%s runs several pods, but its model cache claim (cache.persistence) is not ReadWriteMany: pods on other nodes could not mount it. Set cache.persistence.accessModes [ReadWriteMany] with a storageClassName that provides it (NFS, CephFS, EFS, Filestore), or use cache.hostPath / cache.ephemeral" $name) -}}
{{- end -}}
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

{{/* The bucket's layout (s3.layout): the one place the release's S3 paths come from. The writer
user's policy (p2r.s3WriterPrefixes), the controller's storage (p2r.s3Storage) and the seed Job's
URIs are all derived from it, so a path and the permission to write it cannot disagree. */}}
{{- define "p2r.s3WriterPrefixes" -}}
{{- toJson (list (printf "%s/" .Values.s3.layout.runs)) -}}
{{- end -}}

{{/* controller.config.storage, or s3://<bucket>/<layout.runs> when it is empty. */}}
{{- define "p2r.s3Storage" -}}
{{- .Values.controller.config.storage | default (printf "s3://%s/%s" .Values.s3.bucket .Values.s3.layout.runs) | trimSuffix "/" -}}
{{- end -}}

{{/* s3:// URI of a seeded object set: (dict "root" $ "kind" "models"|"data" "name" NAME). */}}
{{- define "p2r.s3SeedUri" -}}
{{- printf "s3://%s/%s/%s" .root.Values.s3.bucket (get .root.Values.s3.layout .kind) .name -}}
{{- end -}}

{{/* Fails when an s3:// URI of the release names another bucket than s3.bucket (the writer,
the reader and the seed Job reach only that one), or the run storage lies outside the prefix the
writer may write. */}}
{{- define "p2r.validateStorage" -}}
{{- $bucket := .Values.s3.bucket -}}
{{- $uris := dict -}}
{{- $cfg := .Values.controller.config | default dict -}}
{{- range $key := list "base_model" "verifier_model" "data" "image_prefix" -}}
{{- with get $cfg $key }}{{ $_ := set $uris (printf "controller.config.%s" $key) (toString .) }}{{ end -}}
{{- end -}}
{{- range $name := list "perceiver" "reasoner" "verifier" "gateway" -}}
{{- with (get $.Values.roles $name) }}{{ with .model }}{{ $_ := set $uris (printf "roles.%s.model" $name) (toString .) }}{{ end }}{{ end -}}
{{- end -}}
{{- range $key, $uri := $uris -}}
{{- $u := trimPrefix "latest:" $uri -}}
{{- if hasPrefix "s3://" $u -}}
{{- if not (hasPrefix (printf "s3://%s/" $bucket) $u) -}}
{{- fail (printf "%s: %s is not in s3.bucket %q; the release's S3 users reach that bucket only (use s3://%s/...)" $key $uri $bucket $bucket) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- if .Values.controller.enabled -}}
{{- $storage := include "p2r.s3Storage" . -}}
{{- $root := printf "s3://%s/%s" $bucket .Values.s3.layout.runs -}}
{{- if not (or (eq $storage $root) (hasPrefix (printf "%s/" $root) $storage)) -}}
{{- fail (printf "controller.config.storage: %s is outside s3://%s/%s/, the only prefix the writer user may write (s3.layout.runs); leave it empty for %s" $storage $bucket .Values.s3.layout.runs $root) -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* The script that creates the bucket and (with "users") the reader / writer policies and
users: idempotent, run by MinIO's provision container ("local": its own server on 127.0.0.1,
waited for without a deadline) or the external bucket hook (bounded by P2R_WAIT_SECONDS). The
writer's policy grants writes under p2r.s3WriterPrefixes (s3.layout.runs), the same value the
controller's storage comes from. Call with (dict "root" $ "users" BOOL "local" BOOL). */}}
{{- define "p2r.s3ProvisionScript" -}}
{{- $root := .root -}}
{{- $full := include "p2r.fullname" $root -}}
{{- $bucket := $root.Values.s3.bucket -}}
mc() { command mc --config-dir /tmp/mc "$@"; }
scheme=http; [ "$P2R_S3_SECURE" = "true" ] && scheme=https
deadline=$(( $(date +%s) + P2R_WAIT_SECONDS ))
until mc alias set p2r "$scheme://$P2R_S3_ENDPOINT" "$AWS_ACCESS_KEY_ID" "$AWS_SECRET_ACCESS_KEY" >/tmp/alias.log 2>&1; do
  {{- if not .local }}
  if [ "$(date +%s)" -ge "$deadline" ]; then
    echo "error: $P2R_S3_ENDPOINT did not accept the credentials of Secret {{ include "p2r.s3SecretName" $root }} within ${P2R_WAIT_SECONDS}s: $(cat /tmp/alias.log)" >&2
    exit 1
  fi
  {{- end }}
  echo "waiting for $P2R_S3_ENDPOINT"; sleep 5
done
mc mb --ignore-existing "p2r/$P2R_S3_BUCKET"
{{- if .users }}
attach() {  # idempotent: attaching an attached policy is not an error
  out=$(mc admin policy attach p2r "$1" --user "$2" 2>&1) || echo "$out" | grep -qi "already" || { echo "$out" >&2; exit 1; }
}
cat > /tmp/reader.json <<'EOF'
{{ include "p2r.s3Policy" (dict "bucket" $bucket "prefixes" list) }}
EOF
cat > /tmp/writer.json <<'EOF'
{{ include "p2r.s3Policy" (dict "bucket" $bucket "prefixes" (include "p2r.s3WriterPrefixes" $root | fromJsonArray)) }}
EOF
mc admin policy create p2r {{ $full }}-reader /tmp/reader.json
mc admin policy create p2r {{ $full }}-writer /tmp/writer.json
mc admin user add p2r "$READER_ACCESS_KEY" "$READER_SECRET_KEY"
mc admin user add p2r "$WRITER_ACCESS_KEY" "$WRITER_SECRET_KEY"
attach {{ $full }}-reader "$READER_ACCESS_KEY"
attach {{ $full }}-writer "$WRITER_ACCESS_KEY"
{{- end }}
{{- end -}}

{{/* Env of the provisioning script: the bucket, the admin credentials and (with "users") the
reader / writer keys from their Secrets. Call with (dict "root" $ "users" BOOL). */}}
{{- define "p2r.s3ProvisionEnv" -}}
{{- $root := .root -}}
- {name: P2R_S3_BUCKET, value: {{ $root.Values.s3.bucket | quote }}}
- {name: P2R_WAIT_SECONDS, value: {{ $root.Values.s3.hookWaitSeconds | quote }}}
{{- if include "p2r.minioEnabled" $root }}
- {name: P2R_S3_ENDPOINT, value: "127.0.0.1:9000"}
- {name: P2R_S3_SECURE, value: "false"}
- name: AWS_ACCESS_KEY_ID
  valueFrom:
    secretKeyRef: {name: {{ include "p2r.s3SecretName" $root }}, key: {{ $root.Values.s3.accessKeyKey }}}
- name: AWS_SECRET_ACCESS_KEY
  valueFrom:
    secretKeyRef: {name: {{ include "p2r.s3SecretName" $root }}, key: {{ $root.Values.s3.secretKeyKey }}}
{{- else }}
{{ include "p2r.s3Env" (dict "root" $root "user" "admin") }}
{{- end }}
{{- if .users }}
{{- range $user := list "reader" "writer" }}
{{- $userSecret := include "p2r.s3UserSecret" (dict "root" $root "user" $user) }}
- name: {{ upper $user }}_ACCESS_KEY
  valueFrom:
    secretKeyRef: {name: {{ $userSecret }}, key: {{ $root.Values.s3.accessKeyKey }}}
- name: {{ upper $user }}_SECRET_KEY
  valueFrom:
    secretKeyRef: {name: {{ $userSecret }}, key: {{ $root.Values.s3.secretKeyKey }}}
{{- end }}
{{- end }}
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

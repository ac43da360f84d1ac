{{/*
Chart name, truncated to the 63 characters of a DNS label.
*/}}
{{- define "fastapi-app.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Fully qualified app name. Truncated to 52 characters, not 63: suffixes such as "-migrations" and
"-pgbouncer" are appended to it and the result must still be a valid label value.
*/}}
{{- define "fastapi-app.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 52 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 52 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 52 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "fastapi-app.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Labels every object carries besides its name/instance/component.
*/}}
{{- define "fastapi-app.commonLabels" -}}
helm.sh/chart: {{ include "fastapi-app.chart" . }}
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | trunc 63 | trimSuffix "-" | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: {{ include "fastapi-app.name" . }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
Selector of the API pods: name and instance only. Selectors are immutable, so nothing that changes
between releases (version, chart) may be in them.
*/}}
{{- define "fastapi-app.selectorLabels" -}}
app.kubernetes.io/name: {{ include "fastapi-app.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/*
Labels of the API and of the objects that serve it (Service, ConfigMap, HPA, ...).
*/}}
{{- define "fastapi-app.labels" -}}
{{ include "fastapi-app.selectorLabels" . }}
app.kubernetes.io/component: api
{{ include "fastapi-app.commonLabels" . }}
{{- end }}

{{/*
Selector of the other workloads (migrations, pgbouncer, tests), called with
(dict "context" $ "component" "migrations"). They get their own app.kubernetes.io/name because
the API Service selects on name+instance alone: a migration or test pod carrying the API's
name+instance would become a Service endpoint and receive API traffic.
*/}}
{{- define "fastapi-app.componentSelectorLabels" -}}
app.kubernetes.io/name: {{ printf "%s-%s" (include "fastapi-app.name" .context) .component | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/instance: {{ .context.Release.Name }}
{{- end }}

{{- define "fastapi-app.componentLabels" -}}
{{ include "fastapi-app.componentSelectorLabels" . }}
app.kubernetes.io/component: {{ .component }}
{{ include "fastapi-app.commonLabels" .context }}
{{- end }}

{{- define "fastapi-app.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "fastapi-app.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
image reference: repository@digest when a digest is given, else repository:tag.
Called with (dict "image" .Values.image "default" .Chart.AppVersion).
*/}}
{{- define "fastapi-app.imageRef" -}}
{{- if .image.digest }}
{{- printf "%s@%s" .image.repository .image.digest }}
{{- else }}
{{- printf "%s:%s" .image.repository (toString (.image.tag | default .default)) }}
{{- end }}
{{- end }}

{{- define "fastapi-app.image" -}}
{{ include "fastapi-app.imageRef" (dict "image" .Values.image "default" .Chart.AppVersion) }}
{{- end }}

{{- define "fastapi-app.namespace" -}}
{{ .Release.Namespace }}
{{- end }}

{{/*
Environment values: YAML numbers reach templates as float64, and toString would turn 1048576
into "1.048576e+06"; whole numbers are printed as integers.
*/}}
{{- define "fastapi-app.envValue" -}}
{{- if and (kindIs "float64" .) (eq (float64 (int64 .)) .) }}
{{- int64 . | toString }}
{{- else }}
{{- toString . }}
{{- end }}
{{- end }}

{{/*
ConfigMap data: the user's config plus the variables the chart owns. Shared by the release
ConfigMap and the migration hook's copy so both always agree.
*/}}
{{- define "fastapi-app.configData" -}}
{{- $owned := dict "HOST" "0.0.0.0" "PORT" "8000" "METRICS_PORT" "9000" "PROMETHEUS_MULTIPROC_DIR" "/tmp/prometheus-multiproc" }}
{{- with .Values.databaseTLS }}
{{- if .enabled }}
{{- $_ := set $owned "DATABASE_SSL_ROOT_CERT" "/etc/fastapi-app/db-tls/ca.crt" }}
{{- if .clientCertificate }}
{{- $_ := set $owned "DATABASE_SSL_CERT" "/etc/fastapi-app/db-tls/tls.crt" }}
{{- $_ := set $owned "DATABASE_SSL_KEY" "/etc/fastapi-app/db-tls/tls.key" }}
{{- end }}
{{- end }}
{{- end }}
{{- $config := deepCopy .Values.config }}
{{- if and .Values.pgbouncer.enabled (not (hasKey .Values.config "DATABASE_POOL_MODE")) }}
{{- /* PgBouncer that tracks prepared statements lets the app keep its statement caches. */}}
{{- $mode := ternary "pgbouncer-prepared" "pgbouncer-transaction" (gt (int .Values.pgbouncer.maxPreparedStatements) 0) }}
{{- $_ := set $config "DATABASE_POOL_MODE" $mode }}
{{- end }}
{{- if and .Values.pgbouncer.enabled (not (hasKey .Values.config "DATABASE_PLAINTEXT_ALLOWED_HOSTS")) }}
{{- /* The app -> PgBouncer hop stays inside the cluster; PgBouncer -> PostgreSQL is server_tls. */}}
{{- $svc := printf "%s-pgbouncer" (include "fastapi-app.fullname" .) }}
{{- $ns := .Release.Namespace }}
{{- $_ := set $config "DATABASE_PLAINTEXT_ALLOWED_HOSTS" (printf "%s,%s.%s,%s.%s.svc,%s.%s.svc.cluster.local" $svc $svc $ns $svc $ns $svc $ns) }}
{{- end }}
{{- range $key := keys $config | sortAlpha }}
{{- $value := get $config $key }}
{{- if not (kindIs "invalid" $value) }}
{{ $key }}: {{ include "fastapi-app.envValue" $value | quote }}
{{- end }}
{{- end }}
{{- range $key := keys $owned | sortAlpha }}
{{ $key }}: {{ get $owned $key | quote }}
{{- end }}
{{- end }}

{{/*
Secret data (base64), only the keys that have a value. The API's Secret leaves out the schema
owner's credentials (least privilege); they go to the owner Secret, read by the migration Job and
the backup jobs only.
*/}}
{{- define "fastapi-app.ownerSecretKeys" -}}
DATABASE_MIGRATION_URL RESTORE_DRILL_DATABASE_URL
{{- end }}

{{- define "fastapi-app.secretData" -}}
{{- $owner := splitList " " (include "fastapi-app.ownerSecretKeys" .) }}
{{- range $key := keys .Values.secrets | sortAlpha }}
{{- $value := get $.Values.secrets $key }}
{{- if and $value (not (has $key $owner)) }}
{{ $key }}: {{ $value | toString | b64enc | quote }}
{{- end }}
{{- end }}
{{- end }}

{{- define "fastapi-app.ownerSecretData" -}}
{{- range $key := splitList " " (include "fastapi-app.ownerSecretKeys" .) }}
{{- $value := get $.Values.secrets $key }}
{{- if $value }}
{{ $key }}: {{ $value | toString | b64enc | quote }}
{{- end }}
{{- end }}
{{- end }}

{{/*
Name of the Secret with the owner credentials, or "" when there is none (the jobs then use the
app's Secret alone).
*/}}
{{- define "fastapi-app.ownerSecretName" -}}
{{- if .Values.ownerSecret }}
{{- .Values.ownerSecret }}
{{- else if and (not (or .Values.existingSecret .Values.externalSecret.enabled)) (include "fastapi-app.ownerSecretData" . | trim) }}
{{- printf "%s-database-owner" (include "fastapi-app.fullname" .) }}
{{- end }}
{{- end }}

{{/*
Name of a CronJob: Kubernetes limits CronJob names to 52 characters (the Jobs it creates get an
11-character suffix). Called with (dict "context" $ "suffix" "backup").
*/}}
{{- define "fastapi-app.cronJobName" -}}
{{- $room := sub 51 (len .suffix) | int }}
{{- printf "%s-%s" (include "fastapi-app.fullname" .context | trunc $room | trimSuffix "-") .suffix }}
{{- end }}

{{/*
Image of the backup jobs: backup.image when set, else the app image.
*/}}
{{- define "fastapi-app.backupImage" -}}
{{- $b := .Values.backup.image }}
{{- if $b.repository }}
{{- include "fastapi-app.imageRef" (dict "image" $b "default" .Chart.AppVersion) }}
{{- else }}
{{- include "fastapi-app.image" . }}
{{- end }}
{{- end }}

{{/*
Name of the Secret the API pods load: existingSecret, else the chart's own (rendered directly or
by the External Secrets Operator).
*/}}
{{- define "fastapi-app.secretName" -}}
{{- .Values.existingSecret | default (include "fastapi-app.fullname" .) }}
{{- end }}

{{/*
Name of the Secret the migration hook loads: existingSecret exists before any hook, the chart's own
Secret does not, so the hook gets its own copy.
*/}}
{{- define "fastapi-app.migrationsSecretName" -}}
{{- if .Values.existingSecret }}
{{- .Values.existingSecret }}
{{- else }}
{{- printf "%s-migrations" (include "fastapi-app.fullname" .) }}
{{- end }}
{{- end }}

{{/*
Pod-level settings shared by the API Deployment, the migration Job and the test pod. No pod of the
chart talks to the Kubernetes API, so none gets a token.
*/}}
{{- define "fastapi-app.podSecurity" -}}
automountServiceAccountToken: false
securityContext:
  {{- toYaml .Values.podSecurityContext | nindent 2 }}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/*
Writable emptyDirs: /tmp and the prometheus multiprocess directory.
*/}}
{{- define "fastapi-app.volumes" -}}
- name: tmp
  emptyDir:
    sizeLimit: {{ .Values.tmpVolume.sizeLimit }}
- name: prometheus-multiproc
  emptyDir:
    {{- with .Values.metricsVolume.medium }}
    medium: {{ . }}
    {{- end }}
    sizeLimit: {{ .Values.metricsVolume.sizeLimit }}
{{- include "fastapi-app.dbTlsVolume" . }}
{{- end }}

{{- define "fastapi-app.volumeMounts" -}}
- name: tmp
  mountPath: /tmp
- name: prometheus-multiproc
  mountPath: /tmp/prometheus-multiproc
{{- include "fastapi-app.dbTlsVolumeMount" . }}
{{- end }}

{{/*
The database TLS Secret (CA, optional client certificate), read-only; key files 0400 (libpq
refuses a group- or world-readable key), readable through fsGroup.
*/}}
{{- define "fastapi-app.dbTlsVolume" -}}
{{- if .Values.databaseTLS.enabled }}
- name: db-tls
  secret:
    secretName: {{ .Values.databaseTLS.secretName }}
    defaultMode: 0440
{{- end }}
{{- end }}

{{- define "fastapi-app.dbTlsVolumeMount" -}}
{{- if .Values.databaseTLS.enabled }}
- name: db-tls
  mountPath: /etc/fastapi-app/db-tls
  readOnly: true
{{- end }}
{{- end }}

{{/*
PromQL selector of this release's API series, as labelled by the ServiceMonitor (job = Service
name).
*/}}
{{- define "fastapi-app.promSelector" -}}
job="{{ include "fastapi-app.fullname" . }}",namespace="{{ .Release.Namespace }}"
{{- end }}

{{/*
runbook_url of an alert: its heading in docs/runbooks.md (GitHub's anchor of a heading is its
lower-cased text). Called with (dict "context" $ "alert" "FastAPIAppHighErrorRatio").
*/}}
{{- define "fastapi-app.runbookUrl" -}}
{{- printf "%s#%s" (.context.Values.metrics.prometheusRule.runbookBaseUrl | trimSuffix "#") (lower .alert) }}
{{- end }}

{{/*
kube-state-metrics selector of this release's API pods: <deployment>-<pod-template-hash>-<suffix>
(PromQL regexes are anchored, so migration and pgbouncer pods do not match).
*/}}
{{- define "fastapi-app.ksmSelector" -}}
namespace="{{ .Release.Namespace }}",pod=~"{{ include "fastapi-app.fullname" . }}-[a-z0-9]+-[a-z0-9]{5}"
{{- end }}

{{/*
ExternalSecret spec, called with (dict "context" $ "target" "<secret name>"). creationPolicy Owner:
the Secret is garbage-collected with its ExternalSecret.
*/}}
{{- define "fastapi-app.externalSecretSpec" -}}
{{- $es := .context.Values.externalSecret }}
refreshInterval: {{ $es.refreshInterval }}
secretStoreRef:
  name: {{ $es.secretStoreRef.name }}
  kind: {{ $es.secretStoreRef.kind }}
target:
  name: {{ .target }}
  creationPolicy: Owner
{{- with $es.data }}
data:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $es.dataFrom }}
dataFrom:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/*
NetworkPolicy egress rules every workload of the chart needs: DNS.
*/}}
{{- define "fastapi-app.egressDNS" -}}
- to:
    {{- toYaml .Values.networkPolicy.egress.dns.to | nindent 4 }}
  ports:
    - protocol: UDP
      port: 53
    - protocol: TCP
      port: 53
{{- end }}

{{/*
Egress to the database ports (PgBouncer and/or PostgreSQL), called with
(dict "context" $ "ports" (list 5432)).
*/}}
{{- define "fastapi-app.egressDatabase" -}}
{{- $db := .context.Values.networkPolicy.egress.database }}
- ports:
    {{- range .ports }}
    - protocol: TCP
      port: {{ . }}
    {{- end }}
  {{- with $db.to }}
  to:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end }}

{{/*
Peers in a namespace (selected by its immutable kubernetes.io/metadata.name label), optionally
narrowed to some pods. Called with a networkPolicy.ingressController-like dict.
*/}}
{{- define "fastapi-app.namespacePeer" -}}
- namespaceSelector:
    matchLabels:
      kubernetes.io/metadata.name: {{ .namespace }}
  {{- with .podSelector }}
  podSelector:
    matchLabels:
      {{- toYaml . | nindent 6 }}
  {{- end }}
{{- end }}

{{/*
ServiceAccount of the migration hook. The release's ServiceAccount does not exist yet when the
pre-install hook runs (the Job controller could not create the pod until the hook timed out), so a
chart-created account gets a hook copy; an account the chart does not create already exists.
*/}}
{{- define "fastapi-app.migrationsServiceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- printf "%s-migrations" (include "fastapi-app.fullname" .) }}
{{- else }}
{{- include "fastapi-app.serviceAccountName" . }}
{{- end }}
{{- end }}

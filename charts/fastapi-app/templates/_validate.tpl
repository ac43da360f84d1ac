{{/*
Value combinations the schema cannot express. Every problem is collected first and rendering
stops once with all of them, so a user fixes their values in one round instead of one per render.
(values.schema.json, checked before this, likewise reports every schema violation at once.)
*/}}
{{- define "fastapi-app.validate" -}}
{{- $problems := list }}
{{- $graceful := .Values.config.GUNICORN_GRACEFUL_TIMEOUT | default 20 | int }}
{{- $preStop := .Values.lifecycle.preStopSleepSeconds | int }}
{{- $grace := .Values.terminationGracePeriodSeconds | int }}
{{- if le $grace (add $preStop $graceful) }}
{{- $problems = append $problems (printf "terminationGracePeriodSeconds (%d) must be greater than lifecycle.preStopSleepSeconds (%d) + config.GUNICORN_GRACEFUL_TIMEOUT (%d): the kubelet would SIGKILL workers mid-request" $grace $preStop $graceful) }}
{{- end }}
{{- if and .Values.autoscaling.enabled (gt (int .Values.autoscaling.minReplicas) (int .Values.autoscaling.maxReplicas)) }}
{{- $problems = append $problems (printf "autoscaling.minReplicas (%d) must not exceed autoscaling.maxReplicas (%d)" (int .Values.autoscaling.minReplicas) (int .Values.autoscaling.maxReplicas)) }}
{{- end }}
{{- with .Values.podDisruptionBudget }}
{{- if and .enabled (ne (toString .minAvailable) "") (ne (toString .maxUnavailable) "") }}
{{- $problems = append $problems "podDisruptionBudget: set minAvailable or maxUnavailable, not both" }}
{{- end }}
{{- end }}
{{- if and .Values.existingSecret .Values.externalSecret.enabled }}
{{- $problems = append $problems "existingSecret and externalSecret.enabled are alternatives: set only one" }}
{{- end }}
{{- if or .Values.existingSecret .Values.externalSecret.enabled }}
{{- range $key, $value := .Values.secrets }}
{{- if $value }}
{{- $problems = append $problems (printf "secrets.%s is set but ignored because existingSecret/externalSecret provides the Secret: remove it" $key) }}
{{- end }}
{{- end }}
{{- end }}
{{- if .Values.externalSecret.enabled }}
{{- if not .Values.externalSecret.secretStoreRef.name }}
{{- $problems = append $problems "externalSecret.secretStoreRef.name is required when externalSecret.enabled" }}
{{- end }}
{{- if not (or .Values.externalSecret.data .Values.externalSecret.dataFrom) }}
{{- $problems = append $problems "externalSecret: set data or dataFrom" }}
{{- end }}
{{- end }}
{{- if and .Values.pgbouncer.enabled (not .Values.pgbouncer.postgres.host) }}
{{- $problems = append $problems "pgbouncer.postgres.host is required when pgbouncer.enabled" }}
{{- end }}
{{- if and .Values.pgbouncer.enabled (not (or .Values.pgbouncer.auth.existingSecret .Values.pgbouncer.auth.userlist)) }}
{{- $problems = append $problems "pgbouncer.auth.existingSecret (or pgbouncer.auth.userlist) is required when pgbouncer.enabled" }}
{{- end }}
{{- $pgbGrace := .Values.pgbouncer.terminationGracePeriodSeconds | int }}
{{- if and .Values.pgbouncer.enabled (has .Values.pgbouncer.serverTlsSslmode (list "verify-ca" "verify-full")) (not .Values.databaseTLS.enabled) }}
{{- $problems = append $problems (printf "pgbouncer.serverTlsSslmode=%s needs the CA: set databaseTLS.enabled and databaseTLS.secretName" .Values.pgbouncer.serverTlsSslmode) }}
{{- end }}
{{- if and .Values.backup.enabled (not .Values.backup.persistence.enabled) (not .Values.backup.s3.bucket) }}
{{- $problems = append $problems "backup: set persistence.enabled or s3.bucket, or the backups vanish with their pod" }}
{{- end }}
{{- if and .Values.backup.enabled .Values.backup.beforeMigrate (not .Values.migrations.enabled) }}
{{- $problems = append $problems "backup.beforeMigrate needs migrations.enabled (the backup runs just before the migration Job)" }}
{{- end }}
{{- if and .Values.pgbouncer.enabled (le $pgbGrace (int .Values.pgbouncer.preStopSleepSeconds)) }}
{{- $problems = append $problems "pgbouncer.terminationGracePeriodSeconds must be greater than pgbouncer.preStopSleepSeconds" }}
{{- end }}
{{- if .Values.databaseTLS.enabled }}
{{- if not .Values.databaseTLS.secretName }}
{{- $problems = append $problems "databaseTLS.secretName is required when databaseTLS.enabled" }}
{{- end }}
{{- end }}
{{- if $problems }}
{{- fail (printf "\n%d problem(s) with the values:\n- %s" (len $problems) (join "\n- " $problems)) }}
{{- end }}
{{- end }}

{{/*
Pod template of the backup jobs (the CronJobs and the pre-upgrade hook), called with
(dict "context" $ "component" "backup" "args" (list "backup") "deadline" 3600 "resources" {...}
"configMap" name "secrets" (list names)). Same pod and container security context as the API,
read-only root filesystem, /tmp as the only scratch space besides the backup volume.
*/}}
{{- define "fastapi-app.backupJobSpec" -}}
{{- $ := .context }}
{{- $b := $.Values.backup }}
backoffLimit: {{ $b.backoffLimit }}
activeDeadlineSeconds: {{ .deadline }}
ttlSecondsAfterFinished: 86400
template:
  metadata:
    labels:
      {{- include "fastapi-app.componentLabels" (dict "context" $ "component" .component) | nindent 6 }}
    {{- with $b.podAnnotations }}
    annotations:
      {{- toYaml . | nindent 6 }}
    {{- end }}
  spec:
    serviceAccountName: {{ .serviceAccount }}
    {{- include "fastapi-app.podSecurity" $ | nindent 4 }}
    restartPolicy: Never
    containers:
      - name: {{ .component }}
        image: {{ include "fastapi-app.backupImage" $ }}
        imagePullPolicy: {{ $.Values.image.pullPolicy }}
        args: {{ toJson .args }}
        envFrom:
          - configMapRef:
              name: {{ .configMap }}
          {{- range .secrets }}
          - secretRef:
              name: {{ . }}
          {{- end }}
          {{- with $b.s3.existingSecret }}
          - secretRef:
              name: {{ . }}
          {{- end }}
          {{- with $.Values.extraEnvFrom }}
          {{- toYaml . | nindent 10 }}
          {{- end }}
        env:
          # Pushgateway grouping key and the prefix of the backup files: one per release.
          - name: APP_NAME
            value: {{ include "fastapi-app.fullname" $ | quote }}
          - name: BACKUP_DIR
            value: /backups
          - name: BACKUP_KEEP_DAILY
            value: {{ $b.keepDaily | quote }}
          - name: BACKUP_KEEP_WEEKLY
            value: {{ $b.keepWeekly | quote }}
          - name: BACKUP_TIMEOUT_SECONDS
            value: {{ .deadline | quote }}
          {{- with $b.pgBinDir }}
          - name: PG_BIN_DIR
            value: {{ . | quote }}
          {{- end }}
          {{- with $b.metrics.pushgatewayUrl }}
          - name: PUSHGATEWAY_URL
            value: {{ . | quote }}
          {{- end }}
          {{- with $b.s3 }}
          {{- if .bucket }}
          - name: BACKUP_S3_BUCKET
            value: {{ .bucket | quote }}
          - name: BACKUP_S3_PREFIX
            value: {{ .prefix | quote }}
          {{- with .endpointUrl }}
          - name: BACKUP_S3_ENDPOINT_URL
            value: {{ . | quote }}
          {{- end }}
          {{- with .region }}
          - name: BACKUP_S3_REGION
            value: {{ . | quote }}
          {{- end }}
          {{- end }}
          {{- end }}
          {{- with $.Values.extraEnv }}
          {{- toYaml . | nindent 10 }}
          {{- end }}
        resources:
          {{- toYaml .resources | nindent 10 }}
        securityContext:
          {{- toYaml $.Values.securityContext | nindent 10 }}
        volumeMounts:
          {{- include "fastapi-app.volumeMounts" $ | nindent 10 }}
          - name: backups
            mountPath: /backups
    volumes:
      {{- include "fastapi-app.volumes" $ | nindent 6 }}
      - name: backups
        {{- if $b.persistence.enabled }}
        persistentVolumeClaim:
          claimName: {{ include "fastapi-app.backupClaimName" $ }}
        {{- else }}
        emptyDir:
          sizeLimit: {{ $b.persistence.size }}
        {{- end }}
    {{- with $.Values.nodeSelector }}
    nodeSelector:
      {{- toYaml . | nindent 6 }}
    {{- end }}
    {{- with $.Values.affinity }}
    affinity:
      {{- toYaml . | nindent 6 }}
    {{- end }}
    {{- with $.Values.tolerations }}
    tolerations:
      {{- toYaml . | nindent 6 }}
    {{- end }}
{{- end }}

{{- define "fastapi-app.backupClaimName" -}}
{{- .Values.backup.persistence.existingClaim | default (printf "%s-backups" (include "fastapi-app.fullname" .)) }}
{{- end }}

{{/*
Secrets the backup jobs load: the app's (production guards need DATABASE_URL and the gateway
secret; the drill's smoke check sends it) and the owner's (DATABASE_MIGRATION_URL).
*/}}
{{- define "fastapi-app.backupSecrets" -}}
{{- $names := list (include "fastapi-app.secretName" .) }}
{{- with include "fastapi-app.ownerSecretName" . }}
{{- $names = append $names . }}
{{- end }}
{{- toJson $names }}
{{- end }}

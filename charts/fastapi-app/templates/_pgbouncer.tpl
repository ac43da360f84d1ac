{{/*
pgbouncer.ini of the optional PgBouncer; hashed into its pods' checksum/config annotation.
*/}}
{{- define "fastapi-app.pgbouncerIni" -}}
[databases]
{{- with .Values.pgbouncer.replica }}
{{- if .host }}
; The read replica, under its own name: DATABASE_READ_URL names this database.
{{ .alias }} = host={{ .host }} port={{ .port }} dbname={{ .dbname }}
{{- end }}
{{- end }}
; Any other database name the client asks for, on the one upstream server.
* = host={{ .Values.pgbouncer.postgres.host }} port={{ .Values.pgbouncer.postgres.port }}

[pgbouncer]
listen_addr = 0.0.0.0
listen_port = {{ .Values.pgbouncer.port }}
; Logs to stderr only: the root filesystem is read-only and there is no unix socket.
unix_socket_dir =
logfile =
pidfile =
auth_type = {{ .Values.pgbouncer.auth.type }}
auth_file = /etc/pgbouncer-auth/userlist.txt
pool_mode = {{ .Values.pgbouncer.poolMode }}
max_client_conn = {{ .Values.pgbouncer.maxClientConn }}
default_pool_size = {{ .Values.pgbouncer.defaultPoolSize }}
min_pool_size = {{ .Values.pgbouncer.minPoolSize }}
reserve_pool_size = {{ .Values.pgbouncer.reservePoolSize }}
max_db_connections = {{ .Values.pgbouncer.maxDbConnections }}
max_prepared_statements = {{ .Values.pgbouncer.maxPreparedStatements }}
; Only used in session mode; transaction mode never hands a dirty session to another client.
server_reset_query = {{ .Values.pgbouncer.serverResetQuery }}
server_tls_sslmode = {{ .Values.pgbouncer.serverTlsSslmode }}
{{- if .Values.databaseTLS.enabled }}
; The CA (and client certificate) from databaseTLS.secretName, as for the app's own connections.
server_tls_ca_file = /etc/pgbouncer-tls/ca.crt
{{- if .Values.databaseTLS.clientCertificate }}
server_tls_cert_file = /etc/pgbouncer-tls/tls.crt
server_tls_key_file = /etc/pgbouncer-tls/tls.key
{{- end }}
{{- end }}
ignore_startup_parameters = {{ .Values.pgbouncer.ignoreStartupParameters }}
{{- with .Values.pgbouncer.timeouts }}
; Bounds (docs/reliability.md): a silent peer on either side is found within
; idle + interval x count seconds; tcp_user_timeout bounds unacknowledged data alike.
tcp_keepalive = 1
tcp_keepidle = {{ .tcpKeepaliveIdleSeconds }}
tcp_keepintvl = {{ .tcpKeepaliveIntervalSeconds }}
tcp_keepcnt = {{ .tcpKeepaliveCount }}
tcp_user_timeout = {{ mul 1000 (add .tcpKeepaliveIdleSeconds (mul .tcpKeepaliveIntervalSeconds .tcpKeepaliveCount)) }}
server_connect_timeout = {{ .serverConnectSeconds }}
query_wait_timeout = {{ .queryWaitSeconds }}
query_timeout = {{ .querySeconds }}
idle_transaction_timeout = {{ .idleTransactionSeconds }}
{{- end }}
{{- with .Values.pgbouncer.adminUsers }}
admin_users = {{ . }}
{{- end }}
{{- with .Values.pgbouncer.statsUsers }}
stats_users = {{ . }}
{{- end }}
{{- range $key := keys .Values.pgbouncer.extraConfig | sortAlpha }}
{{ $key }} = {{ include "fastapi-app.envValue" (get $.Values.pgbouncer.extraConfig $key) }}
{{- end }}
{{- end }}

#!/usr/bin/env bash
# Restore one backup by hand into an empty database (docs/backup-restore.md, "Restore by hand").
#
#   scripts/restore-backup.sh /backups/fastapi-app-20261203T021700Z.dump \
#       "postgresql://owner@db.example.com:5432/app_restored?sslmode=verify-full"
#
# The password comes from PGPASSWORD or ~/.pgpass, never the command line. Checks the dump
# against its manifest (size and sha256), lists the archive, restores it in one transaction
# (all or nothing) without the original owners or grants, then prints the row counts the backup
# recorded next to what the database now holds. Needs pg_restore and psql of the server's major
# version (PG_BIN_DIR, else PATH) and sha256sum.
set -euo pipefail

if [[ $# -ne 2 ]]; then
  echo "usage: $0 BACKUP.dump TARGET_DATABASE_URL" >&2
  exit 2
fi
dump=$1
target=$2
manifest=${dump%.dump}.json
bin=${PG_BIN_DIR:+$PG_BIN_DIR/}

fail() {
  echo "restore FAILED: $*" >&2
  exit 1
}

[[ -f $dump ]] || fail "$dump: no such file"
[[ -f $manifest ]] || fail "$manifest: no manifest, so not a complete backup"

# The manifest is JSON written by `python -m service backup`; read it with Python, which the
# image has anyway. manifest_value dump sha256 -> the value of {"dump": {"sha256": ...}}.
manifest_value() {
  python3 - "$manifest" "$@" <<'PY'
import json, sys
value = json.load(open(sys.argv[1]))
for key in sys.argv[2:]:
    value = value[key]
print(value)
PY
}
# One line per table: its quoted name and the row count the backup recorded.
manifest_tables() {
  python3 - "$manifest" <<'PY'
import json, sys
for name, table in sorted(json.load(open(sys.argv[1]))["tables"].items()):
    quoted = ".".join('"' + part.replace('"', '""') + '"' for part in name.split(".", 1))
    print(quoted, table["rows"])
PY
}
want_size=$(manifest_value dump size_bytes)
want_sha=$(manifest_value dump sha256)
size=$(stat -c %s "$dump")
[[ $size == "$want_size" ]] || fail "$dump is $size bytes, the manifest says $want_size (truncated?)"
sha=$(sha256sum "$dump" | cut -d' ' -f1)
[[ $sha == "$want_sha" ]] || fail "$dump: sha256 differs from the manifest (corrupt)"
echo "ok    size and sha256 match $manifest"

entries=$("${bin}pg_restore" --list "$dump" | grep -cv '^;') || fail "pg_restore --list: not a readable archive"
echo "ok    archive lists $entries entries"

tables=$("${bin}psql" --no-psqlrc --tuples-only --no-align --dbname="$target" \
  --command="SELECT count(*) FROM pg_tables WHERE schemaname NOT IN ('pg_catalog', 'information_schema')")
[[ $tables == 0 ]] || fail "the target database is not empty ($tables tables): restore into a new one"

"${bin}pg_restore" --exit-on-error --single-transaction --no-owner --no-privileges \
  --dbname="$target" "$dump" || fail "pg_restore failed (nothing was restored: one transaction)"
echo "ok    restored"

echo "table                          backup     now"
manifest_tables |
  while read -r table rows; do
    now=$("${bin}psql" --no-psqlrc --tuples-only --no-align --dbname="$target" \
      --command="SELECT count(*) FROM ${table}")
    printf '%-30s %6s %7s\n' "$table" "$rows" "$now"
    [[ $rows == "$now" ]] || fail "$table: $now rows, the backup recorded $rows"
  done
echo "next  DATABASE_MIGRATION_URL=<this database> python -m service migrate   (then grant-app-role)"

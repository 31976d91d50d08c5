#!/usr/bin/env bash
# Back up the ai-secretary database: one pg_dump in custom format, verified by
# listing it with pg_restore, old backups pruned, optionally copied to S3.
set -euo pipefail

usage() {
    cat <<'USAGE'
Usage: scripts/backup.sh [--help]

Dumps the database named by DATABASE_URL with `pg_dump --format=custom` into
BACKUP_DIR as ai_secretary_<UTC timestamp>.dump, checks the file with
`pg_restore --list`, deletes *.dump files older than RETENTION_DAYS, and copies
the new file to s3://$S3_BUCKET/backups/ when S3_BUCKET is set and `aws` exists.

Environment:
  DATABASE_URL    postgres://… of the database (default postgres://postgres@127.0.0.1:5432/ai_secretary)
  BACKUP_DIR      where dumps go (default ./backups)
  RETENTION_DAYS  days a dump is kept (default 30)
  S3_BUCKET       optional bucket for an off-site copy

Prints each step; exits non-zero if the dump or its check fails.
USAGE
}

if [[ "${1:-}" == "--help" || "${1:-}" == "-h" ]]; then
    usage
    exit 0
fi

DATABASE_URL="${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/ai_secretary}"
BACKUP_DIR="${BACKUP_DIR:-./backups}"
RETENTION_DAYS="${RETENTION_DAYS:-30}"
STAMP="$(date -u +%Y%m%dT%H%M%SZ)"
FILE="${BACKUP_DIR}/ai_secretary_${STAMP}.dump"

mkdir -p "$BACKUP_DIR"
echo "backup: dumping the database to ${FILE}"
# Written under a temporary name first: a half-written dump never looks finished.
pg_dump --dbname="$DATABASE_URL" --format=custom --compress=9 --file="${FILE}.partial"
if ! pg_restore --list "${FILE}.partial" >/dev/null; then
    echo "backup: ${FILE}.partial is not a readable archive; kept for inspection" >&2
    exit 1
fi
mv "${FILE}.partial" "$FILE"
entries="$(pg_restore --list "$FILE" | grep -c -v '^;' || true)"
echo "backup: verified ${FILE} ($(du -h "$FILE" | cut -f1), ${entries} archive entries)"

deleted="$(find "$BACKUP_DIR" -maxdepth 1 -name 'ai_secretary_*.dump' -mtime +"$RETENTION_DAYS" -print -delete | wc -l)"
echo "backup: removed ${deleted} dump(s) older than ${RETENTION_DAYS} days"

if [[ -n "${S3_BUCKET:-}" ]]; then
    if command -v aws >/dev/null 2>&1; then
        aws s3 cp "$FILE" "s3://${S3_BUCKET}/backups/"
        echo "backup: uploaded to s3://${S3_BUCKET}/backups/"
    else
        echo "backup: S3_BUCKET is set but the aws CLI is not installed; no upload" >&2
    fi
fi

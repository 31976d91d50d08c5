#!/usr/bin/env bash
# Back up the ai-secretary database: one pg_dump in custom format (Postgres) or
# one `ai-secretary backup` (the embedded SQLite database, VACUUM INTO), each
# verified, old backups pruned, optionally copied to S3.
set -euo pipefail

usage() {
    cat <<'USAGE'
Usage: scripts/backup.sh [--help]

Postgres (DATABASE_URL=postgres://…): dumps the database with
`pg_dump --format=custom` into BACKUP_DIR as ai_secretary_<UTC timestamp>.dump
and checks the file with `pg_restore --list`.

Embedded (DATABASE_URL unset, or sqlite://PATH): copies the SQLite database
(DATA_DIR/ai-secretary.db, or PATH) with `ai-secretary backup`, SQLite's
`VACUUM INTO`, while the service keeps running, into BACKUP_DIR as
ai_secretary_<UTC timestamp>.sqlite, and checks the copy (integrity_check).

Then deletes backups older than RETENTION_DAYS, and copies the new file to
s3://$S3_BUCKET/backups/ when S3_BUCKET is set and `aws` exists.

Environment:
  DATABASE_URL      postgres://… or sqlite://PATH (unset: the embedded database in DATA_DIR)
  DATA_DIR          the embedded database's directory (default ./data)
  AI_SECRETARY_BIN  the binary, for the embedded mode (default ai-secretary on PATH)
  BACKUP_DIR        where backups go (default ./backups)
  RETENTION_DAYS  days a dump is kept (default 30)
  S3_BUCKET       optional bucket for an off-site copy

Prints each step; exits non-zero if the dump or its check fails.
USAGE
}

if [[ "${1:-}" == "--help" || "${1:-}" == "-h" ]]; then
    usage
    exit 0
fi

DATABASE_URL="${DATABASE_URL:-}"
BACKUP_DIR="${BACKUP_DIR:-./backups}"
RETENTION_DAYS="${RETENTION_DAYS:-30}"
STAMP="$(date -u +%Y%m%dT%H%M%SZ)"
mkdir -p "$BACKUP_DIR"

if [[ -z "$DATABASE_URL" || "$DATABASE_URL" == sqlite:* ]]; then
    FILE="${BACKUP_DIR}/ai_secretary_${STAMP}.sqlite"
    echo "backup: copying the embedded database to ${FILE} (VACUUM INTO)"
    # Written under a temporary name first: a half-written copy never looks finished.
    rm -f "${FILE}.partial"
    "${AI_SECRETARY_BIN:-ai-secretary}" backup "${FILE}.partial"
    mv "${FILE}.partial" "$FILE"
    echo "backup: verified ${FILE} ($(du -h "$FILE" | cut -f1))"
    pattern='ai_secretary_*.sqlite'
else
    FILE="${BACKUP_DIR}/ai_secretary_${STAMP}.dump"
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
    pattern='ai_secretary_*.dump'
fi

deleted="$(find "$BACKUP_DIR" -maxdepth 1 -name "$pattern" -mtime +"$RETENTION_DAYS" -print -delete | wc -l)"
echo "backup: removed ${deleted} backup(s) older than ${RETENTION_DAYS} days"

if [[ -n "${S3_BUCKET:-}" ]]; then
    if command -v aws >/dev/null 2>&1; then
        aws s3 cp "$FILE" "s3://${S3_BUCKET}/backups/"
        echo "backup: uploaded to s3://${S3_BUCKET}/backups/"
    else
        echo "backup: S3_BUCKET is set but the aws CLI is not installed; no upload" >&2
    fi
fi

#!/usr/bin/env bash
# Restore the ai-secretary database from a backup.sh dump, then verify the read
# models against the restored event store and rebuild them if they drifted.
set -euo pipefail

usage() {
    cat <<'USAGE'
Usage: scripts/restore.sh [--help] FILE

Postgres (DATABASE_URL=postgres://…, FILE a .dump): restores FILE into that
database with `pg_restore --clean --if-exists` (objects are dropped and
recreated; the database must exist).

Embedded (DATABASE_URL unset or sqlite://PATH, FILE a .sqlite copy): puts FILE
in place of the SQLite database (DATA_DIR/ai-secretary.db, or PATH); the
replaced file is kept beside it as <name>.before-restore.<UTC timestamp>.

Then runs `ai-secretary verify`. If verify finds drift, runs
`ai-secretary replay --all` and verifies again.

Stop the service first (or at least its relay and projections). After the
restore, the relay republishes from its checkpoint in the restored database
whatever NATS lacks; JetStream's duplicate window and the projections'
checkpoints absorb repeats.

Environment:
  DATABASE_URL      postgres://… or sqlite://PATH (unset: the embedded database in DATA_DIR)
  DATA_DIR          the embedded database's directory (default ./data)
  AI_SECRETARY_BIN  the ai-secretary binary (default: ai-secretary on PATH)
  Other ai-secretary settings (REDIS_URL, REDIS_KEY_PREFIX, …) are passed through.
USAGE
}

if [[ "${1:-}" == "--help" || "${1:-}" == "-h" ]]; then
    usage
    exit 0
fi
if [[ $# -ne 1 ]]; then
    usage >&2
    exit 2
fi

FILE="$1"
BIN="${AI_SECRETARY_BIN:-ai-secretary}"

if [[ ! -r "$FILE" ]]; then
    echo "restore: cannot read ${FILE}" >&2
    exit 2
fi
if [[ -z "${DATABASE_URL:-}" || "${DATABASE_URL}" == sqlite:* ]]; then
    if [[ -z "${DATABASE_URL:-}" ]]; then
        target="${DATA_DIR:-./data}/ai-secretary.db"
    else
        target="${DATABASE_URL#sqlite:}"
        target="${target#//}"
        target="${target%%\?*}"
    fi
    echo "restore: putting ${FILE} in place of ${target} (the service must be stopped)"
    mkdir -p "$(dirname "$target")"
    if [[ -e "$target" ]]; then
        kept="${target}.before-restore.$(date -u +%Y%m%dT%H%M%SZ)"
        mv "$target" "$kept"
        echo "restore: the replaced database is kept as ${kept}"
    fi
    # The old file's write-ahead log belongs to it, not to the backup.
    rm -f "${target}-wal" "${target}-shm"
    cp "$FILE" "${target}.partial"
    mv "${target}.partial" "$target"
    echo "restore: restored ${FILE}"
else
    echo "restore: checking ${FILE}"
    pg_restore --list "$FILE" >/dev/null
    echo "restore: restoring ${FILE} into the database (--clean --if-exists)"
    pg_restore --dbname="$DATABASE_URL" --clean --if-exists --no-owner --exit-on-error "$FILE"
    events="$(psql "$DATABASE_URL" --no-psqlrc --tuples-only --no-align --command 'SELECT count(*) FROM events')"
    echo "restore: restored; the event store holds ${events} events"
    echo "restore: if events were appended after this backup was taken, purge the NATS"
    echo "restore: stream before starting the service (docs/operations.md, Restore)"
fi

echo "restore: verifying read models against the event store"
if "$BIN" verify; then
    echo "restore: done; read models match the store"
    exit 0
fi
echo "restore: drift found; rebuilding every projection from the store"
"$BIN" replay --all
"$BIN" verify
echo "restore: done; read models rebuilt and verified"

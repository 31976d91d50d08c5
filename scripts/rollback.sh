#!/usr/bin/env bash
# Roll ai-secretary back to an earlier version (the seed's rollback.sh, for
# images): keep the current configuration, restore the configuration saved
# when VERSION was deployed, deploy VERSION's image blue-green with
# scripts/deploy.sh (no downtime), then check health once more.
#
# The event store is append-only and its migrations only move forward: a
# version older than the database's newest migration refuses to start (its
# /ready never answers, and deploy.sh leaves the live version in place).
set -euo pipefail

usage() {
    cat <<'USAGE'
Usage: scripts/rollback.sh [--dry-run] VERSION
       scripts/rollback.sh --help

Roll back to VERSION (an image tag deployed before). Without VERSION, list
the versions that can be rolled back to.

  --dry-run   print every step (and the commands) without running any
  --help      this text

Environment: as scripts/deploy.sh (APP_DIR, COMPOSE_FILE, ROLLBACK_DIR,
PUBLIC_URL, ...), which this script runs.
USAGE
}

DRY_RUN=0
VERSION=""
while [[ $# -gt 0 ]]; do
    case "$1" in
        --dry-run) DRY_RUN=1 ;;
        -h | --help) usage; exit 0 ;;
        -*) echo "unknown option: $1" >&2; usage >&2; exit 2 ;;
        *)
            if [[ -n "$VERSION" ]]; then
                echo "one VERSION only" >&2; exit 2
            fi
            VERSION=$1 ;;
    esac
    shift
done

SCRIPTS=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
APP_DIR=${APP_DIR:-$(cd "$SCRIPTS/.." && pwd)}
COMPOSE_FILE=${COMPOSE_FILE:-docker-compose.production.yml}
ROLLBACK_DIR=${ROLLBACK_DIR:-$APP_DIR/backups/rollback}
PUBLIC_URL=${PUBLIC_URL:-https://localhost}
export APP_DIR COMPOSE_FILE ROLLBACK_DIR PUBLIC_URL

log() { echo "$(date -u '+%Y-%m-%dT%H:%M:%SZ') rollback: $*"; }

run() {
    if [[ $DRY_RUN -eq 1 ]]; then
        echo "  + $*"
    else
        "$@"
    fi
}

list_versions() {
    echo "Versions with a saved configuration in $ROLLBACK_DIR:"
    local found=0 file
    for file in "$ROLLBACK_DIR"/*.tar.gz; do
        [[ -e "$file" ]] || continue
        [[ $(basename "$file") == current_* ]] && continue
        found=1
        echo "  $(basename "$file" .tar.gz)"
    done
    [[ $found -eq 1 ]] || echo "  (none yet: scripts/deploy.sh saves one per deployed version)"
}

if [[ -z "$VERSION" ]]; then
    usage >&2
    list_versions >&2
    exit 1
fi
if [[ ! "$VERSION" =~ ^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$ ]]; then
    echo "not an image tag: $VERSION" >&2
    exit 2
fi
SAVED="$ROLLBACK_DIR/$VERSION.tar.gz"
if [[ ! -f "$SAVED" && $DRY_RUN -eq 0 ]]; then
    echo "no saved configuration for $VERSION ($SAVED)" >&2
    list_versions >&2
    exit 1
fi

[[ $DRY_RUN -eq 1 ]] && log "dry run: nothing is changed"
log "starting rollback to $VERSION"

log "1/4 keep the current configuration"
run mkdir -p "$ROLLBACK_DIR"
run tar -czf "$ROLLBACK_DIR/current_$(date -u +%Y%m%d_%H%M%S).tar.gz" -C "$APP_DIR" \
    "$COMPOSE_FILE" nginx.conf monitoring

log "2/4 restore the configuration of $VERSION"
run tar -xzf "$SAVED" -C "$APP_DIR"

log "3/4 deploy $VERSION blue-green"
deploy=("$SCRIPTS/deploy.sh")
[[ $DRY_RUN -eq 1 ]] && deploy+=(--dry-run)
if ! "${deploy[@]}" "$VERSION"; then
    log "rollback failed, manual intervention required"
    exit 1
fi

log "4/4 health check"
if [[ -x "$APP_DIR/scripts/health-check.sh" ]]; then
    check=("$APP_DIR/scripts/health-check.sh")
else
    check=(curl -fsSk --max-time 5 -o /dev/null "$PUBLIC_URL/ready")
fi
if [[ $DRY_RUN -eq 0 ]]; then
    sleep 5
fi
if run "${check[@]}"; then
    log "rollback to $VERSION successful"
else
    log "rollback failed, manual intervention required"
    exit 1
fi

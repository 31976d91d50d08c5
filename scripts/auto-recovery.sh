#!/usr/bin/env bash
# Restart the service when its health check fails, check again, and log what
# happened. Meant for cron (e.g. every minute).
set -euo pipefail

usage() {
    cat <<'USAGE'
Usage: scripts/auto-recovery.sh [--help]

Runs health-check.sh. If it fails: restarts the service, waits
RECOVERY_WAIT_SECONDS, checks again. Every step is appended to LOG_FILE.
Exits 0 if the service is (or came back) up, 1 if it is still down.

Environment:
  BASE_URL               passed to health-check.sh (default http://127.0.0.1:8000)
  RESTART_WITH           compose | systemd (default compose)
  COMPOSE_FILE           compose file (default docker-compose.yml)
  SYSTEMD_UNITS          units to restart (default ai-secretary)
  RESTART_COMMAND        any command instead of the two above
  RECOVERY_WAIT_SECONDS  wait after the restart (default 30)
  LOG_FILE               default /var/log/ai-secretary-recovery.log
USAGE
}

if [[ "${1:-}" == "--help" || "${1:-}" == "-h" ]]; then
    usage
    exit 0
fi

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
LOG_FILE="${LOG_FILE:-/var/log/ai-secretary-recovery.log}"
RESTART_WITH="${RESTART_WITH:-compose}"
COMPOSE_FILE="${COMPOSE_FILE:-docker-compose.yml}"
SYSTEMD_UNITS="${SYSTEMD_UNITS:-ai-secretary}"
RECOVERY_WAIT_SECONDS="${RECOVERY_WAIT_SECONDS:-30}"

log() {
    local line
    line="$(date -u '+%Y-%m-%dT%H:%M:%SZ') auto-recovery: $1"
    echo "$line"
    echo "$line" >>"$LOG_FILE"
}

restart() {
    if [[ -n "${RESTART_COMMAND:-}" ]]; then
        log "restarting with: ${RESTART_COMMAND}"
        bash -c "$RESTART_COMMAND"
        return
    fi
    case "$RESTART_WITH" in
    compose)
        log "restarting with docker compose -f ${COMPOSE_FILE} restart"
        docker compose -f "$COMPOSE_FILE" restart
        ;;
    systemd)
        log "restarting with systemctl restart ${SYSTEMD_UNITS}"
        # Word splitting is wanted: several units may be listed.
        # shellcheck disable=SC2086
        systemctl restart $SYSTEMD_UNITS
        ;;
    *)
        log "unknown RESTART_WITH=${RESTART_WITH} (compose or systemd)"
        return 1
        ;;
    esac
}

mkdir -p "$(dirname "$LOG_FILE")"
if "$HERE/health-check.sh" >>"$LOG_FILE" 2>&1; then
    log "healthy; nothing to do"
    exit 0
fi
log "health check failed; restarting"
restart || log "the restart command failed"
sleep "$RECOVERY_WAIT_SECONDS"
if "$HERE/health-check.sh" >>"$LOG_FILE" 2>&1; then
    log "recovered after the restart"
    exit 0
fi
log "still down after the restart: manual intervention required"
exit 1

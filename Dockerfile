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
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates curl \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 app \
    && useradd --system --uid 10001 --gid app --home-dir /nonexistent --shell /usr/sbin/nologin app \
    && mkdir -p /var/log/ai-secretary \
    && chown app:app /var/log/ai-secretary
COPY --from=build /usr/local/bin/ai-secretary /usr/local/bin/ai-secretary

USER app:app
ENV ENVIRONMENT=production \
    LOG_FORMAT=json \
    BIND=0.0.0.0:8000
EXPOSE 8000
# Every role answers /health on BIND (the API, and the workers' ops endpoint).
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
    CMD curl -fsS http://127.0.0.1:8000/health || exit 1
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/ai-secretary"]
# No subcommand: API, relay and projections in one process.
CMD []

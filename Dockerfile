# gemmq's three programs in one image: gemmq-producer, gemmq-consumer, gemmq-collector.
#
#   docker build -t gemmq .                       # or let `docker compose up --build` do it
#   docker run --rm --init -e AMQP_URL=amqp://USER:PASS@HOST:5672/%2f gemmq gemmq-consumer
#
# Stages: `chef` (Rust + cargo-chef) → `planner` (the dependency recipe) → `builder` (dependencies
# compiled in their own layer from the recipe alone, so editing gemmq's code does not rebuild the
# ~200 crates it depends on; then the workspace) → `runtime` (Debian slim, the binaries, a
# non-root user).

# The workspace needs Rust >= 1.89 (rust-version in Cargo.toml).
ARG RUST_IMAGE=rust:1.91-slim-bookworm
ARG RUNTIME_IMAGE=debian:bookworm-slim

FROM ${RUST_IMAGE} AS chef
# Built from source with its own lock file; this layer is cached until the version changes.
RUN cargo install cargo-chef --locked --version 0.1.78
WORKDIR /src

FROM chef AS planner
COPY . .
# recipe.json holds only what determines the dependency build: manifests and the lock file.
RUN cargo chef prepare --recipe-path recipe.json

FROM chef AS builder
COPY --from=planner /src/recipe.json recipe.json
# The dependency layer: rebuilt only when Cargo.toml files or Cargo.lock change.
RUN cargo chef cook --release --locked --recipe-path recipe.json \
    -p gemmq-producer -p gemmq-consumer -p gemmq-collector
COPY . .
# The release profile keeps debug info (for profiling); the image does without: ~50 MB → ~7 MB each.
RUN cargo build --release --locked \
    -p gemmq-producer -p gemmq-consumer -p gemmq-collector \
    --bin gemmq-producer --bin gemmq-consumer --bin gemmq-collector \
    && strip --strip-debug target/release/gemmq-producer target/release/gemmq-consumer \
       target/release/gemmq-collector

FROM ${RUNTIME_IMAGE} AS runtime
# A fixed, unprivileged uid/gid; docker-compose.yml runs the programs that write to the host's
# ./out as the host user instead (HOST_UID/HOST_GID), so the files there are the user's own.
RUN groupadd --system --gid 10001 gemmq \
    && useradd --system --uid 10001 --gid 10001 --home-dir /app --no-create-home \
       --shell /usr/sbin/nologin gemmq
WORKDIR /app
COPY --from=builder /src/target/release/gemmq-producer /src/target/release/gemmq-consumer /src/target/release/gemmq-collector /usr/local/bin/
# The defaults the programs read from config/gemmq.toml in the working directory; compose mounts
# the repository's config/ over it read-only.
COPY config/ /app/config/
RUN mkdir -p /app/out && chown 10001:10001 /app/out
USER 10001:10001
# amqps:// works with the bundled public roots; for a private CA mount its PEM and set
# GEMMQ_TLS_CA_FILE (docs/OPERATIONS.md#tls). Logs go to stderr, filtered by RUST_LOG (default: info).
# Run one of the three programs; a worker by default. Use `docker run --init` (compose:
# `init: true`): the consumer and the collector handle SIGTERM gracefully, but a PID 1 without a
# handler (the producer) would ignore it.
CMD ["gemmq-consumer"]

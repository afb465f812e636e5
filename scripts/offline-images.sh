#!/usr/bin/env bash
# Builds stand-ins for the images docker-compose.yml uses, on a machine that reaches Debian's
# packages and crates.io but no image registry (like the CI machines of this project):
#
#   gemmq-offline/rabbitmq:4           RabbitMQ 4 from Debian trixie, like rabbitmq:4-management
#   gemmq-offline/rust:bookworm        this machine's Rust toolchain + gcc, like rust:*-slim-bookworm
#   gemmq-offline/debian:bookworm-slim a minimal Debian bookworm, like debian:bookworm-slim
#   gemmq-offline/prometheus:2         Prometheus from Debian bookworm, like prom/prometheus
#                                      (only with --prometheus: compose's `metrics` profile)
#
#   scripts/offline-images.sh          # build what is missing (idempotent), print the settings
#   scripts/offline-images.sh --prometheus  # the same, and the Prometheus stand-in
#   scripts/offline-images.sh --env    # print only the settings, e.g. >> .env
#
# Then: RABBITMQ_IMAGE=gemmq-offline/rabbitmq:4 RUST_IMAGE=gemmq-offline/rust:bookworm \
#       RUNTIME_IMAGE=gemmq-offline/debian:bookworm-slim docker compose up --build ...
# Needs root, a running Docker engine and debootstrap. Base file systems are cached under
# $GEMMQ_OFFLINE_CACHE (default /var/cache/gemmq-offline); `docker rmi` an image to rebuild it.
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
cache="${GEMMQ_OFFLINE_CACHE:-/var/cache/gemmq-offline}"
mirror="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
RABBITMQ_IMAGE=gemmq-offline/rabbitmq:4
RUST_IMAGE=gemmq-offline/rust:bookworm
RUNTIME_IMAGE=gemmq-offline/debian:bookworm-slim
PROMETHEUS_IMAGE=gemmq-offline/prometheus:2
with_prometheus=0

settings() {
  echo "RABBITMQ_IMAGE=$RABBITMQ_IMAGE"
  echo "RUST_IMAGE=$RUST_IMAGE"
  echo "RUNTIME_IMAGE=$RUNTIME_IMAGE"
  if docker image inspect "$PROMETHEUS_IMAGE" >/dev/null 2>&1; then
    echo "PROMETHEUS_IMAGE=$PROMETHEUS_IMAGE"
  fi
}
case "${1:-}" in
  --env) settings; exit 0 ;;
  --prometheus) with_prometheus=1 ;;
  -h|--help) awk 'NR == 1 { next } /^#/ { sub(/^# ?/, ""); print; next } { exit }' "$0"; exit 0 ;;
  "") ;;
  *) echo "offline-images.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
esac

log() { printf '[offline-images] %s\n' "$*" >&2; }
have() { docker image inspect "$1" >/dev/null 2>&1; }
command -v docker >/dev/null || { log "docker is not installed (apt-get install docker.io)"; exit 1; }
docker info >/dev/null 2>&1 || { log "the Docker engine is not running (start dockerd)"; exit 1; }

# A minimal Debian file system as an image: debootstrap, then docker import.
base() {
  local suite="$1" image="gemmq-offline/debian:$1-base"
  if ! have "$image"; then
    command -v debootstrap >/dev/null || { log "debootstrap is not installed (apt-get install debootstrap)"; exit 1; }
    local dir="$cache/$suite"
    if [ ! -f "$dir/.complete" ]; then
      log "debootstrap $suite into $dir"
      rm -rf "$dir"
      mkdir -p "$dir"
      debootstrap --variant=minbase "$suite" "$dir" "$mirror" >"$cache/$suite.log" 2>&1 \
        || { log "debootstrap $suite failed; see $cache/$suite.log"; exit 1; }
      # Images do without caches; apt gets the same clean-up the official images do.
      rm -rf "$dir"/var/cache/apt/archives/*.deb "$dir"/var/lib/apt/lists/*
      touch "$dir/.complete"
    fi
    log "importing $image"
    tar -C "$dir" --exclude=./.complete -c . | docker import --change 'CMD ["bash"]' - "$image" >/dev/null
  fi
  echo "$image"
}

mkdir -p "$cache"

if ! have "$RUNTIME_IMAGE"; then
  docker tag "$(base bookworm)" "$RUNTIME_IMAGE"
  log "built $RUNTIME_IMAGE"
fi

if ! have "$RABBITMQ_IMAGE"; then
  log "building $RABBITMQ_IMAGE (rabbitmq-server from trixie)"
  docker build -q -t "$RABBITMQ_IMAGE" --build-arg BASE="$(base trixie)" \
    -f "$here/offline-images/rabbitmq.Dockerfile" "$here/offline-images" >/dev/null
  log "built $RABBITMQ_IMAGE"
fi

if ! have "$RUST_IMAGE"; then
  sysroot="$(rustc --print sysroot)"
  ctx="$cache/rust-context"
  log "building $RUST_IMAGE with this machine's toolchain ($(rustc --version))"
  rm -rf "$ctx"
  mkdir -p "$ctx/toolchain"
  # The toolchain without its documentation (~800 MB); hard links where the file system allows.
  for d in bin lib libexec etc; do
    [ -e "$sysroot/$d" ] && { cp -al "$sysroot/$d" "$ctx/toolchain/" 2>/dev/null || cp -a "$sysroot/$d" "$ctx/toolchain/"; }
  done
  cp /etc/ssl/certs/ca-certificates.crt "$ctx/"
  docker build -q -t "$RUST_IMAGE" --build-arg BASE="$(base bookworm)" \
    -f "$here/offline-images/rust.Dockerfile" "$ctx" >/dev/null
  rm -rf "$ctx"
  log "built $RUST_IMAGE"
fi

if [ "$with_prometheus" = 1 ] && ! have "$PROMETHEUS_IMAGE"; then
  log "building $PROMETHEUS_IMAGE (prometheus from bookworm)"
  docker build -q -t "$PROMETHEUS_IMAGE" --build-arg BASE="$(base bookworm)" \
    -f "$here/offline-images/prometheus.Dockerfile" "$here/offline-images" >/dev/null
  log "built $PROMETHEUS_IMAGE"
fi

settings

#!/usr/bin/env bash
# A RabbitMQ 4 with TLS listeners in a container, for e2e/tests/tls.rs and for trying amqps://:
#
#   scripts/tls-broker.sh up [DIR]    certificates into DIR (default /tmp/gemmq-tls), container
#                                     gemmq-tls; prints the variables the test reads
#   scripts/tls-broker.sh down
#
# Ports on 127.0.0.1: 5674 plain AMQP, 5675 AMQP over TLS, 15675 the management API over https;
# 5675 on 127.0.0.2 too, an address the certificate does not name.
# The image: $RABBITMQ_IMAGE, default gemmq-offline/rabbitmq:4 (scripts/offline-images.sh) or any
# image whose RabbitMQ reads /etc/rabbitmq/conf.d (the official rabbitmq:4-management does).
set -euo pipefail
cd "$(dirname "$0")/.."
NAME=gemmq-tls
IMAGE="${RABBITMQ_IMAGE:-gemmq-offline/rabbitmq:4}"
ACCOUNT=gemmq-tls

case "${1:-}" in
up)
  dir="$(realpath -m "${2:-/tmp/gemmq-tls}")"
  scripts/tls-certs.sh "$dir" >/dev/null
  docker rm -f "$NAME" >/dev/null 2>&1 || true
  docker run -d --name "$NAME" --hostname "$NAME" \
    -e RABBITMQ_DEFAULT_USER="$ACCOUNT" -e RABBITMQ_DEFAULT_PASS="$ACCOUNT" \
    -v "$dir:/etc/rabbitmq/certs:ro" \
    -v "$dir/rabbitmq-tls.conf:/etc/rabbitmq/conf.d/20-tls.conf:ro" \
    -p 127.0.0.1:5674:5672 -p 127.0.0.1:5675:5671 -p 127.0.0.1:15675:15671 \
    -p 127.0.0.2:5675:5671 \
    "$IMAGE" >/dev/null
  for _ in $(seq 90); do
    curl -sf --cacert "$dir/ca.pem" -u "$ACCOUNT:$ACCOUNT" https://127.0.0.1:15675/api/overview \
      >/dev/null && break
    sleep 1
  done
  curl -sf --cacert "$dir/ca.pem" -u "$ACCOUNT:$ACCOUNT" https://127.0.0.1:15675/api/overview \
    >/dev/null || { docker logs --tail 40 "$NAME" >&2; echo "the TLS broker did not come up" >&2; exit 1; }
  cat <<VARS
GEMMQ_TLS_URL=amqps://$ACCOUNT:$ACCOUNT@127.0.0.1:5675/%2f
GEMMQ_TLS_PLAIN_PORT=5674
GEMMQ_TLS_MANAGEMENT_URL=https://127.0.0.1:15675
GEMMQ_TLS_DIR=$dir
VARS
  ;;
down)
  docker rm -f "$NAME" >/dev/null 2>&1 || true
  ;;
*)
  echo "usage: scripts/tls-broker.sh up [DIR] | down" >&2
  exit 2
  ;;
esac

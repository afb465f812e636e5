#!/bin/sh
# What the official image's entrypoint does for the settings gemmq's compose file uses.
set -eu
conf=/etc/rabbitmq/rabbitmq.conf
{
  echo "listeners.tcp.default = 5672"
  echo "management.tcp.port = 15672"
  # Like the official image: the account from the environment replaces guest, which would
  # otherwise be created (and refused from anywhere but loopback).
  if [ -n "${RABBITMQ_DEFAULT_USER:-}" ]; then
    echo "default_user = ${RABBITMQ_DEFAULT_USER}"
    echo "default_pass = ${RABBITMQ_DEFAULT_PASS:?RABBITMQ_DEFAULT_PASS goes with RABBITMQ_DEFAULT_USER}"
  fi
  echo "loopback_users.guest = true"
  # Extra settings, one per line, e.g. for tests: RABBITMQ_EXTRA_CONF='max_message_size = 134217728'.
  if [ -n "${RABBITMQ_EXTRA_CONF:-}" ]; then printf '%s\n' "$RABBITMQ_EXTRA_CONF"; fi
} > "$conf"
echo "[rabbitmq_management,rabbitmq_stream]." > /etc/rabbitmq/enabled_plugins
chown rabbitmq:rabbitmq "$conf" /etc/rabbitmq/enabled_plugins
mkdir -p /var/lib/rabbitmq /var/log/rabbitmq
chown -R rabbitmq:rabbitmq /var/lib/rabbitmq /var/log/rabbitmq
if [ "$1" = rabbitmq-server ] && [ "$(id -u)" = 0 ]; then
  # The node's name follows the container's host name, as in the official image.
  export RABBITMQ_NODENAME="${RABBITMQ_NODENAME:-rabbit@$(hostname)}"
  # Debian's /usr/sbin/rabbitmq-server sends the logs to a file; the script it wraps logs to
  # stdout (RABBITMQ_LOGS=-), where `docker logs` reads them, and stops the node on SIGTERM.
  shift
  exec setpriv --reuid=rabbitmq --regid=rabbitmq --init-groups env HOME=/var/lib/rabbitmq \
    /usr/lib/rabbitmq/bin/rabbitmq-server "$@"
fi
exec "$@"

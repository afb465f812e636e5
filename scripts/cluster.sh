#!/usr/bin/env bash
# A 3-node RabbitMQ 4 cluster in Docker, to run gemmq against a cluster by hand:
#
#   scripts/cluster.sh up      # nodes n1..n3, AMQP on 127.0.0.1:5681..5683, UI on :15681..15683
#   scripts/cluster.sh stop 1  # lose node n1 (`start 1` brings it back and waits for it)
#   scripts/cluster.sh down
#
# Then, for every program:
#   export AMQP_URL="amqp://gq:gq@127.0.0.1:5681/%2f,amqp://gq:gq@127.0.0.1:5682/%2f,amqp://gq:gq@127.0.0.1:5683/%2f"
# and `docker stop gemmq-cluster-n1` mid-job to lose the node the programs connected to first.
#
# The image is the offline RabbitMQ 4 image (scripts/offline-images.sh; CI builds it), or
# CLUSTER_IMAGE. The nodes share one Erlang cookie and join rabbit@n1 (../shared/DESIGN.md).
set -euo pipefail

IMAGE=${CLUSTER_IMAGE:-gemmq-offline/rabbitmq:4}
NET=gemmq-cluster
COOKIE=${CLUSTER_COOKIE:-gemmq-cluster-cookie}

down() {
  docker rm -f gemmq-cluster-n1 gemmq-cluster-n2 gemmq-cluster-n3 >/dev/null 2>&1 || true
  docker network rm "$NET" >/dev/null 2>&1 || true
}

up() {
  down
  docker network create "$NET" >/dev/null
  for i in 1 2 3; do
    # The cookie must be in place before the node starts.
    docker run -d --name "gemmq-cluster-n$i" --hostname "n$i" --network "$NET" \
      -p "127.0.0.1:568$i:5672" -p "127.0.0.1:1568$i:15672" \
      -e RABBITMQ_DEFAULT_USER=gq -e RABBITMQ_DEFAULT_PASS=gq \
      --entrypoint sh "$IMAGE" -c "echo '$COOKIE' > /var/lib/rabbitmq/.erlang.cookie \
        && chown rabbitmq:rabbitmq /var/lib/rabbitmq/.erlang.cookie \
        && chmod 400 /var/lib/rabbitmq/.erlang.cookie \
        && exec docker-entrypoint.sh rabbitmq-server" >/dev/null
  done
  for i in 1 2 3; do
    for _ in $(seq 90); do
      docker exec "gemmq-cluster-n$i" rabbitmq-diagnostics -q ping >/dev/null 2>&1 && break
      sleep 1
    done
    # A node answers pings while it is still booting, and `stop_app` then ends its runtime
    # ("Runtime terminating during boot"; the container exits and CI with it): wait until it
    # has finished starting.
    docker exec "gemmq-cluster-n$i" rabbitmqctl -q await_startup --timeout 120 >/dev/null
  done
  for i in 2 3; do
    docker exec "gemmq-cluster-n$i" rabbitmqctl -q stop_app
    docker exec "gemmq-cluster-n$i" rabbitmqctl -q join_cluster rabbit@n1
    docker exec "gemmq-cluster-n$i" rabbitmqctl -q start_app
  done
  # The management API (status, the tests) starts after the node answers pings.
  for i in 1 2 3; do
    for _ in $(seq 60); do
      curl -sf -u gq:gq "http://127.0.0.1:1568$i/api/overview" >/dev/null && break
      sleep 1
    done
  done
  docker exec gemmq-cluster-n1 rabbitmqctl -q cluster_status --formatter json \
    | python3 -c 'import json, sys; print("cluster up, running:", " ".join(sorted(json.load(sys.stdin)["running_nodes"])))'
}

# Stops node n<i> (as a crash of its machine would, but cleanly enough to restart).
stop_node() {
  docker stop -t 5 "gemmq-cluster-n$1" >/dev/null
}

# Starts node n<i> again and waits until the cluster counts it running.
start_node() {
  docker start "gemmq-cluster-n$1" >/dev/null
  for _ in $(seq 90); do
    if docker exec "gemmq-cluster-n$1" rabbitmq-diagnostics -q check_running >/dev/null 2>&1; then
      return 0
    fi
    sleep 1
  done
  echo "node n$1 did not come back within 90 s" >&2
  return 1
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  stop) stop_node "${2:?which node: 1, 2 or 3}" ;;
  start) start_node "${2:?which node: 1, 2 or 3}" ;;
  *) echo "usage: $0 up|down|stop N|start N" >&2; exit 2 ;;
esac

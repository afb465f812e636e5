#!/usr/bin/env bash
# Chaos run: one job of at least 1024x1024x1024 through 4 workers while random workers are killed
# (SIGKILL) and restarted every few seconds, the broker is restarted once, and the collector is
# killed and restarted once. At the end C must be complete and verified against A·B, every tile
# once. Prints a one-line verdict with the counts. Needs a local RabbitMQ managed by rabbitmqctl.
#
#   scripts/chaos.sh [--size N] [--tile T] [--group G] [--workers W] [--kill-every SECONDS]
#
# Tiles travel one to a message unless --group says otherwise: grouped, a job is a handful of
# messages and may be over before the first kill.
#
# It restarts the broker: do not run it next to anything else that uses that broker.
set -euo pipefail

size=1024 tile=64 group=1 workers=4 kill_every=3
while [ $# -gt 0 ]; do
  case "$1" in
    --size) size="$2"; shift 2 ;;
    --tile) tile="$2"; shift 2 ;;
    --group) group="$2"; shift 2 ;;
    --workers) workers="$2"; shift 2 ;;
    --kill-every) kill_every="$2"; shift 2 ;;
    -h|--help) sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "chaos.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done

root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
cargo build --release --quiet
bin="${CARGO_TARGET_DIR:-$root/target}/release"

export GEMMQ_NAMESPACE="chaos-$$"
export GEMMQ_JOB_ID="chaos-$(date +%s)"
export GEMMQ_RETRY_DELAY=500ms GEMMQ_CONNECT_TIMEOUT=60s RUST_LOG=info
out="$(mktemp -d /tmp/gemmq-chaos.XXXXXX)"
mkdir -p "$out/logs"
echo "chaos: job $GEMMQ_JOB_ID, ${size}^3 f64, tile $tile, $workers workers; logs in $out/logs"

declare -A worker_pid
starts=0 kills=0
start_worker() {
  starts=$((starts + 1))
  # Slow, flaky workers: the job lasts long enough for the chaos to matter.
  "$bin/gemmq-consumer" --worker-id "chaos-w$1-$starts" --delay 100ms..400ms --failure-rate 0.1 \
    >>"$out/logs/consumer-$1.log" 2>&1 &
  worker_pid[$1]=$!
}
collector_starts=0
start_collector() {
  collector_starts=$((collector_starts + 1))
  "$bin/gemmq-collector" --job-id "$GEMMQ_JOB_ID" --out "$out" >>"$out/logs/collector.log" 2>&1 &
  collector=$!
}
cleanup() {
  for p in "${worker_pid[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  kill -TERM "${collector:-0}" 2>/dev/null || true
  rabbitmqctl -q start_app >/dev/null 2>&1 || true
  wait 2>/dev/null || true
  # The namespace was this run's alone: leave no queues behind (each holds broker files open).
  for q in tasks retry parked jobs; do
    rabbitmqctl -q delete_queue "$GEMMQ_NAMESPACE.$q" >/dev/null 2>&1 || true
  done
  # rabbitmqctl cannot delete exchanges; the management API can, when the plugin is on.
  for x in tasks retry results operands events; do
    curl -fsS -o /dev/null -u guest:guest -X DELETE \
      "http://127.0.0.1:15672/api/exchanges/%2F/$GEMMQ_NAMESPACE.$x" 2>/dev/null || true
  done
}
trap cleanup EXIT

for i in $(seq 1 "$workers"); do start_worker "$i"; done
start_collector
"$bin/gemmq-producer" --m "$size" --k "$size" --n "$size" --tile "$tile" --group "$group" --seed 11 \
  >"$out/logs/producer.out" 2>"$out/logs/producer.log" &
producer=$!

started=$(date +%s) broker_restarted=0 collector_killed=0
while sleep "$kill_every"; do
  kill -0 "$collector" 2>/dev/null || break   # the collector finished
  elapsed=$(( $(date +%s) - started ))
  victim=$(( RANDOM % workers + 1 ))
  if kill -KILL "${worker_pid[$victim]}" 2>/dev/null; then
    kills=$((kills + 1))
    wait "${worker_pid[$victim]}" 2>/dev/null || true
  fi
  start_worker "$victim"
  if [ "$broker_restarted" = 0 ] && [ "$elapsed" -ge $((kill_every * 2)) ]; then
    echo "chaos: restarting the broker"
    rabbitmqctl -q stop_app >/dev/null; sleep 2; rabbitmqctl -q start_app >/dev/null
    broker_restarted=1
  elif [ "$collector_killed" = 0 ] && [ "$broker_restarted" = 1 ]; then
    echo "chaos: killing the collector"
    kill -KILL "$collector" 2>/dev/null || true
    wait "$collector" 2>/dev/null || true
    collector_killed=1
    start_collector
  fi
done
status=0
wait "$collector" || status=$?
wait "$producer" || true

summary="$out/summary.json"
field() { sed -n "s/^  \"$1\": \\(.*\\),\$/\\1/p" "$summary" | head -n1; }
received=$(cat "$out"/logs/consumer-*.log | grep -c "task received" || true)
tasks=$(field tasks)
# Task messages: fewer than tasks when tiny tiles travel in groups (--group).
messages=$(sed -n 's/.*all tasks published and confirmed.* messages=\([0-9]*\).*/\1/p' "$out"/logs/producer*.log | tail -n1)
messages=${messages:-$tasks}
verified=$(grep -q '"passed": true' "$summary" 2>/dev/null && echo true || echo false)
verdict=FAIL
[ "$status" = 0 ] && [ "$(field status)" = '"complete"' ] && [ "$verified" = true ] && verdict=PASS
echo "chaos: $verdict job=$GEMMQ_JOB_ID tasks=$tasks done=$(field tasks_done) worker_kills=$kills" \
  "broker_restarts=$broker_restarted collector_restarts=$((collector_starts - 1))" \
  "messages=$messages deliveries=$received redeliveries=$((received - ${messages:-0})) retries=$(field retries)" \
  "duplicates_dropped=$(field duplicates_dropped) verified=$verified wall_s=$(field wall_seconds)"
[ "$verdict" = PASS ]

#!/usr/bin/env bash
# Runs gemmq's compose topology without Docker: N consumers, one collector and one producer,
# as local processes against a RabbitMQ on this machine (AMQP_URL, default 127.0.0.1:5672).
# Same programs, same config file and environment variables as docker-compose.yml.
#
#   scripts/run-local.sh [--workers N] [--debug] [--no-build] [-- PRODUCER-FLAGS...]
#
# Examples:
#   scripts/run-local.sh --workers 4
#   scripts/run-local.sh --workers 2 -- --m 2048 --k 2048 --n 2048 --tile 256
#   GEMMQ_CONFIG=config/demo.toml scripts/run-local.sh --workers 4     # the demo: flaky 1-3 s workers
#
# Logs go to $GEMMQ_OUT/logs (default out/logs); C.npy and summary.json to $GEMMQ_OUT. Relative
# GEMMQ_OUT and GEMMQ_CONFIG paths are taken from the directory you run it in. The producer and
# the collector share GEMMQ_JOB_ID (default local-<time>-<pid>); workers are named
# $GEMMQ_WORKER_ID-1 .. -N (default worker-1 ..). Every other GEMMQ_* variable reaches all programs.
# Exit status is the collector's: 0 complete and verified, 3 incomplete, 4 verification failed.
set -euo pipefail

workers=2
profile=release
build=1
producer_args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --workers) workers="$2"; shift 2 ;;
    --workers=*) workers="${1#*=}"; shift ;;
    --debug) profile=debug; shift ;;
    --no-build) build=0; shift ;;
    --) shift; producer_args=("$@"); break ;;
    -h|--help) awk 'NR == 1 { next } /^#/ { sub(/^# ?/, ""); print; next } { exit }' "$0"; exit 0 ;;
    *) echo "run-local.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
case "$workers" in ''|*[!0-9]*|0) echo "run-local.sh: --workers needs a number of at least 1" >&2; exit 2 ;; esac

# Paths given relative to where the script was started mean that place, not the repository.
here="$PWD"
absolute() { case "$1" in /*) printf '%s\n' "$1" ;; *) printf '%s/%s\n' "$here" "$1" ;; esac; }
if [ -n "${GEMMQ_OUT:-}" ]; then GEMMQ_OUT="$(absolute "$GEMMQ_OUT")"; fi
if [ -n "${GEMMQ_CONFIG:-}" ]; then export GEMMQ_CONFIG="$(absolute "$GEMMQ_CONFIG")"; fi

root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
if [ "$build" = 1 ]; then
  if [ "$profile" = release ]; then cargo build --release --quiet; else cargo build --quiet; fi
fi
bin="${CARGO_TARGET_DIR:-$root/target}/$profile"
for b in gemmq-producer gemmq-consumer gemmq-collector; do
  [ -x "$bin/$b" ] || { echo "run-local.sh: $bin/$b is missing; run without --no-build" >&2; exit 2; }
done

out="${GEMMQ_OUT:-out}"
export GEMMQ_OUT="$out"
export GEMMQ_JOB_ID="${GEMMQ_JOB_ID:-local-$(date +%Y%m%d-%H%M%S)-$$}"
mkdir -p "$out/logs"

pids=()
cleanup() {
  # SIGTERM lets consumers finish or return their in-flight tasks.
  for p in ${pids[@]+"${pids[@]}"}; do kill -TERM "$p" 2>/dev/null || true; done
  for p in ${pids[@]+"${pids[@]}"}; do wait "$p" 2>/dev/null || true; done
}
trap cleanup EXIT
trap 'exit 130' INT TERM

echo "job $GEMMQ_JOB_ID: $workers workers, logs in $out/logs"
for i in $(seq 1 "$workers"); do
  GEMMQ_WORKER_ID="${GEMMQ_WORKER_ID:-worker}-$i" "$bin/gemmq-consumer" >"$out/logs/consumer-$i.log" 2>&1 &
  pids+=($!)
done
"$bin/gemmq-collector" 2> >(tee "$out/logs/collector.log" >&2) &
collector=$!
"$bin/gemmq-producer" ${producer_args[@]+"${producer_args[@]}"} >"$out/logs/producer.out" 2>"$out/logs/producer.log" || {
  status=$?
  echo "producer failed (exit $status):" >&2; tail -n 5 "$out/logs/producer.log" >&2
  kill -TERM "$collector" 2>/dev/null || true
  exit "$status"
}
status=0
wait "$collector" || status=$?
case "$status" in
  0) echo "done: $out/C.npy verified; summary in $out/summary.json" ;;
  3) echo "incomplete: tasks were parked; see $out/summary.json and the parking-lot queue" >&2 ;;
  4) echo "C failed verification; see $out/summary.json" >&2 ;;
  *) echo "collector failed (exit $status); see $out/logs/collector.log" >&2 ;;
esac
exit "$status"

#!/usr/bin/env bash
# What the sidecar costs against its floor (issue "cost per event"): the
# `relay` responder (the same messages through the same NATS client, no
# deduplication) in a process of its own, then the sidecar, on one fresh
# nats-server per mode and round; batch (1000 events, 16 in flight) and
# single events (1024 in flight), 200 B events, half duplicates,
# durability "local". Each row has the CPU per event of the server, the
# load generator, the sidecar (`side µs`) and the relay (`relay µs`); the
# ratios within one round are the figures (the machine is shared and noisy).
#
#   bash examples/scripts/cost-compare.sh [ROUNDS] [BATCH_SECONDS] [SINGLE_SECONDS]
#
# Needs `cargo build --release --bin eventsieve --example loadgen` first.
# Uses ports 14352 and 19594; stops what it started by PID.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROUNDS=${1:-3}
BSECS=${2:-15}
SSECS=${3:-8}
NATS_PORT=14352 METRICS_PORT=19594
BIN=${BIN:-target/release/eventsieve}
LOADGEN=target/release/examples/loadgen
. examples/scripts/lib.sh

run() { # mode
  local mode=$1 dir secs args relay_pid
  dir=$(mktemp -d /tmp/eventsieve-cost.XXXX)
  up "$dir" config/eventsieve.toml
  if [ "$mode" = batch ]; then
    secs=$BSECS args="--inflight 16 --batch 1000"
  else
    secs=$SSECS args="--inflight 1024"
  fi
  # The relay serves for as long as its run takes, with room to spare.
  "$LOADGEN" --url nats://127.0.0.1:$NATS_PORT --serve-relay $args --seconds $((secs * 2 + 10)) \
    >"$dir/relay.log" 2>&1 &
  relay_pid=$!
  sleep 1
  echo "== $mode"
  timeout 300 "$LOADGEN" --url nats://127.0.0.1:$NATS_PORT --metrics 127.0.0.1:$METRICS_PORT \
    --server-pid "$NATS_PID" --relay-pid "$relay_pid" --baselines relay --window 1h \
    --seconds "$secs" $args 2>&1 | grep -E "^(eventsieve|relay|CPU| *events)" || true
  kill "$relay_pid" 2>/dev/null || true
  wait "$relay_pid" 2>/dev/null || true
  down
  rm -rf "$dir"
}
for r in $(seq 1 "$ROUNDS"); do
  echo "# round $r"
  run batch
  run single
done

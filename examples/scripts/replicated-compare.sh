#!/usr/bin/env bash
# durability "local" against "replicated" (the JetStream journal, R1 on one
# server), batch and single events, in alternating rounds on a fresh
# nats-server each: the ratio of the two in one run is the figure, not
# either number alone (the machine is shared).
#
#   bash examples/scripts/replicated-compare.sh [ROUNDS] [SECONDS]
#
# Needs `cargo build --release --bin eventsieve --example loadgen` first.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROUNDS=${1:-2}
SECS=${2:-10}
BIN="$(bash nats/install.sh 2>/dev/null | tail -n 1)"
PORT=14322
run() { # durability mode
  local dur=$1 mode=$2 dir
  dir=$(mktemp -d /tmp/eventsieve-compare.XXXX)
  sed -e "s|127.0.0.1:4222|127.0.0.1:$PORT|" -e "s|/tmp/eventsieve-nats|$dir/js|" \
      -e "/^http:/d" nats/server.conf >"$dir/server.conf"
  "$BIN" -c "$dir/server.conf" >"$dir/nats.log" 2>&1 &
  local npid=$!
  sleep 0.5
  EVENTSIEVE_NATS__URL=nats://127.0.0.1:$PORT EVENTSIEVE_DATA_DIR="$dir/data" \
    EVENTSIEVE_METRICS_ADDR=127.0.0.1:19564 EVENTSIEVE_LOG=warn EVENTSIEVE_WINDOW=1h \
    EVENTSIEVE_DURABILITY=$dur EVENTSIEVE_CLUSTER__NODE_ID=bench \
    target/release/eventsieve run >"$dir/sidecar.log" 2>&1 &
  local spid=$!
  sleep 2.5 # the lease keeper takes every shard within a round
  local args="--seconds $SECS --inflight 1024"
  [ "$mode" = batch ] && args="--seconds $SECS --inflight 16 --batch 1000"
  echo "== $dur $mode"
  timeout 300 target/release/examples/loadgen --url nats://127.0.0.1:$PORT --metrics 127.0.0.1:19564 \
    --server-pid $npid --no-baseline --window 1h $args 2>&1 | grep -vE "^CPU per event|^mode=|^run " || true
  kill $spid; wait $spid || true
  kill $npid; wait $npid || true
  rm -rf "$dir"
}
for r in $(seq 1 "$ROUNDS"); do
  for mode in batch single; do
    run local $mode
    run replicated $mode
  done
done

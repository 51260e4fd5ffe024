#!/usr/bin/env bash
# The same events as JSON and as protobuf (loadgen.v1.Event, padded to the
# same size), alternating on one sidecar binary, each run on a fresh
# nats-server and store, durability "local": batch (1000 events, 16 in
# flight) and single events (1024 in flight), with the relay baseline in
# the same run. The ratios within one round are the figures (the machine
# is shared and noisy).
#
#   bash examples/scripts/format-compare.sh [ROUNDS] [BATCH_SECONDS] [SINGLE_SECONDS]
#
# Needs `cargo build --release --bin eventsieve --example loadgen` first.
# Uses ports 14332 and 19574; stops what it started by PID.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROUNDS=${1:-3}
BSECS=${2:-15}
SSECS=${3:-8}
NATS_PORT=14332 METRICS_PORT=19574
BIN=${BIN:-target/release/eventsieve}
. examples/scripts/lib.sh

run() { # format mode
  local format=$1 mode=$2 dir
  dir=$(mktemp -d /tmp/eventsieve-format.XXXX)
  cp config/eventsieve.toml "$dir/sidecar.toml"
  if [ "$format" = protobuf ]; then
    sed -i -e 's|^format = "json"|format = "protobuf"|' -e 's|^proto_paths = \["."\]|proto_paths = ["examples/proto"]|' \
      -e 's|^proto_files = \[\]|proto_files = ["loadgen/v1/event.proto"]|' -e 's|^message = ""|message = "loadgen.v1.Event"|' \
      "$dir/sidecar.toml"
  fi
  up "$dir" "$dir/sidecar.toml"
  local args="--seconds $SSECS --inflight 1024"
  [ "$mode" = batch ] && args="--seconds $BSECS --inflight 16 --batch 1000"
  echo "== $format $mode"
  timeout 300 target/release/examples/loadgen --url nats://127.0.0.1:$NATS_PORT --metrics 127.0.0.1:$METRICS_PORT \
    --server-pid "$NATS_PID" --baselines relay --window 1h --format "$format" $args 2>&1 | grep -E "eventsieve|relay" || true
  down
  rm -rf "$dir"
}
for r in $(seq 1 "$ROUNDS"); do
  for mode in batch single; do
    run json $mode
    run protobuf $mode
  done
done

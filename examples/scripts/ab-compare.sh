#!/usr/bin/env bash
# Two sidecar binaries alternating on the same machine, durability "local",
# each run on a fresh nats-server and store: batch (1000 events, 16 in
# flight) and single events (1024 in flight), sidecar alone. The ratios
# within one round are the figures (the machine is shared and noisy).
#
#   bash examples/scripts/ab-compare.sh OLD_REPO NEW_REPO [ROUNDS] [BATCH_SECONDS] [SINGLE_SECONDS]
#
# Each REPO is a checkout whose sidecar is REPO/target/release/eventsieve
# (or $OLD_BIN / $NEW_BIN) run with REPO/config/eventsieve.toml, so that
# each reads the configuration file of its own version.
# Needs `cargo build --release --example loadgen` first (it drives both).
# Uses ports 14322 and 19564; stops what it started by PID.
set -euo pipefail
cd "$(dirname "$0")/../.."
OLD_REPO=$(cd "$1" && pwd)
NEW_REPO=$(cd "$2" && pwd)
OLD=${OLD_BIN:-$OLD_REPO/target/release/eventsieve}
NEW=${NEW_BIN:-$NEW_REPO/target/release/eventsieve}
ROUNDS=${3:-3}
BSECS=${4:-15}
SSECS=${5:-8}
NATS_PORT=14322 METRICS_PORT=19564
. examples/scripts/lib.sh

run() { # label binary repo mode
  local label=$1 repo=$3 mode=$4 dir
  BIN=$2
  dir=$(mktemp -d /tmp/eventsieve-ab.XXXX)
  up "$dir" "$repo/config/eventsieve.toml"
  local args="--seconds $SSECS --inflight 1024"
  [ "$mode" = batch ] && args="--seconds $BSECS --inflight 16 --batch 1000"
  echo "== $label $mode"
  timeout 300 target/release/examples/loadgen --url nats://127.0.0.1:$NATS_PORT --metrics 127.0.0.1:$METRICS_PORT \
    --server-pid "$NATS_PID" --no-baseline --window 1h $args 2>&1 | grep -E "eventsieve" || true
  down
  rm -rf "$dir"
}
for r in $(seq 1 "$ROUNDS"); do
  for mode in batch single; do
    run old "$OLD" "$OLD_REPO" $mode
    run new "$NEW" "$NEW_REPO" $mode
  done
done

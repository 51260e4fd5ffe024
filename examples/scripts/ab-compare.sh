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
NATS="$(bash nats/install.sh 2>/dev/null | tail -n 1)"

wait_port() {
  for _ in $(seq 1 100); do
    (exec 3<>/dev/tcp/127.0.0.1/"$1") 2>/dev/null && return 0
    sleep 0.1
  done
  echo "nothing listens on $1" >&2
  return 1
}

run() { # label binary repo mode
  local label=$1 bin=$2 repo=$3 mode=$4 dir
  dir=$(mktemp -d /tmp/eventsieve-ab.XXXX)
  sed -e "s|127.0.0.1:4222|127.0.0.1:14322|" -e "s|/tmp/eventsieve-nats|$dir/js|" \
      -e "/^http:/d" nats/server.conf >"$dir/server.conf"
  "$NATS" -c "$dir/server.conf" >"$dir/nats.log" 2>&1 &
  local npid=$!
  wait_port 14322
  EVENTSIEVE_NATS__URL=nats://127.0.0.1:14322 EVENTSIEVE_DATA_DIR="$dir/data" \
    EVENTSIEVE_METRICS_ADDR=127.0.0.1:19564 EVENTSIEVE_LOG=warn EVENTSIEVE_WINDOW=1h \
    "$bin" run --config "$repo/config/eventsieve.toml" >"$dir/sidecar.log" 2>&1 &
  local spid=$!
  for _ in $(seq 1 300); do
    curl -s 127.0.0.1:19564/metrics | grep -qE '^eventsieve_uptime_seconds' && break
    sleep 0.1
  done
  local args="--seconds $SSECS --inflight 1024"
  [ "$mode" = batch ] && args="--seconds $BSECS --inflight 16 --batch 1000"
  echo "== $label $mode"
  timeout 300 target/release/examples/loadgen --url nats://127.0.0.1:14322 --metrics 127.0.0.1:19564 \
    --server-pid "$npid" --no-baseline --window 1h $args 2>&1 | grep -E "eventsieve" || true
  kill $spid 2>/dev/null; wait $spid || true
  kill $npid 2>/dev/null; wait $npid || true
  rm -rf "$dir"
}
for r in $(seq 1 "$ROUNDS"); do
  for mode in batch single; do
    run old "$OLD" "$OLD_REPO" $mode
    run new "$NEW" "$NEW_REPO" $mode
  done
done

#!/usr/bin/env bash
# durability "local" against "replicated": the JetStream journal with one
# replica on one nats-server (R1), and with three replicas on the local
# three-node cluster of nats/cluster-node{1,2,3}.conf (R3). Batch and single
# events, in alternating rounds, each on fresh servers: the ratios within
# one round are the figures, not any number alone (the machine is shared).
#
#   bash examples/scripts/replicated-compare.sh [ROUNDS] [SECONDS]
#
# Needs `cargo build --release --bin eventsieve --example loadgen` first.
# Uses ports 14322 (R1), 4222-4224 and 6222-6224 (R3) and 19564.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROUNDS=${1:-2}
SECS=${2:-10}
. examples/scripts/lib.sh

run() { # durability (local|replicated|replicated-r3) mode (batch|single)
  local dur=$1 mode=$2 dir url replicas=1 pids=()
  dir=$(mktemp -d /tmp/eventsieve-compare.XXXX)
  if [ "$dur" = replicated-r3 ]; then
    for i in 1 2 3; do
      sed -e "s|/tmp/eventsieve-nats-n$i|$dir/js$i|" -e "/^http:/d" "nats/cluster-node$i.conf" >"$dir/n$i.conf"
      "$NATS" -c "$dir/n$i.conf" >"$dir/nats$i.log" 2>&1 &
      pids+=($!)
    done
    for p in 4222 4223 4224; do wait_port $p; done
    sleep 4 # the JetStream meta leader
    url=nats://127.0.0.1:4222,nats://127.0.0.1:4223,nats://127.0.0.1:4224
    replicas=3
    dur=replicated
  else
    sed -e "s|127.0.0.1:4222|127.0.0.1:14322|" -e "s|/tmp/eventsieve-nats|$dir/js|" \
        -e "/^http:/d" nats/server.conf >"$dir/server.conf"
    "$NATS" -c "$dir/server.conf" >"$dir/nats.log" 2>&1 &
    pids+=($!)
    wait_port 14322
    url=nats://127.0.0.1:14322
  fi
  EVENTSIEVE_NATS__URL=$url EVENTSIEVE_DATA_DIR="$dir/data" \
    EVENTSIEVE_METRICS_ADDR=127.0.0.1:19564 EVENTSIEVE_LOG=warn EVENTSIEVE_WINDOW=1h \
    EVENTSIEVE_DURABILITY=$dur EVENTSIEVE_CLUSTER__NODE_ID=bench EVENTSIEVE_CLUSTER__REPLICAS=$replicas \
    target/release/eventsieve run >"$dir/sidecar.log" 2>&1 &
  local spid=$!
  # Serving: the metrics endpoint answers once the shards are recovered;
  # replicated, once all 32 shards were taken over (leased and replayed).
  local ready='^eventsieve_uptime_seconds'
  [ "$dur" = replicated ] && ready='^eventsieve_takeovers_total 32$'
  for _ in $(seq 1 300); do
    curl -s 127.0.0.1:19564/metrics | grep -qE "$ready" && break
    sleep 0.1
  done
  local args="--seconds $SECS --inflight 1024"
  [ "$mode" = batch ] && args="--seconds $SECS --inflight 16 --batch 1000"
  echo "== $1 $mode"
  # --server-pid: the first server's CPU only (on R3, one of three).
  timeout 300 target/release/examples/loadgen --url "${url%%,*}" --metrics 127.0.0.1:19564 \
    --server-pid "${pids[0]}" --no-baseline --window 1h $args 2>&1 | grep -vE "^CPU per event|^mode=|^run " || true
  kill $spid; wait $spid || true
  for p in "${pids[@]}"; do kill "$p"; wait "$p" || true; done
  [ -n "${KEEP:-}" ] && echo "kept $dir" || rm -rf "$dir"
}
for r in $(seq 1 "$ROUNDS"); do
  for mode in batch single; do
    run local $mode
    run replicated $mode
    run replicated-r3 $mode
  done
done

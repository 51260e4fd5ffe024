#!/usr/bin/env bash
# How long a routing rule set takes to be in force on three sidecars: from
# `eventsieve rules set` starting (and returning) to the last sidecar
# logging "Routing rules in force." for that revision, ROUNDS times.
#
#   bash examples/scripts/rules-convergence.sh [ROUNDS]
#
# Needs `cargo build --release` first. Uses ports 14422 (NATS) and
# 19661-19663 (metrics); stops what it started by PID.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROUNDS=${1:-5}
BIN=target/release/eventsieve
NATS="$(bash nats/install.sh 2>/dev/null | tail -n 1)"
dir=$(mktemp -d /tmp/eventsieve-conv.XXXX)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  [ -n "${KEEP:-}" ] || rm -rf "$dir"
}
trap cleanup EXIT

sed -e "s|127.0.0.1:4222|127.0.0.1:14422|" -e "s|/tmp/eventsieve-nats|$dir/js|" \
    -e "/^http:/d" nats/server.conf >"$dir/server.conf"
"$NATS" -c "$dir/server.conf" >"$dir/nats.log" 2>&1 &
pids+=($!)
for _ in $(seq 1 100); do
  (exec 3<>/dev/tcp/127.0.0.1/14422) 2>/dev/null && break
  sleep 0.1
done
export EVENTSIEVE_NATS__URL=nats://127.0.0.1:14422
for i in 1 2 3; do
  EVENTSIEVE_DURABILITY=memory EVENTSIEVE_METRICS_ADDR=127.0.0.1:1966$i EVENTSIEVE_LOG=info \
    "$BIN" run >"$dir/sidecar$i.log" 2>&1 &
  pids+=($!)
done
for i in 1 2 3; do
  for _ in $(seq 1 300); do
    curl -s 127.0.0.1:1966$i/metrics | grep -qE '^eventsieve_uptime_seconds' && break
    sleep 0.1
  done
done

for r in $(seq 1 "$ROUNDS"); do
  printf '[[rule]]\nname = "round%s"\nwhen = '"'"'event.n > %s'"'"'\nto = ["conv.r%s"]\n' "$r" "$r" "$r" >"$dir/rules.toml"
  before=$(date +%s.%N)
  out=$("$BIN" rules set "$dir/rules.toml")
  set_at=$(date +%s.%N)
  revision=$(echo "$out" | sed -E 's/.*revision ([0-9]+).*/\1/')
  # The sidecars log each set they put in force, with its revision.
  for _ in $(seq 1 200); do
    n=$( (grep -l "Routing rules in force. revision=$revision " "$dir"/sidecar*.log 2>/dev/null || true) | wc -l)
    [ "$n" -eq 3 ] && break
    sleep 0.01
  done
  last=$(grep -h "Routing rules in force. revision=$revision " "$dir"/sidecar*.log | awk '{print $1}' | sort | tail -1)
  last_s=$(date -d "$last" +%s.%N)
  ms() { echo "($1) * 1000" | bc -l | xargs printf '%.1f'; }
  echo "round $r: revision $revision in force on 3 sidecars $(ms "$last_s - $before") ms after rules set started, $(ms "$last_s - $set_at") ms after it returned ($(ms "$set_at - $before") ms to connect, check and put)"
done

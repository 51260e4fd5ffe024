#!/usr/bin/env bash
# What the reorder buffer adds to end-to-end latency, alternating: the same
# single events of in-order sessions (one producer, seq 0, 1, 2, ...) with
# `shard_key = "session_id"`, without `[ordering]` and with it (hold 2s);
# then with it and a gap every 10th seq, so the event after each gap waits
# the whole hold. Memory per held event: each run's held events and
# RssAnon a second before its end (the gap run's RssAnon over the in-order
# run's, per held event).
#
#   bash examples/scripts/ordering-latency.sh [ROUNDS] [EVENTS] [RATE]
#
# Needs `cargo build --release --bin eventsieve --example e2e_latency` first.
# Uses ports 14622 (NATS) and 19864 (metrics); stops what it started by PID.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROUNDS=${1:-3}
EVENTS=${2:-20000}
RATE=${3:-2000}
BIN=$PWD/target/release/eventsieve
NATS_PORT=14622 METRICS_PORT=19864
. examples/scripts/lib.sh
dir=$(mktemp -d /tmp/eventsieve-ord.XXXX)
trap 'rm -rf "$dir"' EXIT
sed 's/^shard_key = ""$/shard_key = "session_id"/' config/eventsieve.toml >"$dir/plain.toml"
cp "$dir/plain.toml" "$dir/ordered.toml"
printf '\n[ordering]\nsession = "session_id"\nby = "seq"\nhold = "2s"\n' >>"$dir/ordered.toml"

run() { # label config extra-args
  local label=$1 config=$2 extra=$3
  up "$(mktemp -d "$dir/run.XXXX")" "$config"
  printf '%-22s ' "$label"
  # shellcheck disable=SC2086
  timeout 300 target/release/examples/e2e_latency --url nats://127.0.0.1:$NATS_PORT \
    --events "$EVENTS" --rate "$RATE" --sessions 100 $extra &
  local lpid=$! at
  sleep $((EVENTS / RATE - 1))
  at=$(curl -s 127.0.0.1:$METRICS_PORT/metrics | awk '/^eventsieve_(reorder_held_events|reorder_held_bytes|rss_anon_bytes) /{v[$1]=$2} END {printf "held %d events (%d B counted), RssAnon %.1f MiB", v["eventsieve_reorder_held_events"], v["eventsieve_reorder_held_bytes"], v["eventsieve_rss_anon_bytes"] / 1048576}')
  wait $lpid || true
  echo "    at $((EVENTS / RATE - 1)) s: $at"
  down
}
for r in $(seq 1 "$ROUNDS"); do
  run "no ordering" "$dir/plain.toml" ""
  run "ordering, in order" "$dir/ordered.toml" ""
  run "ordering, gaps" "$dir/ordered.toml" "--skip-every 10"
done

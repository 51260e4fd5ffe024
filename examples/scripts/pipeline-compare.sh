#!/usr/bin/env bash
# The batch path with the stages of the e-commerce pipeline (sessions
# sharded and reordered, two routing rules, an aggregate emitting a moving
# average, a sum and top(10) every second) against dedup only: sessions
# ordered by their timestamp (every event held 2 s), by their `seq` (in
# order as sent, so mostly released at once), and not ordered; on the same
# loadgen events (JSON, 200 B), alternating on one binary, each run on a
# fresh nats-server and store, durability "local", sidecar alone.
#
#   bash examples/scripts/pipeline-compare.sh [ROUNDS] [SECONDS]
#
# Needs `cargo build --release --bin eventsieve --example loadgen` first.
# Uses ports 14342 and 19584; stops what it started by PID.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROUNDS=${1:-3}
SECS=${2:-15}
NATS_PORT=14342 METRICS_PORT=19584
BIN=${BIN:-target/release/eventsieve}
. examples/scripts/lib.sh

pipeline_config() { # the file to write; by-timestamp, by-seq or unordered
  sed -e 's|^shard_key = ""|shard_key = "session_id"|' config/eventsieve.toml >"$1"
  case $2 in
    by-timestamp) printf '\n[ordering]\nsession = "session_id"\nby = "timestamp"\ntime_unit = "s"\nhold = "2s"\n' >>"$1" ;;
    by-seq) printf '\n[ordering]\nsession = "session_id"\nby = "seq"\nhold = "2s"\n' >>"$1" ;;
  esac
  cat >>"$1" <<'TOML'

[routing]
default = "events.unique.{shard}"

[[routing.rule]]
name = "big"
when = 'event.metric_value > 990.0'
to = ["alerts.big"]
continue = true

[[routing.rule]]
name = "m0"
when = 'event.metric_name == "m0"'
to = ["metrics.m0"]
continue = true

[[aggregate]]
group = "metric_name"
value = "metric_value"
time = "timestamp"
item = "session_id"
max_window = "1h"
lateness = "30s"

[[aggregate.emit]]
stat = "mean"
window = "5m"
subject = "stats.mean.{group}"

[[aggregate.emit]]
stat = "sum"
window = "5m"
subject = "stats.sum.{group}"

[[aggregate.emit]]
stat = "top(10)"
window = "5m"
subject = "stats.top.{group}"
TOML
}

run() { # label config
  local label=$1 dir
  dir=$(mktemp -d /tmp/eventsieve-pipeline.XXXX)
  case $2 in
    dedup) cp config/eventsieve.toml "$dir/sidecar.toml" ;;
    *) pipeline_config "$dir/sidecar.toml" "$2" ;;
  esac
  up "$dir" "$dir/sidecar.toml"
  echo "== $label"
  timeout 300 target/release/examples/loadgen --url nats://127.0.0.1:$NATS_PORT --metrics 127.0.0.1:$METRICS_PORT \
    --server-pid "$NATS_PID" --no-baseline --window 1h --seconds "$SECS" --inflight 16 --batch 1000 2>&1 | grep -E "^eventsieve \(" || true
  down
  rm -rf "$dir"
}
for r in $(seq 1 "$ROUNDS"); do
  run dedup-only dedup
  run pipeline-ordered-by-timestamp by-timestamp
  run pipeline-ordered-by-seq by-seq
  run pipeline-without-ordering unordered
done

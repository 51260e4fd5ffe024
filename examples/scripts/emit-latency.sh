#!/usr/bin/env bash
# How soon an accepted event shows in an emitted moving average: a sidecar
# with an aggregate emitting `mean` every second (arrival time), and
# examples/emit_latency.rs sending one event every 137 ms.
#
#   bash examples/scripts/emit-latency.sh [EVENTS]
#
# Needs `cargo build --release --bin eventsieve --example emit_latency`
# first. Uses ports 14352 and 19604; stops what it started by PID.
set -euo pipefail
cd "$(dirname "$0")/../.."
EVENTS=${1:-100}
NATS_PORT=14352 METRICS_PORT=19604
BIN=${BIN:-target/release/eventsieve}
. examples/scripts/lib.sh
dir=$(mktemp -d /tmp/eventsieve-emit.XXXX)
cp config/eventsieve.toml "$dir/sidecar.toml"
cat >>"$dir/sidecar.toml" <<'TOML'

[[aggregate]]
group = "metric_name"
value = "metric_value"
max_window = "1h"

[[aggregate.emit]]
stat = "mean"
window = "5m"
every = "1s"
subject = "stats.mean.{group}"
TOML
up "$dir" "$dir/sidecar.toml"
timeout 300 target/release/examples/emit_latency --url nats://127.0.0.1:$NATS_PORT --events "$EVENTS" --every-ms 1000 2>&1 || echo "emit_latency failed (exit $?)"
down
rm -rf "$dir"

#!/usr/bin/env bash
# End-to-end latency with and without routing rules, alternating: single
# events at a fixed rate, from the producer's request to a subscriber on
# the subject they leave on. Without rules: `events.unique.*`. With rules:
# five rules, the first four tried and not matched, the fifth sending the
# event to `routed.big` (and stopping), so every event costs five
# evaluations.
#
#   bash examples/scripts/routing-latency.sh [ROUNDS] [EVENTS] [RATE]
#
# Needs `cargo build --release --bin eventsieve --example e2e_latency` first.
# Uses ports 14522 (NATS) and 19764 (metrics); stops what it started by PID.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROUNDS=${1:-3}
EVENTS=${2:-20000}
RATE=${3:-2000}
BIN=$PWD/target/release/eventsieve
NATS_PORT=14522 METRICS_PORT=19764
. examples/scripts/lib.sh
dir=$(mktemp -d /tmp/eventsieve-lat.XXXX)
trap 'rm -rf "$dir"' EXIT
cp config/eventsieve.toml "$dir/none.toml"
cp config/eventsieve.toml "$dir/rules.toml"
cat >>"$dir/rules.toml" <<'RULES'

[routing]
[[routing.rule]]
name = "r0"
when = 'event.kind == "order_placed" && event.metric_value > 1000000.0'
to = ["routed.r0"]
continue = true
[[routing.rule]]
name = "r1"
when = 'event.kind == "x1"'
to = ["routed.r1"]
continue = true
[[routing.rule]]
name = "r2"
when = 'event.kind in ["q2", "r2"]'
to = ["routed.r2"]
continue = true
[[routing.rule]]
name = "r3"
when = 'event.metric_value < -3.0'
to = ["routed.r3"]
continue = true
[[routing.rule]]
name = "big"
when = 'event.kind == "order_placed" && event.metric_value > 1000.0'
to = ["routed.big"]
RULES

run() { # label config subject
  local label=$1 config=$2 subject=$3
  up "$(mktemp -d "$dir/run.XXXX")" "$config"
  printf '%-9s ' "$label"
  timeout 300 target/release/examples/e2e_latency --url nats://127.0.0.1:$NATS_PORT \
    --subject "$subject" --events "$EVENTS" --rate "$RATE" || true
  down
}
for r in $(seq 1 "$ROUNDS"); do
  run "no rules" "$dir/none.toml" 'events.unique.*'
  run "5 rules" "$dir/rules.toml" routed.big
done

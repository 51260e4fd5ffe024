#!/usr/bin/env bash
# What routing rules cost under load: the same sidecar alternating without
# rules and with RULES rules that loadgen's events do not match (so every
# rule is evaluated and every event still goes to the default subject),
# through ab-compare.sh.
#
#   bash examples/scripts/routing-compare.sh RULES [ROUNDS]
#
# Needs `cargo build --release --bin eventsieve --example loadgen` first.
set -euo pipefail
cd "$(dirname "$0")/../.."
RULES=${1:?how many rules}
ROUNDS=${2:-3}
dir=$(mktemp -d /tmp/eventsieve-rules.XXXX)
trap 'rm -rf "$dir"' EXIT
mkdir -p "$dir/none/config" "$dir/rules/config"
cp config/eventsieve.toml "$dir/none/config/"
cp config/eventsieve.toml "$dir/rules/config/"
{
  printf '\n[routing]\n'
  for i in $(seq 0 $((RULES - 1))); do
    case $((i % 5)) in
      0) when='event.kind == "order_placed" && event.metric_value > 1000000.0' ;;
      1) when="event.metric_name == \"x$i\"" ;;
      2) when="event.metric_name in [\"q$i\", \"r$i\"]" ;;
      3) when="event.metric_value < -$i.0" ;;
      *) when="event.kind.startsWith(\"z$i\")" ;;
    esac
    printf '[[routing.rule]]\nname = "r%s"\nwhen = '"'"'%s'"'"'\nto = ["routed.r%s"]\ncontinue = true\n' "$i" "$when" "$i"
  done
} >>"$dir/rules/config/eventsieve.toml"
bin=$PWD/target/release/eventsieve
echo "old: no rules; new: $RULES rules"
OLD_BIN=$bin NEW_BIN=$bin bash examples/scripts/ab-compare.sh "$dir/none" "$dir/rules" "$ROUNDS"

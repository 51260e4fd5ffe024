#!/usr/bin/env bash
# What `shard_key` costs under load: the same sidecar alternating without
# it (shards by the key) and with `shard_key = "session_id"` (loadgen's
# events carry one), through ab-compare.sh. One sidecar owns every shard,
# so the difference is reading the second field, not a forward.
#
#   bash examples/scripts/shard-key-compare.sh [ROUNDS]
#
# Needs `cargo build --release --bin eventsieve --example loadgen` first.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROUNDS=${1:-3}
dir=$(mktemp -d /tmp/eventsieve-shardkey.XXXX)
trap 'rm -rf "$dir"' EXIT
mkdir -p "$dir/key/config" "$dir/session/config"
cp config/eventsieve.toml "$dir/key/config/"
sed 's/^shard_key = ""$/shard_key = "session_id"/' config/eventsieve.toml >"$dir/session/config/eventsieve.toml"
bin=$PWD/target/release/eventsieve
echo "old: shards by the key; new: shard_key = \"session_id\""
OLD_BIN=$bin NEW_BIN=$bin bash examples/scripts/ab-compare.sh "$dir/key" "$dir/session" "$ROUNDS"

#!/usr/bin/env bash
# Single-event verdict latency with and without 64 concurrent metrics
# scrapers, at about 5 M live ids (ROUNDS=5 PAUSES=1 alternates five runs
# without and five with scrapers pausing 1 s). Starts its own nats-server on
# 127.0.0.1:4222 and the sidecar (metrics on 127.0.0.1:9464), stops both by
# PID. Run from the project root: bash examples/scripts/scrapers.sh
set -u
cd "$(dirname "$0")/../.."
export PATH="$HOME/.local/bin:$PATH"
cargo build --release --quiet --bin eventsieve --example loadgen
LG=$PWD/target/release/examples/loadgen
NS=$(mktemp -d)
printf 'listen: 127.0.0.1:4222\njetstream { store_dir: "%s/js" }\nmappings = {\n "dedup.ingest.*": "dedup.shard.{{partition(32,1)}}.{{wildcard(1)}}"\n "loadgen.ingest.*": "loadgen.shard.{{partition(32,1)}}.{{wildcard(1)}}"\n}\n' $NS > $NS/c.conf
nats-server -c $NS/c.conf > $NS/log 2>&1 & NPID=$!
sleep 1
D=$(mktemp -d)
EVENTSIEVE_DATA_DIR=$D EVENTSIEVE_LOG=warn target/release/eventsieve run --config config/eventsieve.toml > $D/log 2>&1 &
SPID=$!
sleep 1.5
$LG --seconds 14 --inflight 16 --batch 1000 --no-baseline --json | python3 -c "import json,sys; d=json.load(sys.stdin); print('fill: live ids', d['sidecar_memory'].get('live_ids'))"
cpu() { awk '{print $14+$15}' /proc/$1/stat; }
# One single-event run; prints its figures and the sidecar's CPU seconds
# over it (the load generator then waits for the next table walk, which is
# counted too). The scrapers print their own CPU.
single() {
  local c0 c1
  c0=$(cpu $SPID)
  OUT=$($LG --seconds 8 --inflight 1024 --no-baseline --json)
  c1=$(cpu $SPID)
  echo "$OUT" | python3 -c "import json,sys; d=json.load(sys.stdin); r=d['runs'][-1]; print('$1: %.0f ev/s p50 %.2f ms p99 %.2f ms errors %d wrong %d, sidecar cpu %.2f s' % (r['events_per_s'], r['p50_ms'], r['p99_ms'], r['errors'], r['wrong'], ($c1-$c0)/100))"
}
# ROUNDS alternations of a run without scrapers and one per pause in PAUSES.
SC=
for round in $(seq 1 "${ROUNDS:-1}"); do
  single "round $round, no scrapers"
  for pause in ${PAUSES:-1 0.1 0}; do
    python3 examples/scripts/scrapers.py 10 $pause & SC=$!
    single "round $round, 64 scrapers, pause $pause s"
    wait $SC; SC=
  done
done
single "no scrapers"
curl -s 127.0.0.1:9464/metrics | grep -E "census_walks|table_live_ids "
kill -TERM $SPID; wait $SPID; kill $NPID; wait $NPID 2>/dev/null; rm -rf $D $NS

#!/usr/bin/env bash
# An idle sidecar: RSS, start and shutdown times at several shard counts
# (SHARDS="32 1024 65536", OWNED=all or e.g. 0-32767). Starts its own
# nats-server on 127.0.0.1:4333 and stops everything it started by PID.
# Run from the project root: bash examples/scripts/idle-footprint.sh
export PATH="$HOME/.local/bin:$PATH"
cd "$(dirname "$0")/../.."
cargo build --release --quiet --bin eventsieve
BIN=${BIN:-$PWD/target/release/eventsieve}
NS=$(mktemp -d)
printf 'listen: 127.0.0.1:4333\njetstream { store_dir: "%s/js" }\n' $NS > $NS/c.conf
nats-server -c $NS/c.conf > $NS/log 2>&1 & NPID=$!
sleep 1
for shards in ${SHARDS:-32 1024 65536}; do
  D=$(mktemp -d)
  t0=$(date +%s.%N)
  EVENTSIEVE_SHARDS=$shards EVENTSIEVE_OWNED_SHARDS=${OWNED:-all} EVENTSIEVE_DATA_DIR=$D EVENTSIEVE_METRICS_ADDR= EVENTSIEVE_LOG=info EVENTSIEVE_NATS__URL=nats://127.0.0.1:4333 $BIN run > $D/log 2>&1 &
  SPID=$!
  for i in $(seq 1 1200); do grep -q "Serving" $D/log && break; kill -0 $SPID 2>/dev/null || break; sleep 0.1; done
  t1=$(date +%s.%N)
  sleep 2
  rss=$(awk '/VmRSS/{print $2}' /proc/$SPID/status); anon=$(awk '/RssAnon/{print $2}' /proc/$SPID/status)
  t2=$(date +%s.%N)
  kill -TERM $SPID; wait $SPID; code=$?
  t3=$(date +%s.%N)
  echo "shards=$shards start_s=$(echo "$t1-$t0"|bc) rss_mib=$((rss/1024)) anon_mib=$((anon/1024)) shutdown_s=$(echo "$t3-$t2"|bc) exit=$code"
  rm -rf $D
done
kill $NPID; wait $NPID 2>/dev/null; rm -rf $NS

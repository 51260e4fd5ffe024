#!/bin/bash
# HTTP verdicts against their ceiling, then Redis SET NX EX, on this machine:
# three alternating 10 s wrk rounds of examples/http_ceiling (the bare axum
# stack) and the sidecar (durability local), each one's CPU per request from
# /proc/<pid>/stat, then redis-benchmark. Needs wrk and redis-server
# (Debian packages), nats-server (nats/install.sh) and release builds:
#   cargo build --release --bin eventsieve --example http_ceiling
#   bash examples/scripts/http-compare.sh
set -u
cd "$(dirname "$0")/../.."   # the project root; uses ports 14222, 8080, 8081, 16379
export PATH="$HOME/.local/bin:$PATH"
T=$(mktemp -d)
nats-server -a 127.0.0.1 -p 14222 -js -sd $T/js >/dev/null 2>&1 & NATS=$!
sleep 1
EVENTSIEVE_NATS__URL=nats://127.0.0.1:14222 EVENTSIEVE_DATA_DIR=$T/data EVENTSIEVE_HTTP_ADDR=127.0.0.1:8080 \
  EVENTSIEVE_METRICS_ADDR= EVENTSIEVE_LOG=warn EVENTSIEVE_WINDOW=1h target/release/eventsieve run & SIDE=$!
target/release/examples/http_ceiling 127.0.0.1:8081 2>/dev/null & CEIL=$!
sleep 2
cpu() { awk '{print $14+$15}' /proc/$1/stat; }
run() { # name pid port
  local before=$(cpu $2)
  local out=$(wrk -t2 -c64 -d10s -s examples/scripts/http-load.lua http://127.0.0.1:$3 2>&1)
  local after=$(cpu $2)
  local rps=$(echo "$out" | awk '/Requests\/sec/ {print $2}')
  local lat=$(echo "$out" | awk '/Latency/ {print $2; exit}')
  local us=$(python3 -c "print(round(($after-$before)*10000/($rps*10),1))")
  echo "$1: $rps req/s, latency mean $lat, server CPU $us us/request"
}
for r in 1 2 3; do
  run ceiling $CEIL 8081
  run sidecar $SIDE 8080
done
kill $SIDE $CEIL; wait $SIDE $CEIL 2>/dev/null
kill $NATS; wait $NATS 2>/dev/null
redis-server --port 16379 --save '' --appendonly no --daemonize no >/dev/null 2>&1 & RED=$!
sleep 1
for r in 1 2; do
  before=$(cpu $RED)
  out=$(redis-benchmark -p 16379 -c 64 -n 1000000 -r 100000000 -q SET "k:__rand_int__" 1 NX EX 604800 2>&1 | tr '\r' '\n' | grep -v "^$" | tail -1)
  after=$(cpu $RED)
  echo "redis SET NX EX, 64 clients: $out; redis CPU $(python3 -c "print(round(($after-$before)*10000/1000000,1))") us/request"
done
out=$(redis-benchmark -p 16379 -c 64 -P 16 -n 2000000 -r 100000000 -q SET "k:__rand_int__" 1 NX EX 604800 2>&1 | tr '\r' '\n' | grep -v "^$" | tail -1)
echo "redis pipelined x16: $out"
redis-cli -p 16379 info memory | grep used_memory: ; redis-cli -p 16379 dbsize
kill $RED; wait $RED 2>/dev/null
rm -rf $T

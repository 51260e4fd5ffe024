#!/usr/bin/env bash
# Starts the three-node JetStream cluster of nats/cluster-node{1,2,3}.conf on
# this machine (loopback: clients on 4222-4224, routes on 6222-6224) and waits
# until every node takes clients. PIDs go to /tmp/eventsieve-nats-n<i>.pid,
# logs to /tmp/eventsieve-nats-n<i>.log; stop it with nats/stop-cluster.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN="$(bash nats/install.sh | tail -n 1)"
for i in 1 2 3; do
  port=$((4221 + i))
  if (exec 3<>/dev/tcp/127.0.0.1/$port) 2>/dev/null; then
    echo "something already listens on 127.0.0.1:$port; stop it first" >&2
    exit 1
  fi
done
for i in 1 2 3; do
  "$BIN" -c "nats/cluster-node$i.conf" >"/tmp/eventsieve-nats-n$i.log" 2>&1 &
  echo $! >"/tmp/eventsieve-nats-n$i.pid"
done
for i in 1 2 3; do
  port=$((4221 + i))
  for _ in $(seq 1 100); do
    (exec 3<>/dev/tcp/127.0.0.1/$port) 2>/dev/null && break
    sleep 0.1
  done
  (exec 3<>/dev/tcp/127.0.0.1/$port) 2>/dev/null || { echo "node $i did not start; see /tmp/eventsieve-nats-n$i.log" >&2; exit 1; }
done
echo "cluster started: nats://127.0.0.1:4222,nats://127.0.0.1:4223,nats://127.0.0.1:4224 (JetStream elects its leader within a few seconds)" >&2

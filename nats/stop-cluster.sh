#!/usr/bin/env bash
# Stops the nats-servers nats/start-cluster.sh started (by the PIDs it wrote).
set -uo pipefail
for i in 1 2 3; do
  pidfile="/tmp/eventsieve-nats-n$i.pid"
  [ -f "$pidfile" ] || continue
  kill "$(cat "$pidfile")" 2>/dev/null && echo "stopped node $i" >&2
  rm -f "$pidfile"
done

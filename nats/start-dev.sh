#!/usr/bin/env bash
# Starts a local nats-server with JetStream and the partition mapping unless
# one already answers on 127.0.0.1:4222. Writes its PID to /tmp/eventsieve-nats.pid.
set -euo pipefail
cd "$(dirname "$0")/.."
if (exec 3<>/dev/tcp/127.0.0.1/4222) 2>/dev/null; then
  echo "a NATS server is already listening on 127.0.0.1:4222" >&2
  exit 0
fi
BIN="$(bash nats/install.sh | tail -n 1)"
"$BIN" -c nats/server.conf >/tmp/eventsieve-nats.log 2>&1 &
echo $! >/tmp/eventsieve-nats.pid
for _ in $(seq 1 50); do
  if (exec 3<>/dev/tcp/127.0.0.1/4222) 2>/dev/null; then
    echo "nats-server started (pid $(cat /tmp/eventsieve-nats.pid), log /tmp/eventsieve-nats.log)" >&2
    exit 0
  fi
  sleep 0.1
done
echo "nats-server did not start; see /tmp/eventsieve-nats.log" >&2
exit 1

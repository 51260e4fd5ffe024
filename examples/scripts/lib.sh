# Shared by the measurement scripts: a nats-server and a sidecar of their
# own on fixed loopback ports, each in a fresh directory, stopped by PID.
# Source it from the repository root after setting NATS_PORT,
# METRICS_PORT and BIN.

NATS="$(bash nats/install.sh 2>/dev/null | tail -n 1)"

# Waits until something listens on 127.0.0.1:$1 (at most 10 s).
wait_port() {
  for _ in $(seq 1 100); do
    (exec 3<>/dev/tcp/127.0.0.1/"$1") 2>/dev/null && return 0
    sleep 0.1
  done
  echo "nothing listens on $1" >&2
  return 1
}

# Starts nats-server (nats/server.conf on NATS_PORT, its store in $1) and
# the sidecar with the configuration $2 (its data in $1); sets NATS_PID and
# SIDECAR_PID once the sidecar's metrics answer.
up() {
  local dir=$1 config=$2
  sed -e "s|127.0.0.1:4222|127.0.0.1:$NATS_PORT|" -e "s|/tmp/eventsieve-nats|$dir/js|" \
      -e "/^http:/d" nats/server.conf >"$dir/server.conf"
  "$NATS" -c "$dir/server.conf" >"$dir/nats.log" 2>&1 &
  NATS_PID=$!
  wait_port "$NATS_PORT"
  EVENTSIEVE_NATS__URL=nats://127.0.0.1:$NATS_PORT EVENTSIEVE_DATA_DIR="$dir/data" \
    EVENTSIEVE_METRICS_ADDR=127.0.0.1:$METRICS_PORT EVENTSIEVE_LOG=warn EVENTSIEVE_WINDOW=1h \
    "$BIN" run --config "$config" >"$dir/sidecar.log" 2>&1 &
  SIDECAR_PID=$!
  for _ in $(seq 1 300); do
    curl -s 127.0.0.1:"$METRICS_PORT"/metrics | grep -qE '^eventsieve_uptime_seconds' && return 0
    sleep 0.1
  done
  echo "the sidecar did not come up; its log: $dir/sidecar.log" >&2
  return 1
}

# Stops what `up` started.
down() {
  kill "$SIDECAR_PID" 2>/dev/null || true
  wait "$SIDECAR_PID" || true
  kill "$NATS_PID" 2>/dev/null || true
  wait "$NATS_PID" || true
}

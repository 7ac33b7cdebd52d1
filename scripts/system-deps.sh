#!/usr/bin/env bash
# Install the Debian packages the test suite needs, only those missing: mosquitto (MQTT broker),
# Node.js + npm (real Trystero test peers), chromium (browser test peers), iproute2 + util-linux
# (the loopback-only network namespace), postgresql (initdb + postgres for the throwaway clusters of
# the PostgreSQL store tests; Debian keeps them in /usr/lib/postgresql/<version>/bin, off PATH).
# Runs apt-get as root, or through sudo when available.
set -euo pipefail

need=()
command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || need+=(mosquitto)
command -v node >/dev/null 2>&1 || need+=(nodejs)
command -v npm >/dev/null 2>&1 || need+=(npm)
command -v chromium >/dev/null 2>&1 || [ -x /usr/bin/chromium ] || need+=(chromium)
command -v unshare >/dev/null 2>&1 || need+=(util-linux)
command -v ip >/dev/null 2>&1 || need+=(iproute2)
have_initdb() {
  command -v initdb >/dev/null 2>&1 && return 0
  local candidate
  for candidate in /usr/lib/postgresql/*/bin/initdb; do
    [ -x "$candidate" ] && return 0
  done
  return 1
}
have_initdb || need+=(postgresql)

[ ${#need[@]} -eq 0 ] && exit 0

if [ "$(id -u)" -eq 0 ]; then
  sudo=()
elif command -v sudo >/dev/null 2>&1; then
  sudo=(sudo)
else
  echo "system-deps: missing Debian packages: ${need[*]}; run as root: apt-get install -y ${need[*]}" >&2
  exit 1
fi
echo "system-deps: installing ${need[*]}"
"${sudo[@]}" apt-get update -qq
DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null

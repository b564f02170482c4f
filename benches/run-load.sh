#!/usr/bin/env bash
# Load run: builds the release binary, installs Squid and HAProxy if missing
# (as root, without leaving their services running), runs `cargo bench --bench load` with
# the given arguments (--quick, --reps N, --only CASE) and tees the markdown
# table to target/load-results.md. Progress goes to stderr.
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build --release --quiet

missing=""
for pkg in squid haproxy; do
  if ! command -v "$pkg" >/dev/null 2>&1 && [ ! -x "/usr/sbin/$pkg" ]; then
    missing="$missing $pkg"
  fi
done
if [ -n "$missing" ]; then
  if [ "$(id -u)" -eq 0 ]; then
    echo "run-load: installing$missing (reference proxies)" >&2
    export DEBIAN_FRONTEND=noninteractive
    # Keep the packages' scripts from starting their services.
    policy=/usr/sbin/policy-rc.d
    created_policy=0
    if [ ! -e "$policy" ]; then
      printf '#!/bin/sh\nexit 101\n' > "$policy" && chmod +x "$policy" && created_policy=1
    fi
    apt-get update -qq
    # shellcheck disable=SC2086 # one word per package
    apt-get install -y -qq --no-install-recommends $missing >/dev/null || true
    [ "$created_policy" -eq 1 ] && rm -f "$policy"
    # If a service started anyway, stop it (only the packaged one, by its pid file).
    if command -v service >/dev/null 2>&1; then
      for pkg in $missing; do service "$pkg" stop >/dev/null 2>&1 || true; done
    fi
    for pidfile in /run/squid.pid /var/run/squid.pid /run/haproxy.pid; do
      if [ -s "$pidfile" ]; then
        kill "$(cat "$pidfile")" 2>/dev/null || true
      fi
    done
  else
    echo "run-load:$missing not installed and not root: those columns will say n/a" >&2
  fi
fi

mkdir -p target
echo "run-load: load average before the run: $(cut -d' ' -f1-3 /proc/loadavg)" >&2
cargo bench --quiet --bench load -- "$@" | tee target/load-results.md
echo "run-load: table written to target/load-results.md" >&2

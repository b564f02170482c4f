#!/usr/bin/env bash
# Load run: builds the release binary, installs Squid if missing (as root,
# without leaving its service running), runs `cargo bench --bench load` with
# the given arguments (--quick, --reps N, --only CASE) and tees the markdown
# table to target/load-results.md. Progress goes to stderr.
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build --release --quiet

if ! command -v squid >/dev/null 2>&1 && [ ! -x /usr/sbin/squid ]; then
  if [ "$(id -u)" -eq 0 ]; then
    echo "run-load: installing squid (reference proxy)" >&2
    export DEBIAN_FRONTEND=noninteractive
    # Keep the package's scripts from starting the squid service.
    policy=/usr/sbin/policy-rc.d
    created_policy=0
    if [ ! -e "$policy" ]; then
      printf '#!/bin/sh\nexit 101\n' > "$policy" && chmod +x "$policy" && created_policy=1
    fi
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends squid >/dev/null || true
    [ "$created_policy" -eq 1 ] && rm -f "$policy"
    # If a service started anyway, stop it (only the packaged one, by its pid file).
    if command -v service >/dev/null 2>&1; then
      service squid stop >/dev/null 2>&1 || true
    fi
    for pidfile in /run/squid.pid /var/run/squid.pid; do
      if [ -s "$pidfile" ]; then
        kill "$(cat "$pidfile")" 2>/dev/null || true
      fi
    done
  else
    echo "run-load: squid not installed and not root: the squid column will say n/a" >&2
  fi
fi

mkdir -p target
echo "run-load: load average before the run: $(cut -d' ' -f1-3 /proc/loadavg)" >&2
cargo bench --quiet --bench load -- "$@" | tee target/load-results.md
echo "run-load: table written to target/load-results.md" >&2

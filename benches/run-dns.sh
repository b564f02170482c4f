#!/usr/bin/env bash
# DNS cache-hit bench: builds the release binary, installs dnsmasq and
# dnsperf if missing (as root, without leaving a dnsmasq service running),
# runs `cargo bench --bench dns` with the given arguments (--reps N,
# --secs S) and tees the markdown table to target/dns-results.md.
# Per-run values go to stderr.
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build --release --quiet

missing=()
command -v dnsmasq >/dev/null 2>&1 || [ -x /usr/sbin/dnsmasq ] || missing+=(dnsmasq)
command -v dnsperf >/dev/null 2>&1 || missing+=(dnsperf)
if [ "${#missing[@]}" -gt 0 ]; then
  if [ "$(id -u)" -eq 0 ]; then
    echo "run-dns: installing ${missing[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    # Keep the package's scripts from starting the dnsmasq service.
    policy=/usr/sbin/policy-rc.d
    created_policy=0
    if [ ! -e "$policy" ]; then
      printf '#!/bin/sh\nexit 101\n' > "$policy" && chmod +x "$policy" && created_policy=1
    fi
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    [ "$created_policy" -eq 1 ] && rm -f "$policy"
  else
    echo "run-dns: ${missing[*]} missing and not root: install them first" >&2
    exit 1
  fi
fi

mkdir -p target
cargo bench --quiet --bench dns -- "$@" | tee target/dns-results.md
echo "run-dns: table written to target/dns-results.md" >&2

#!/usr/bin/env bash
# Render the portcullis nftables ruleset, check it, load it, then turn on IP
# forwarding; or (--stop) turn forwarding off and remove the ruleset.
# Installed as /usr/local/lib/portcullis/apply-nftables.sh and run by
# portcullis-nftables.service (start, reload, stop); also fine by hand.
#
#   apply-nftables.sh [--config FILE] [--dry-run]
#   apply-nftables.sh --stop
#   apply-nftables.sh --counters FILE
#
#   --config FILE  portcullis config (default /etc/portcullis/portcullis.toml)
#   --dry-run      render and check only: print the ruleset, load nothing,
#                  change no sysctl
#   --stop         forwarding off, then delete table inet portcullis
#   --counters FILE  write the forward chain's counters (nft -j) to FILE,
#                  world-readable, for the gateway's /metrics and /readyz;
#                  if the table is gone, turn forwarding off and remove FILE
#
# Environment: PORTCULLIS (binary, default /usr/local/bin/portcullis),
# NFT (default nft), RULESET (default /run/portcullis/ruleset.nft),
# COUNTERS (default /run/portcullis/ruleset-counters.json: written after a
# load, removed by --stop, so `[admin] require_ruleset` sees the change at
# the gateway's next /readyz instead of at the timer's next run).
#
# nft -f loads a file in one transaction: either the whole new ruleset is
# in place or the old one is untouched. Forwarding is switched on only after
# a successful load and once the portcullis table is seen in the kernel, so
# a bad config never leaves the VM forwarding without rules. A failed load
# leaves forwarding as it was: off at start (the unit switches it off first),
# on with the previous ruleset on reload.
#
# --stop works in the opposite order: forwarding off first, then the table
# goes. Removing the table while forwarding is on would route compute's
# traffic to the internet unfiltered, if only for a moment.
set -euo pipefail

config=/etc/portcullis/portcullis.toml
action=apply
portcullis=${PORTCULLIS:-/usr/local/bin/portcullis}
nft=${NFT:-nft}
ruleset=${RULESET:-/run/portcullis/ruleset.nft}
counters=${COUNTERS:-/run/portcullis/ruleset-counters.json}
# The table `portcullis render nftables` creates (`table inet portcullis`).
table="inet portcullis"

usage() { sed -n '2,23s/^# \{0,1\}//p' "$0"; }
die() { echo "apply-nftables: $*" >&2; exit 1; }

# Writes /proc/sys directly rather than calling sysctl(8): one dependency
# less, and the same file the kernel reads. A kernel booted with
# ipv6.disable=1 has no net/ipv6 directory; that key is skipped.
set_forwarding() {
    local value=$1 key
    for key in /proc/sys/net/ipv4/ip_forward /proc/sys/net/ipv6/conf/all/forwarding; do
        [[ -e $key ]] || continue
        echo "$value" >"$key" || die "cannot write $value to $key"
    done
}

table_loaded() { "$nft" list table $table >/dev/null 2>&1; }

# The forward chain's counters to $1, atomically (a scrape never reads half
# a file). Written even when every counter is 0: the file says the chain is
# there; its age says when it was last seen.
write_counters() {
    local file=$1 tmp
    install -d -m 0755 "$(dirname "$file")" || return 1
    tmp=$(mktemp "$file.XXXXXX") || return 1
    if ! "$nft" -j list chain $table forward >"$tmp"; then
        rm -f "$tmp"
        return 1
    fi
    chmod 0644 "$tmp" && mv -f "$tmp" "$file"
}

while [[ $# -gt 0 ]]; do
    case $1 in
        -c|--config) [[ $# -ge 2 ]] || die "$1 needs a file"; config=$2; shift 2 ;;
        --config=*) config=${1#--config=}; shift ;;
        --dry-run) action=dry-run; shift ;;
        --stop) action=stop; shift ;;
        --counters) [[ $# -ge 2 ]] || die "$1 needs a file"; action=counters; counters=$2; shift 2 ;;
        -h|--help) usage; exit 0 ;;
        *) usage >&2; die "unknown argument: $1" ;;
    esac
done

if [[ $action == counters ]]; then
    # The gateway runs without CAP_NET_ADMIN and cannot read nft itself:
    # this root-only step dumps the counters for it (atomically: a scrape
    # never reads half a file).
    command -v "$nft" >/dev/null || die "nft not found (apt-get install nftables)"
    # Also the watchman for a ruleset removed behind our back (a bare
    # `nft flush ruleset`): no table means no filter, so no forwarding.
    # Its file goes too: a gateway with `[admin] require_ruleset` turns
    # not ready at once.
    if ! table_loaded; then
        set_forwarding 0
        rm -f "$counters"
        die "table $table is gone (flushed?): IP forwarding turned off, $counters removed; restart portcullis-nftables.service"
    fi
    write_counters "$counters" || die "nft -j list chain $table forward failed (is the ruleset loaded?)"
    exit 0
fi

if [[ $action == stop ]]; then
    # Forwarding off comes first and needs nothing else: even without nft
    # the VM stops routing.
    set_forwarding 0
    rm -f "$counters"
    command -v "$nft" >/dev/null || die "IP forwarding off; nft not found, table $table not removed"
    if table_loaded; then
        "$nft" delete table $table || die "nft delete table $table failed (forwarding is off)"
        echo "apply-nftables: IP forwarding off; table $table removed" >&2
    else
        echo "apply-nftables: IP forwarding off; table $table was not loaded" >&2
    fi
    exit 0
fi

command -v "$nft" >/dev/null || die "nft not found (apt-get install nftables)"
[[ -r $config ]] || die "cannot read config $config"
command -v "$portcullis" >/dev/null || die "portcullis binary not found: $portcullis"

# Render next to the final file, then rename: a failed render never leaves a
# truncated ruleset behind.
install -d -m 0755 "$(dirname "$ruleset")"
tmp=$(mktemp "$ruleset.XXXXXX")
trap 'rm -f "$tmp"' EXIT
"$portcullis" render nftables -c "$config" >"$tmp" || die "portcullis render nftables -c $config failed"
[[ -s $tmp ]] || die "rendered ruleset is empty"
if ! "$nft" -c -f "$tmp"; then
    cp -f "$tmp" "$ruleset.rejected"
    die "rendered ruleset does not pass nft -c; it is kept in $ruleset.rejected"
fi

if [[ $action == dry-run ]]; then
    cat "$tmp"
    echo "apply-nftables: dry run: ruleset from $config is valid; nothing loaded" >&2
    exit 0
fi

chmod 0644 "$tmp"
mv -f "$tmp" "$ruleset"
trap - EXIT
"$nft" -f "$ruleset" || die "nft -f $ruleset failed; the previous ruleset (if any) is still loaded"
table_loaded || die "$ruleset loaded but table $table is not in the kernel; forwarding left as it was"

set_forwarding 1
echo "apply-nftables: loaded $ruleset from $config; IP forwarding on" >&2
# A gateway waiting for its ruleset need not wait for the timer's first run.
write_counters "$counters" || echo "apply-nftables: warning: could not write $counters; the counters timer will" >&2

#!/usr/bin/env bash
# Render the portcullis nftables ruleset, check it, load it, then turn on IP
# forwarding. Installed as /usr/local/lib/portcullis/apply-nftables.sh and
# run by portcullis-nftables.service (start and reload); also fine by hand.
#
#   apply-nftables.sh [--config FILE] [--dry-run]
#
#   --config FILE  portcullis config (default /etc/portcullis/portcullis.toml)
#   --dry-run      render and check only: print the ruleset, load nothing,
#                  change no sysctl
#
# Environment: PORTCULLIS (binary, default /usr/local/bin/portcullis),
# NFT (default nft), RULESET (default /run/portcullis/ruleset.nft).
#
# nft -f loads a file in one transaction: either the whole new ruleset is
# in place or the old one is untouched. Forwarding is switched on only after
# a successful load, so a bad config never leaves the VM forwarding without
# rules (portcullis-nftables.service switches it off before calling this).
set -euo pipefail

config=/etc/portcullis/portcullis.toml
dry_run=0
portcullis=${PORTCULLIS:-/usr/local/bin/portcullis}
nft=${NFT:-nft}
ruleset=${RULESET:-/run/portcullis/ruleset.nft}

usage() { sed -n '2,13s/^# \{0,1\}//p' "$0"; }
die() { echo "apply-nftables: $*" >&2; exit 1; }

while [[ $# -gt 0 ]]; do
    case $1 in
        -c|--config) [[ $# -ge 2 ]] || die "$1 needs a file"; config=$2; shift 2 ;;
        --config=*) config=${1#--config=}; shift ;;
        --dry-run) dry_run=1; shift ;;
        -h|--help) usage; exit 0 ;;
        *) usage >&2; die "unknown argument: $1" ;;
    esac
done

[[ -r $config ]] || die "cannot read config $config"
command -v "$portcullis" >/dev/null || die "portcullis binary not found: $portcullis"
command -v "$nft" >/dev/null || die "nft not found (apt-get install nftables)"

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

if [[ $dry_run -eq 1 ]]; then
    cat "$tmp"
    echo "apply-nftables: dry run: ruleset from $config is valid; nothing loaded" >&2
    exit 0
fi

chmod 0644 "$tmp"
mv -f "$tmp" "$ruleset"
trap - EXIT
"$nft" -f "$ruleset" || die "nft -f $ruleset failed; the previous ruleset is still loaded"

# -e: a kernel booted with ipv6.disable=1 has no net.ipv6 keys.
sysctl -q -e -w net.ipv4.ip_forward=1 net.ipv6.conf.all.forwarding=1
echo "apply-nftables: loaded $ruleset from $config; IP forwarding on" >&2

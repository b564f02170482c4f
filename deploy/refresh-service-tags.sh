#!/usr/bin/env bash
# Refreshes the Azure service tags file the gateway reads, without a person:
# logs in with the VM's managed identity, fetches the list with
# `az network list-service-tags`, validates it with `portcullis check`
# against the gateway's own config, replaces the file atomically (a rename
# in its own folder) and only then reloads the gateway (which re-renders the
# nftables sets too). Any failure leaves the old file in place and the
# gateway untouched. Either way the outcome goes to FILE.status, which the
# gateway exports as portcullis_service_tags_last_refresh_successful (the
# PortcullisServiceTagsRefreshFailed alert), and the exit code (the unit
# shows failed).
#
# Run weekly by portcullis-service-tags.timer, as root (reloading the
# gateway through systemd needs it). Settings, from the environment (the
# unit reads /etc/default/portcullis):
#   PORTCULLIS_REGION         required: an Azure region, e.g. westus2 (az's
#                             --location; every region of a cloud gets the
#                             same list, the region only picks the endpoint)
#   PORTCULLIS_SERVICE_TAGS   the file to replace
#                             (default /var/lib/portcullis/service-tags.json)
#   PORTCULLIS_CONFIG         the config to validate with
#                             (default /etc/portcullis/portcullis.toml)
#   PORTCULLIS_AZ_LOGIN_ARGS  more `az login --identity` arguments, e.g. a
#                             user-assigned identity's "--client-id ID"
#   PORTCULLIS                the binary (default /usr/local/bin/portcullis)
#   PORTCULLIS_RELOAD         how to reload the gateway (default
#                             "systemctl try-reload-or-restart portcullis.service":
#                             a reload when it runs, nothing when it does not)
set -uo pipefail

region=${PORTCULLIS_REGION:-}
tags=${PORTCULLIS_SERVICE_TAGS:-/var/lib/portcullis/service-tags.json}
config=${PORTCULLIS_CONFIG:-/etc/portcullis/portcullis.toml}
portcullis=${PORTCULLIS:-/usr/local/bin/portcullis}
reload=${PORTCULLIS_RELOAD:-systemctl try-reload-or-restart portcullis.service}
dir=$(dirname -- "$tags")

# FILE.status: key=value lines the gateway reads at every scrape; written
# whole and renamed into place, readable by the gateway's user.
record() {
    local result=$1 message=$2 tmp
    # One line, bounded: it ends up in `check` output and the journal.
    message=$(printf '%s' "$message" | tr '\n\r' '  ' | cut -c1-400)
    if tmp=$(mktemp "$dir/.service-tags-status.XXXXXX"); then
        printf 'result=%s\nfinished=%s\nmessage=%s\n' "$result" "$(date +%s)" "$message" >"$tmp"
        chmod 0644 "$tmp"
        mv -f -- "$tmp" "$tags.status"
    fi
    echo "refresh-service-tags: $result: $message" >&2
}

fail() {
    record failure "$1"
    exit 1
}

[[ -d $dir ]] || { echo "refresh-service-tags: no folder $dir" >&2; exit 1; }
[[ -n $region ]] || fail "PORTCULLIS_REGION is not set (put PORTCULLIS_REGION=<region> in /etc/default/portcullis)"

new=$(mktemp "$dir/.service-tags.XXXXXX") || fail "cannot create a temporary file in $dir"
err=$(mktemp) || fail "cannot create a temporary file"
trap 'rm -f -- "$new" "$err"' EXIT

last_error() { tail -n 3 -- "$err" | tr '\n' ' '; }

# shellcheck disable=SC2086 # PORTCULLIS_AZ_LOGIN_ARGS is a list of words
az login --identity ${PORTCULLIS_AZ_LOGIN_ARGS:-} --output none 2>"$err" \
    || fail "az login --identity failed: $(last_error)"
az network list-service-tags --location "$region" --output json >"$new" 2>"$err" \
    || fail "az network list-service-tags --location $region failed: $(last_error)"

# The gateway's own check, with the new file in place of the old: a file it
# cannot parse, or one that breaks the config or its [[expect]] tests, is
# refused here and never reaches the gateway.
if ! out=$("$portcullis" check -c "$config" --service-tags "$new" 2>&1); then
    fail "the new file fails 'portcullis check': $(grep -m 3 -i -e error -e failed <<<"$out" | tr '\n' ' ')"
fi
loaded=$(sed -n 's/^service tags: .*(\(change number [0-9]*, cloud [^,]*, [0-9]* tags\).*/\1/p' <<<"$out")

chmod 0644 "$new"
mv -f -- "$new" "$tags" || fail "cannot replace $tags"
# shellcheck disable=SC2086 # PORTCULLIS_RELOAD is a command line
$reload 2>"$err" || fail "replaced $tags ($loaded), but the gateway reload failed: $(last_error)"
note=
if [[ -f $config ]] && ! grep -qF -- "$tags" "$config"; then
    note="; note: $config does not name $tags in [policy] service_tags, so the gateway does not use it"
fi
record success "replaced $tags ($loaded) and reloaded the gateway$note"

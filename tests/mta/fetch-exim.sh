#!/usr/bin/env bash
# Unpacks Debian's Exim (exim4-daemon-light, its config and base packages)
# into a private root for tests/mta_exim.rs, installs libidn12 (the one
# library it needs that a Postfix machine lacks) and creates the Debian-exim
# user the binary was built for. Idempotent: does nothing when all three are
# there.
#
# Why not apt-get install exim4: exim4-daemon-light and postfix both provide
# mail-transport-agent, so installing one removes the other, and the tests
# need Postfix too. The tests run this binary as root with -C on their own
# configuration, so nothing under /etc/exim4 is read.
#
# Why libidn12 is installed, not unpacked beside Exim: Exim re-executes
# itself (to deliver from the daemon, to send a bounce), at times after
# dropping to Debian-exim; the binary is setuid root, so the loader then
# runs in secure mode and ignores LD_LIBRARY_PATH. libidn12 is a plain
# library and does not conflict with Postfix.
#
# Usage: tests/mta/fetch-exim.sh [ROOT]   (default: target/exim-root, or
# $LMTP_TEST_EXIM_ROOT; the tests look in the same place)
set -euo pipefail
cd "$(dirname "$0")/../.."

root="${1:-${LMTP_TEST_EXIM_ROOT:-target/exim-root}}"
pkgs=(exim4-base exim4-config exim4-daemon-light)

if ! dpkg -s libidn12 >/dev/null 2>&1; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -qq --no-install-recommends libidn12 || {
        apt-get update -qq
        apt-get install -y -qq --no-install-recommends libidn12
    }
fi

# The user and group Debian's build names as its exim_user (compiled in: the
# binary refuses to start without them).
if ! getent group Debian-exim >/dev/null; then
    groupadd --system Debian-exim
fi
if ! getent passwd Debian-exim >/dev/null; then
    useradd --system --gid Debian-exim --home-dir /var/spool/exim4 \
        --no-create-home --shell /usr/sbin/nologin Debian-exim
fi

if [[ -x "$root/usr/sbin/exim4" && -e "$root/.complete" ]]; then
    exit 0
fi

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
# apt-get download writes into the current directory as _apt when it can
# (else it warns and downloads unsandboxed as root).
chmod 0755 "$tmp"
if getent passwd _apt >/dev/null; then
    chown _apt "$tmp"
fi
(cd "$tmp" && apt-get download -q "${pkgs[@]}") || {
    apt-get update -qq
    (cd "$tmp" && apt-get download -q "${pkgs[@]}")
}
rm -rf "$root.new"
mkdir -p "$root.new"
for deb in "$tmp"/*.deb; do
    dpkg -x "$deb" "$root.new"
done
touch "$root.new/.complete"
rm -rf "$root"
mv "$root.new" "$root"
# Proves the binary loads (libidn12, the user); -bV needs a configuration.
"$root/usr/sbin/exim4" -C /dev/null -bV 2>/dev/null | sed -n 1p

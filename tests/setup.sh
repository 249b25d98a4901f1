#!/usr/bin/env bash
# Installs what the tests need on a Debian machine with Rust, then returns.
# Idempotent and quick when everything is there (run as root; the package
# steps need network). The README's test command runs it before `cargo test`.
#   python3:   smtplib.LMTP clients (tests/python)
#   postfix:   smtp-source -L (tests/server_load.rs) and a real Postfix
#              delivering over LMTP (tests/mta_postfix.rs)
#   e2fsprogs: mkfs.ext4 for the real-ENOSPC and power-cut spool tests
#   gcc, libc6-dev: build bench/slow-sync's LD_PRELOAD shim, with which
#              tests/doctor_cli.rs gives doctor disks that flush in parallel
#              and one at a time (Rust links with cc, so usually present)
#   Exim:      unpacked into target/exim-root by tests/mta/fetch-exim.sh (it
#              cannot be installed beside Postfix: both are a
#              mail-transport-agent), plus libidn12 and the Debian-exim user
set -euo pipefail
cd "$(dirname "$0")/.."

need_pkgs=()
for p in python3 postfix e2fsprogs gcc libc6-dev; do
    dpkg -s "$p" >/dev/null 2>&1 || need_pkgs+=("$p")
done
if ((${#need_pkgs[@]})); then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${need_pkgs[@]}"
fi

bash tests/mta/fetch-exim.sh >/dev/null

#!/usr/bin/env bash
# bench/slow-sync.sh: throughput and latency against the disk's flush time,
# for disks slower than the one at hand. Every fdatasync/fsync of the server
# is made SLOW_SYNC_US longer by an LD_PRELOAD shim (bench/slow-sync/slowsync.c:
# the real call, then a sleep that uses no CPU, as a device's flush would), so
# one machine can show what group commit does on a consumer SSD (a few ms), a
# cloud volume (1-2 ms) or a spinning disk (10 ms).
#
# Usage (from the repository root, after `cargo build --release`):
#   bench/slow-sync.sh
# Knobs (environment): DELAYS_US ("0 500 1000 2000 5000 10000"),
#   CONNECTIONS ("1 16 64 256"), SECONDS_EACH (4), SIZE (4096), CHUNKING (off),
#   PORT (2499), BIN (target/release/lmtp-ingest), WORK (bench-out/slow-sync),
#   SERVER_ARGS (more `serve` flags, e.g. "--writers 2"), SERIAL (0).
#
# The sleeps of two syncs in flight at once overlap, as on a device that
# flushes several queues in parallel (cloud volumes, many NVMe drives). With
# SERIAL=1 they take turns, as on a disk that flushes one request at a time
# (a spinning disk, some SATA SSDs): run both to bracket what more than one
# writer does (`lmtp-ingest doctor` measures which kind the spool's disk is).
#
# Prints one line per run and a table of messages/s (delay x connections),
# with the spool's mean batch (messages per fdatasync) and the p99 from the
# final dot to the last reply; WORK/results.tsv has every field.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
DELAYS_US=${DELAYS_US:-0 500 1000 2000 5000 10000}
CONNECTIONS=${CONNECTIONS:-1 16 64 256}
SECONDS_EACH=${SECONDS_EACH:-4}; SIZE=${SIZE:-4096}; CHUNKING=${CHUNKING:-off}
PORT=${PORT:-2499}; BIN=${BIN:-$ROOT/target/release/lmtp-ingest}
WORK=${WORK:-$ROOT/bench-out/slow-sync}
[ -x "$BIN" ] || { echo "slow-sync.sh: $BIN is missing: cargo build --release" >&2; exit 1; }
command -v cc >/dev/null || { echo "slow-sync.sh: needs a C compiler (apt-get install gcc)" >&2; exit 1; }
mkdir -p "$WORK"
SHIM=$WORK/slowsync.so
SERIAL=${SERIAL:-0}
cc -O2 -Wall -shared -fPIC -o "$SHIM" "$ROOT/bench/slow-sync/slowsync.c" -ldl -lpthread
results=$WORK/results.tsv
printf 'delay_us\tconnections\tmsgs_per_s\tp50_us\tp99_us\tbatch_mean\tsync_mean_us\n' >"$results"

server=""
stop_server() { [ -n "$server" ] && kill "$server" 2>/dev/null && wait "$server" 2>/dev/null; server=""; }
trap stop_server EXIT

for delay in $DELAYS_US; do
    for conns in $CONNECTIONS; do
        rm -rf "$WORK/spool"
        # shellcheck disable=SC2086  # SERVER_ARGS is a list of flags
        LD_PRELOAD=$SHIM SLOW_SYNC_US=$delay SLOW_SYNC_SERIAL=$SERIAL "$BIN" serve --spool "$WORK/spool" \
            --listen "127.0.0.1:$PORT" ${SERVER_ARGS:-} 2>"$WORK/server.log" &
        server=$!
        for _ in $(seq 200); do
            grep -q "lmtp-ingest ready" "$WORK/server.log" 2>/dev/null && break
            sleep 0.05
        done
        # Wait for the next segment's zero-fill, as bench/alternate-load.sh does.
        for _ in $(seq 200); do
            grep -q "^spool-prep" /proc/"$server"/task/*/comm 2>/dev/null || break
            sleep 0.05
        done
        json=$("$BIN" load --target "127.0.0.1:$PORT" --connections "$conns" \
            --chunking "$CHUNKING" --size "$SIZE" --duration "$SECONDS_EACH" --json)
        stop_server
        stats=$(grep -o 'SpoolStats {[^}]*}' "$WORK/server.log" | tail -1)
        field() { sed -n "s/.*$1: \([0-9]*\).*/\1/p" <<<"$stats"; }
        batches=$(field batches); committed=$(field messages_committed)
        fsyncs=$(field fsyncs); fsync_ns=$(field fsync_ns_total)
        line=$(python3 -c '
import json, sys
j = json.loads(sys.argv[1])
d, c, b, m, f, ns = sys.argv[2:8]
batch = int(m) / max(int(b), 1)
sync = int(ns) / max(int(f), 1) / 1000
rate, lat = j["messages_per_s"], j["latency_us"]
print("\t".join([d, c, f"{rate:.0f}", str(lat["p50"]), str(lat["p99"]), f"{batch:.1f}", f"{sync:.0f}"]))
' "$json" "$delay" "$conns" "$batches" "$committed" "$fsyncs" "$fsync_ns")
        echo "$line" | tee -a "$results"
    done
done

echo
python3 - "$results" <<'EOF'
import csv, sys
rows = list(csv.DictReader(open(sys.argv[1]), delimiter="\t"))
conns = sorted({int(r["connections"]) for r in rows})
delays = sorted({int(r["delay_us"]) for r in rows})
print("| added to each fdatasync | mean fdatasync | " + " | ".join(f"{c} conn." for c in conns) + " |")
print("|---:|---:|" + "---:|" * len(conns))
for d in delays:
    cells, sync = [], ""
    for c in conns:
        r = next(x for x in rows if int(x["delay_us"]) == d and int(x["connections"]) == c)
        sync = sync or f'{int(r["sync_mean_us"]):,} µs'
        cells.append(f'{int(r["msgs_per_s"]):,} msg/s, batch {r["batch_mean"]}, p99 {int(r["p99_us"]) / 1000:.1f} ms')
    print(f"| {d:,} µs | {sync} | " + " | ".join(cells) + " |")
EOF

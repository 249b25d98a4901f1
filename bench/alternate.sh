#!/usr/bin/env bash
# bench/alternate.sh: builds or settings of lmtp-ingest against each other and
# against Postfix's smtp-sink, loaded by Postfix's smtp-source in lock-step,
# alternated round by round so that a noisy machine affects all alike.
#
# Usage (from the repository root; needs postfix's smtp-source/smtp-sink):
#   bench/alternate.sh [TARGET ...]
# TARGET is `sink` or `LABEL=BINARY[ ARGS...]`, e.g.
#   bench/alternate.sh sink new=target/release/lmtp-ingest \
#       "nopoll=target/release/lmtp-ingest --config nopoll.toml"
# With no TARGET: `sink` and `ours=target/release/lmtp-ingest`. A target whose
# ARGS name `--spool DIR` runs on a fresh DIR/alternate-run instead, e.g.
#   "tmpfs=target/release/lmtp-ingest --spool /dev/shm --config tmpfs.toml"
# with `[spool] allow_tmpfs = true` in tmpfs.toml: the server without a disk.
# Knobs (environment): ROUNDS (5), SESSIONS (16), RCPTS (1), MSGS (30000),
#   SIZE (4096), PORT (2498), WORK (bench-out/alternate), REUSE (1: every
#   session keeps its connection, `smtp-source -d`; 0: a new connection, greeting
#   and LHLO for every message, as from an MTA that caches no connections),
#   PREP_WAIT (1: start the load once the server's start-up segment preparation
#   has ended; 0: at once, as before 2026-12-05).
#
# Prints one line per run: messages/s, the server's CPU per message (all its
# threads, from /proc/PID/stat), and for lmtp-ingest the spool's mean batch
# and fdatasync; then, per target, the median messages/s and the median of
# its per-round ratio to `sink` (when sink runs). Each run gets a fresh spool
# on the disk under WORK and starts after `sync` and a short rest.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
# shellcheck source=bench/lib.sh
. "$ROOT/bench/lib.sh"
ROUNDS=${ROUNDS:-5}; SESSIONS=${SESSIONS:-16}; RCPTS=${RCPTS:-1}; MSGS=${MSGS:-30000}
SIZE=${SIZE:-4096}; PORT=${PORT:-2498}; WORK=${WORK:-$ROOT/bench-out/alternate}
REUSE=${REUSE:-1}
case $REUSE in
  1) reuse=(-d) ;; 0) reuse=() ;;
  *) echo "alternate.sh: REUSE is 1 (keep connections) or 0 (one per message), not '$REUSE'" >&2; exit 1 ;;
esac
[ $# -gt 0 ] || set -- sink "ours=$ROOT/target/release/lmtp-ingest"
for t in /usr/sbin/smtp-source /usr/sbin/smtp-sink; do
  [ -x "$t" ] || { echo "alternate.sh: $t is missing: apt-get install postfix" >&2; exit 1; }
done
mkdir -p "$WORK"
results=$WORK/results.tsv
: >"$results"

run_one() {  # round label spec
  local round=$1 label=$2 spec=$3 dir=$WORK/run pid own=""
  rm -rf "$dir"; mkdir -p "$dir"; sync; sleep 2
  if [ "$spec" = sink ]; then
    /usr/sbin/smtp-sink -u postfix -L "127.0.0.1:$PORT" 1024 >"$dir/server.log" 2>&1 &
  else
    local bin=${spec%% *} args="" spool=(--spool "$dir/spool")
    [ "$bin" = "$spec" ] || args=${spec#* }
    # A target that names a spool place (`--spool DIR`, e.g. on tmpfs) runs
    # on a fresh DIR/alternate-run; only that subdirectory is ever removed
    # (before the run and after it: on tmpfs it holds memory).
    own=$(sed -n 's/.*--spool \([^ ]*\).*/\1/p' <<<"$args")
    if [ -n "$own" ]; then
      [ -d "$own" ] || { echo "alternate.sh: $label: --spool $own is not a directory" >&2; exit 1; }
      args=$(sed 's/--spool [^ ]*//' <<<"$args")
      rm -rf "$own/alternate-run"; spool=(--spool "$own/alternate-run")
    fi
    # shellcheck disable=SC2086 # ARGS are split on purpose
    "$bin" serve --listen "127.0.0.1:$PORT" "${spool[@]}" $args >"$dir/server.log" 2>&1 &
  fi
  pid=$!
  sleep 0.7
  kill -0 "$pid" 2>/dev/null || { echo "alternate.sh: $label did not start:" >&2; cat "$dir/server.log" >&2; exit 1; }
  # Unless PREP_WAIT=0: the start-up segment preparation (bench/lib.sh).
  if [ "$spec" != sink ] && [ "${PREP_WAIT:-1}" = 1 ]; then
    wait_spool_prep "$pid"
  fi
  local c0 c1 t0 t1
  c0=$(awk '{print $14+$15}' "/proc/$pid/stat")
  t0=$(date +%s.%N)
  timeout 300 /usr/sbin/smtp-source -L "${reuse[@]}" -s "$SESSIONS" -m "$MSGS" -r "$RCPTS" -l "$SIZE" \
    -M alternate.local -f sender@example.com -t user@example.com "127.0.0.1:$PORT"
  t1=$(date +%s.%N)
  c1=$(awk '{print $14+$15}' "/proc/$pid/stat")
  kill "$pid"; wait "$pid" || true
  [ -z "$own" ] || rm -rf "$own/alternate-run"
  # lmtp-ingest logs its spool's totals when it stops.
  local batches syncs sync_ns
  batches=$(grep -o 'batches: [0-9]*' "$dir/server.log" | grep -o '[0-9]*' | tail -1 || true)
  syncs=$(grep -o 'fsyncs: [0-9]*' "$dir/server.log" | grep -o '[0-9]*' | tail -1 || true)
  sync_ns=$(grep -o 'fsync_ns_total: [0-9]*' "$dir/server.log" | grep -o '[0-9]*' | tail -1 || true)
  python3 - "$round" "$label" "$MSGS" "$t0" "$t1" "$c0" "$c1" "${batches:-0}" "${syncs:-0}" "${sync_ns:-0}" <<'EOF' | tee -a "$results"
import sys
r, label, msgs, t0, t1, c0, c1, b, s, ns = sys.argv[1:]
msgs, secs, cpu = int(msgs), float(t1) - float(t0), (int(c1) - int(c0)) / 100
b, s, ns = int(b), int(s), int(ns)
extra = f"\t{msgs / b:.1f}\t{ns / s / 1000:.0f}" if b and s else "\t-\t-"
print(f"{r}\t{label}\t{msgs / secs:.0f}\t{cpu / msgs * 1e6:.1f}{extra}")
EOF
}

echo -e "round\ttarget\tmsg/s\tserver_cpu_us_per_msg\tbatch\tfdatasync_us"
for round in $(seq "$ROUNDS"); do
  for t in "$@"; do
    if [ "$t" = sink ]; then run_one "$round" sink sink; else run_one "$round" "${t%%=*}" "${t#*=}"; fi
  done
done

python3 - "$results" <<'EOF'
import statistics, sys
rows = [l.rstrip("\n").split("\t") for l in open(sys.argv[1]) if l.strip()]
by = {}
for r, label, rate, *_ in rows:
    by.setdefault(label, {})[r] = float(rate)
print("\ntarget\tmedian msg/s\tmedian ratio to sink (per round)")
for label, runs in by.items():
    ratio = "-"
    if "sink" in by and label != "sink":
        rs = [runs[r] / by["sink"][r] for r in runs if r in by["sink"]]
        ratio = f"{statistics.median(rs):.2f} (rounds: {', '.join(f'{x:.2f}' for x in rs)})"
    print(f"{label}\t{statistics.median(runs.values()):.0f}\t{ratio}")
EOF

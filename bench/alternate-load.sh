#!/usr/bin/env bash
# bench/alternate-load.sh: builds or settings of lmtp-ingest against each
# other under our own pipelined load generator, alternated round by round so
# that a noisy machine affects all alike (bench/alternate.sh does the same
# with Postfix's smtp-source and smtp-sink).
#
# Usage (from the repository root):
#   bench/alternate-load.sh LABEL=BINARY[ ARGS...] ...
# e.g.
#   bench/alternate-load.sh before=bench-out/bin-before after=target/release/lmtp-ingest \
#       "w2=target/release/lmtp-ingest --config w2.toml"
# With no target: `ours=target/release/lmtp-ingest`. What follows ` -- ` in a
# target goes to the load generator instead of the server, so that client
# styles alternate too, e.g.
#   bench/alternate-load.sh data=target/release/lmtp-ingest \
#       "bdat=target/release/lmtp-ingest -- --chunking on"
# Knobs (environment): ROUNDS (3), CONNECTIONS (64), RCPTS (1), MSGS (200000),
#   SIZE (4096), PORT (2497), LOAD (the generator: target/release/lmtp-ingest),
#   WORK (bench-out/alternate-load).
#
# Each run starts the server on a fresh spool under WORK, waits until its
# spool has prepared its next segment (no `spool-prep` thread left: that
# zero-fill would otherwise land in the first run's numbers only), then runs
# `LOAD load --target ... --connections C --recipients R --messages M --size S
# --json`. Prints one line per run: messages/s, p99 from the final dot to the
# last reply, the server's CPU per message (all threads, /proc/PID/stat) and
# its spool writers' share, the spool's largest fdatasync, and the generator's
# own CPU per message (with GNU time, Debian package `time`); then per target
# the medians.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
# shellcheck source=bench/lib.sh
. "$ROOT/bench/lib.sh"
ROUNDS=${ROUNDS:-3}; CONNECTIONS=${CONNECTIONS:-64}; RCPTS=${RCPTS:-1}
MSGS=${MSGS:-200000}; SIZE=${SIZE:-4096}; PORT=${PORT:-2497}
LOAD=${LOAD:-$ROOT/target/release/lmtp-ingest}
WORK=${WORK:-$ROOT/bench-out/alternate-load}
[ $# -gt 0 ] || set -- "ours=$ROOT/target/release/lmtp-ingest"
[ -x "$LOAD" ] || { echo "alternate-load.sh: $LOAD is missing: cargo build --release" >&2; exit 1; }
mkdir -p "$WORK"
results=$WORK/results.tsv
: >"$results"

ticks() {  # pid [thread-name-prefix]: CPU ticks of the process or of its matching threads
  if [ -z "${2:-}" ]; then awk '{print $14+$15}' "/proc/$1/stat"; return; fi
  local sum=0 t
  for t in /proc/"$1"/task/*; do
    case "$(cat "$t/comm" 2>/dev/null)" in
      "$2"*) sum=$((sum + $(awk '{print $14+$15}' "$t/stat" 2>/dev/null || echo 0))) ;;
    esac
  done
  echo "$sum"
}

run_one() {  # round label spec
  local round=$1 label=$2 spec=$3 dir=$WORK/run pid
  local load_args=""
  case "$spec" in *" -- "*) load_args=${spec#* -- }; spec=${spec%% -- *} ;; esac
  local bin=${spec%% *} args=""
  [ "$bin" = "$spec" ] || args=${spec#* }
  rm -rf "$dir"; mkdir -p "$dir"; sync; sleep 1
  # shellcheck disable=SC2086 # ARGS are split on purpose
  "$bin" serve --listen "127.0.0.1:$PORT" --spool "$dir/spool" $args >"$dir/server.log" 2>&1 &
  pid=$!
  wait_listening "$pid" "$PORT" "alternate-load.sh: $label" "$dir/server.log"
  wait_spool_prep "$pid"
  local c0 w0 c1 w1 out timer=()
  # The generator's own CPU, where GNU time is installed (Debian: time).
  rm -f "$dir/load.time"
  [ -x /usr/bin/time ] && timer=(/usr/bin/time -f '%U %S' -o "$dir/load.time")
  c0=$(ticks "$pid"); w0=$(ticks "$pid" spool-writer)
  # shellcheck disable=SC2086 # the generator's arguments are split on purpose
  out=$("${timer[@]}" "$LOAD" load --target "127.0.0.1:$PORT" --connections "$CONNECTIONS" \
    --recipients "$RCPTS" --messages "$MSGS" --size "$SIZE" --json $load_args) || {
    echo "alternate-load.sh: $label: the load generator failed" >&2; kill "$pid"; exit 1; }
  c1=$(ticks "$pid"); w1=$(ticks "$pid" spool-writer)
  kill "$pid"; wait "$pid" || true
  local fmax
  fmax=$(grep -o 'fsync_ns_max: [0-9]*' "$dir/server.log" | grep -o '[0-9]*' | tail -1 || true)
  local lcpu=nan
  [ -s "$dir/load.time" ] && lcpu=$(awk -v m="$MSGS" '{printf "%.2f", ($1 + $2) * 1e6 / m}' "$dir/load.time")
  python3 - "$round" "$label" "$MSGS" "$c0" "$c1" "$w0" "$w1" "${fmax:-0}" "$lcpu" "$out" <<'EOF' | tee -a "$results"
import json, sys
r, label, msgs, c0, c1, w0, w1, fmax, lcpu, out = sys.argv[1:]
j, msgs = json.loads(out), int(msgs)
tick_us = 1e6 / 100  # /proc/PID/stat counts clock ticks of 10 ms
per = lambda a, b: (int(b) - int(a)) * tick_us / msgs
print(f"{r}\t{label}\t{j['messages_per_s']:.0f}\t{j['latency_us']['p99'] / 1000:.2f}"
      f"\t{per(c0, c1):.2f}\t{per(w0, w1):.2f}\t{int(fmax) / 1e6:.2f}\t{lcpu}")
EOF
}

echo -e "round\ttarget\tmsg/s\tp99_ms\tserver_cpu_us_per_msg\twriter_cpu_us_per_msg\tfdatasync_max_ms\tload_cpu_us_per_msg"
for round in $(seq "$ROUNDS"); do
  for t in "$@"; do run_one "$round" "${t%%=*}" "${t#*=}"; done
done

python3 - "$results" <<'EOF'
import statistics, sys
rows = [l.rstrip("\n").split("\t") for l in open(sys.argv[1]) if l.strip()]
by = {}
for r, label, *vals in rows:
    by.setdefault(label, []).append([float(v) for v in vals])
print("\ntarget\tmedian msg/s\tp99_ms\tserver_cpu_us\twriter_cpu_us\tfdatasync_max_ms\tload_cpu_us")
for label, runs in by.items():
    med = [statistics.median(col) for col in zip(*runs)]
    print(f"{label}\t{med[0]:.0f}\t{med[1]:.2f}\t{med[2]:.2f}\t{med[3]:.2f}\t{med[4]:.2f}\t{med[5]:.2f}")
EOF

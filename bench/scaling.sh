#!/usr/bin/env bash
# bench/scaling.sh: durable messages/s against shard count, with the server and
# the load generator on separate CPUs, so that each shard count is measured
# without the generator taking the shards' CPUs.
#
# Usage (from the repository root, after `cargo build --release`):
#   bench/scaling.sh [SHARDS ...]
# With no SHARDS: 1 2 4 8 ... up to half the CPUs (`nproc`), the other half
# running the generator. For N shards the server runs under `taskset` on CPUs
# 0..N-1 (its shards pinned one per CPU, writers and helpers on the same CPUs)
# and the generator on CPUs N..nproc-1. A count that leaves the generator no
# CPU of its own runs unseparated, and the line says so.
#
# Knobs (environment): ROUNDS (2), CONN_PER_SHARD (64: connections grow with
#   the shards so that each has the same work in flight), CONNECTIONS (fixed
#   count instead), MSGS (300000), SIZE (4096), RCPTS (1), CHUNKING (off|on),
#   WRITERS (spool writers; default: the server's default), BIN
#   (target/release/lmtp-ingest), PORT (2493), WORK (bench-out/scaling; the
#   spool goes there, so put WORK on the disk under test).
#
# Needs only the binary, taskset (util-linux) and ss (iproute2); no Python, so
# it runs on a bare machine the binary was copied to.
#
# Prints one line per run: shards, writers, connections, messages/s, p99 from
# the final dot to the last reply (ms), the server's CPU per message (µs, all
# its threads) and how busy its CPUs were (100% = all N CPUs), then the best
# round per shard count and its speed-up over the first count.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
# shellcheck source=bench/lib.sh
. "$ROOT/bench/lib.sh"
ROUNDS=${ROUNDS:-2}; CONN_PER_SHARD=${CONN_PER_SHARD:-64}; MSGS=${MSGS:-300000}
SIZE=${SIZE:-4096}; RCPTS=${RCPTS:-1}; CHUNKING=${CHUNKING:-off}; PORT=${PORT:-2493}
BIN=${BIN:-$ROOT/target/release/lmtp-ingest}; WORK=${WORK:-$ROOT/bench-out/scaling}
CPUS=$(nproc)
[ -x "$BIN" ] || { echo "scaling.sh: $BIN is missing: cargo build --release" >&2; exit 1; }
for t in taskset ss; do
  command -v "$t" >/dev/null || { echo "scaling.sh: $t is missing (Debian: util-linux, iproute2)" >&2; exit 1; }
done
case $CHUNKING in on|off) ;; *) echo "scaling.sh: CHUNKING is on or off, not '$CHUNKING'" >&2; exit 1 ;; esac
if [ $# -eq 0 ]; then
  n=1; set --
  while [ $((n * 2)) -le "$CPUS" ] || [ $n -eq 1 ]; do set -- "$@" $n; n=$((n * 2)); done
fi
for n in "$@"; do
  if ! [[ $n =~ ^[0-9]+$ ]] || [ "$n" -lt 1 ] || [ "$n" -gt "$CPUS" ]; then
    echo "scaling.sh: shard count '$n' must be 1 to $CPUS (nproc)" >&2; exit 1
  fi
done
mkdir -p "$WORK"
results=$WORK/results.tsv
: >"$results"
CLK=$(getconf CLK_TCK)

run_one() {  # round shards
  local round=$1 n=$2 dir=$WORK/run pid conns server_cpus gen=() note=""
  conns=${CONNECTIONS:-$((CONN_PER_SHARD * n))}
  server_cpus="0-$((n - 1))"
  if [ "$n" -lt "$CPUS" ]; then
    gen=(taskset -c "$n-$((CPUS - 1))")
  else
    note=" (generator shares the server's CPUs)"
  fi
  local writers=()
  [ -n "${WRITERS:-}" ] && writers=(--writers "$WRITERS")
  rm -rf "$dir"; mkdir -p "$dir"; sync; sleep 1
  taskset -c "$server_cpus" "$BIN" serve --listen "127.0.0.1:$PORT" --spool "$dir/spool" \
    --shards "$n" "${writers[@]}" >"$dir/server.log" 2>&1 &
  pid=$!
  wait_listening "$pid" "$PORT" "scaling.sh: the server" "$dir/server.log"
  wait_spool_prep "$pid"
  local c0 c1 t0 t1 out mps p99
  c0=$(awk '{print $14+$15}' "/proc/$pid/stat"); t0=$(date +%s.%N)
  out=$("${gen[@]}" "$BIN" load --target "127.0.0.1:$PORT" --connections "$conns" \
    --recipients "$RCPTS" --messages "$MSGS" --size "$SIZE" --chunking "$CHUNKING" --json) || {
    echo "scaling.sh: the load generator failed: $out" >&2; kill "$pid"; exit 1; }
  t1=$(date +%s.%N); c1=$(awk '{print $14+$15}' "/proc/$pid/stat")
  local wn
  wn=$(grep -c '^spool-writer' /proc/"$pid"/task/*/comm 2>/dev/null | awk -F: '{s+=$2} END {print s+0}')
  kill "$pid"; wait "$pid" || true
  mps=$(grep -o '"messages_per_s":[0-9.]*' <<<"$out" | head -1 | cut -d: -f2)
  p99=$(grep -o '"p99":[0-9]*' <<<"$out" | head -1 | cut -d: -f2)
  awk -v r="$round" -v n="$n" -v w="$wn" -v c="$conns" -v mps="$mps" -v p99="$p99" \
      -v ticks=$((c1 - c0)) -v clk="$CLK" -v msgs="$MSGS" -v t0="$t0" -v t1="$t1" -v note="$note" \
    'BEGIN { cpu_s = ticks / clk; wall = t1 - t0;
             printf "%s\t%s\t%s\t%s\t%.0f\t%.2f\t%.2f\t%.0f%s\n", r, n, w, c, mps, p99 / 1000,
               cpu_s * 1e6 / msgs, cpu_s / wall / n * 100, note }' | tee -a "$results"
}

echo "# $(nproc) CPUs; $MSGS messages of $SIZE bytes, $RCPTS recipient(s), chunking $CHUNKING; $(date -u +%FT%TZ)"
echo -e "round\tshards\twriters\tconnections\tmsg/s\tp99_ms\tserver_cpu_us_per_msg\tserver_cpus_busy_pct"
for round in $(seq "$ROUNDS"); do
  for n in "$@"; do run_one "$round" "$n"; done
done

echo -e "\nshards\tbest msg/s\tspeed-up"
awk -F'\t' '{ if ($5 > best[$2]) best[$2] = $5; if (!($2 in seen)) { seen[$2] = 1; order[++k] = $2 } }
  END { for (i = 1; i <= k; i++) { n = order[i]; if (i == 1) base = best[n];
        printf "%s\t%.0f\t%.2f\n", n, best[n], best[n] / base } }' "$results"

#!/usr/bin/env bash
# bench/soak.sh: a long, mixed, rate-limited load against one server, with a
# follower consuming the spool and retention removing what it has read, that
# ends by itself and then checks that nothing acknowledged was lost and that
# nothing grew without bound. Outside the test command (it runs for minutes).
#
# Usage (from the repository root, after `cargo build --release`):
#   bench/soak.sh
# Knobs (environment): DURATION (600 s), RATE (2000 msg/s from the pipelined
#   generator), PORT (2498), METRICS_PORT (9498), BIN (target/release/lmtp-ingest),
#   WORK (bench-out/soak), CHURN (1: also Postfix's smtp-source, a connection
#   per message, when installed), SPOOL_CAP (8 GiB), SLOW_SYNC_US (0: else
#   every fdatasync of the server takes that much longer, through
#   bench/slow-sync/slowsync.c, as on a slow disk; needs a C compiler),
#   SERVER_ARGS (more `serve` flags, e.g. "--io epoll" or "--writers 2").
#
# The load, all at once for DURATION seconds:
#   - `lmtp-ingest load`: 64 pipelined connections, DATA, 1 recipient, sizes
#     2 KiB (50%), 8 KiB (35%), 64 KiB (14%), 512 KiB (1%), open loop at RATE;
#   - `lmtp-ingest load`: 8 connections, BDAT, 20 recipients, 4 KiB, RATE/10;
#   - smtp-source -L, one session, a new connection for every message, 4 KiB,
#     in runs of 500 messages a second apart (CHURN=1);
#   - `lmtp-ingest spool follow` as consumer "soak", restarted once half way
#     (its saved position must carry it on), with 16 MiB segments so that
#     retention removes segments all through the run.
# Every 10 s it samples the server's RSS, threads, open descriptors and the
# spool's size into WORK/samples.tsv.
#
# Checks, each printed PASS or FAIL (exit 1 on any FAIL):
#   - every generator run exits 0 (no refusal, no protocol error);
#   - messages the clients had acknowledged = messages the server committed
#     (its stop line) = distinct queue ids the follower read;
#   - delivery-log lines with status=sent = recipients acknowledged;
#   - `spool verify` passes;
#   - the RSS at the end is at most 1.5 times (plus 16 MiB) the RSS a quarter
#     of the way in, and the open descriptors return to within 16 of the
#     count before the load.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
DURATION=${DURATION:-600}; RATE=${RATE:-2000}; PORT=${PORT:-2498}
METRICS_PORT=${METRICS_PORT:-9498}; BIN=${BIN:-$ROOT/target/release/lmtp-ingest}
WORK=${WORK:-$ROOT/bench-out/soak}; CHURN=${CHURN:-1}
SPOOL_CAP=${SPOOL_CAP:-8589934592}
[ -x "$BIN" ] || { echo "soak.sh: $BIN is missing: cargo build --release" >&2; exit 1; }
if [ "$CHURN" = 1 ] && ! command -v smtp-source >/dev/null; then
    echo "soak.sh: smtp-source not found (apt-get install postfix), running without it" >&2
    CHURN=0
fi
rm -rf "$WORK"; mkdir -p "$WORK"
SLOW_SYNC_US=${SLOW_SYNC_US:-0}
preload=""
if [ "$SLOW_SYNC_US" != 0 ]; then
    cc -O2 -Wall -shared -fPIC -o "$WORK/slowsync.so" "$ROOT/bench/slow-sync/slowsync.c" -ldl -lpthread
    preload=$WORK/slowsync.so
fi
SPOOL=$WORK/spool
cat >"$WORK/soak.toml" <<EOF
[server]
listen = ["127.0.0.1:$PORT"]
[spool]
dir = "$SPOOL"
segment_bytes = 16777216
spool_bytes_max = $SPOOL_CAP
[log]
level = "info"
[metrics]
listen = "127.0.0.1:$METRICS_PORT"
EOF

pids=()
# shellcheck disable=SC2317  # called by the trap
cleanup() {
    pkill -f "consumer soak" 2>/dev/null || true
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
}
trap cleanup EXIT

# shellcheck disable=SC2086  # SERVER_ARGS is a list of flags
LD_PRELOAD=$preload SLOW_SYNC_US=$SLOW_SYNC_US "$BIN" serve --config "$WORK/soak.toml" ${SERVER_ARGS:-} 2>"$WORK/server.log" &
server=$!; pids+=("$server")
for _ in $(seq 100); do
    "$BIN" load --target "127.0.0.1:$PORT" --connections 1 --messages 1 >/dev/null 2>&1 && break
    sleep 0.1
done
kill -0 "$server" || { echo "soak.sh: the server did not start; see $WORK/server.log" >&2; exit 1; }
fds() { find "/proc/$1/fd" -mindepth 1 -maxdepth 1 2>/dev/null | wc -l; }
fds_before=$(fds "$server")
warm_acked=1  # the start-up probe above

# The follower's JSON lines start {"id":"<26 characters>": keep the ids.
start_follow() {
    "$BIN" spool follow --spool "$SPOOL" --consumer soak --poll-ms 20 \
        | cut -c8-33 >>"$WORK/followed.ids" &
    follower=$!
}
stop_follow() { pkill -f "consumer soak" 2>/dev/null || true; wait "$follower" 2>/dev/null || true; }
start_follow

sample() {
    local t=0
    printf 't_s\trss_kib\tthreads\tfds\tspool_mib\n' >"$WORK/samples.tsv"
    while kill -0 "$server" 2>/dev/null; do
        printf '%s\t%s\t%s\t%s\t%s\n' "$t" \
            "$(awk '/^VmRSS/ {print $2}' "/proc/$server/status" 2>/dev/null || echo -)" \
            "$(awk '/^Threads/ {print $2}' "/proc/$server/status" 2>/dev/null || echo -)" \
            "$(fds "$server")" \
            "$(du -sm "$SPOOL" 2>/dev/null | cut -f1)" >>"$WORK/samples.tsv"
        sleep 10; t=$((t + 10))
    done
}
sample & sampler=$!; pids+=("$sampler")

echo "soak: ${DURATION}s$([ "$SLOW_SYNC_US" != 0 ] && echo ", every fdatasync ${SLOW_SYNC_US} µs longer")${SERVER_ARGS:+, serve $SERVER_ARGS}, $RATE msg/s pipelined + $((RATE / 10)) msg/s x 20 rcpts BDAT$([ "$CHURN" = 1 ] && echo " + smtp-source churn"); work in $WORK"
"$BIN" load --target "127.0.0.1:$PORT" --connections 64 --pipelining on --recipients 1 \
    --size-dist "2048:50,8192:35,65536:14,524288:1" --rate "$RATE" --duration "$DURATION" \
    --json >"$WORK/load-a.json" 2>"$WORK/load-a.err" & gen_a=$!; pids+=("$gen_a")
"$BIN" load --target "127.0.0.1:$PORT" --connections 8 --chunking on --recipients 20 \
    --size 4096 --rate "$((RATE / 10))" --duration "$DURATION" \
    --json >"$WORK/load-b.json" 2>"$WORK/load-b.err" & gen_b=$!; pids+=("$gen_b")
churn() {
    local end=$((SECONDS + DURATION)) sent=0 failed=0
    while [ "$SECONDS" -lt "$end" ]; do
        if smtp-source -L -s 1 -m 500 -l 4096 -f soak@example.com -t churn@example.com \
            "127.0.0.1:$PORT" >>"$WORK/churn.log" 2>&1; then
            sent=$((sent + 500))
        else
            failed=$((failed + 1))
        fi
        sleep 1
    done
    echo "$sent $failed" >"$WORK/churn.count"
}
if [ "$CHURN" = 1 ]; then churn & gen_c=$!; pids+=("$gen_c"); fi

sleep "$((DURATION / 2))"
stop_follow
start_follow

fail=0
check() {  # name condition-exit-status detail
    if [ "$2" = 0 ]; then echo "PASS $1: $3"; else echo "FAIL $1: $3"; fail=1; fi
}
rc_a=0; wait "$gen_a" || rc_a=$?
rc_b=0; wait "$gen_b" || rc_b=$?
churn_sent=0; churn_failed=0
if [ "$CHURN" = 1 ]; then wait "$gen_c" || true; read -r churn_sent churn_failed <"$WORK/churn.count"; fi
sleep 1
fds_after=$(fds "$server")
kill -TERM "$server"; wait "$server" || true
stop_follow
kill "$sampler" 2>/dev/null || true
# What the follower had not read yet (the server is stopped; the spool stays).
"$BIN" spool follow --spool "$SPOOL" --consumer soak --exit-when-idle | cut -c8-33 >>"$WORK/followed.ids"

num() { python3 -c "import json,sys; print(json.load(open(sys.argv[1]))[sys.argv[2]])" "$1" "$2"; }
a_msgs=$(num "$WORK/load-a.json" messages); a_failed=$(num "$WORK/load-a.json" messages_failed)
b_msgs=$(num "$WORK/load-b.json" messages); b_failed=$(num "$WORK/load-b.json" messages_failed)
a_ok=$((a_msgs - a_failed)); b_ok=$((b_msgs - b_failed))
acked=$((a_ok + b_ok + churn_sent + warm_acked))
acked_rcpts=$((a_ok + 20 * b_ok + churn_sent + warm_acked))
committed=$(grep -o 'messages_committed: [0-9]*' "$WORK/server.log" | tail -1 | awk '{print $2}')
followed=$(sort -u "$WORK/followed.ids" | wc -l)
followed_lines=$(wc -l <"$WORK/followed.ids")
sent_lines=$(grep -c 'status=sent' "$WORK/server.log" || true)

echo
echo "pipelined: $a_ok messages ($(num "$WORK/load-a.json" messages_per_s) msg/s, p99 $(python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['latency_us']['p99'])" "$WORK/load-a.json") µs)"
echo "BDAT x 20: $b_ok messages"
[ "$CHURN" = 1 ] && echo "smtp-source: $churn_sent messages in runs of 500 ($churn_failed runs failed)"
check "generators" "$(( rc_a + rc_b + churn_failed ))" "load exit $rc_a and $rc_b, smtp-source runs failed $churn_failed"
check "acknowledged = committed" "$([ "$acked" = "$committed" ]; echo $?)" "$acked acknowledged, $committed committed"
check "committed = followed" "$([ "$committed" = "$followed" ]; echo $?)" "$followed distinct ids followed ($followed_lines lines: a restart may offer one again)"
check "delivery log" "$([ "$sent_lines" = "$acked_rcpts" ]; echo $?)" "$sent_lines status=sent lines, $acked_rcpts recipients acknowledged"
verify_rc=0; "$BIN" spool verify --spool "$SPOOL" >"$WORK/verify.txt" 2>&1 || verify_rc=$?
check "spool verify" "$verify_rc" "$(tail -1 "$WORK/verify.txt")"
read -r rss_q rss_end rss_max <<<"$(awk -F'\t' -v q="$((DURATION / 4))" 'NR > 1 && $2 != "-" {
    if ($1 <= q) quarter = $2; last = $2; if ($2 > max) max = $2 } END { print quarter, last, max }' "$WORK/samples.tsv")"
check "memory" "$([ "$rss_end" -le $((rss_q * 3 / 2 + 16384)) ]; echo $?)" "RSS ${rss_q} KiB at a quarter, ${rss_end} KiB at the end, ${rss_max} KiB at most"
check "descriptors" "$([ "$fds_after" -le $((fds_before + 16)) ]; echo $?)" "$fds_before before the load, $fds_after after it"
echo "spool size over the run (MiB, every 10 s): $(awk -F'\t' 'NR > 1 {printf "%s ", $5}' "$WORK/samples.tsv")"
exit "$fail"

#!/usr/bin/env bash
# bench/peers.sh: lmtp-ingest against its peers, loaded the same way in one run.
#
# Servers, all on 127.0.0.1, all started AND stopped here (by PID):
#   sink     Postfix smtp-sink -L: answers every recipient at once, stores nothing
#            (the ceiling of the protocol exchange on this machine)
#   dovecot  Dovecot LMTP, Maildir, its default mail_fsync=optimized (fdatasync of
#            each message file), own config, base_dir and mail under a private dir
#   ours     target/release/lmtp-ingest serve, defaults (every 250 backed by
#            fdatasync), spool on the real disk under $WORK
# Generators:
#   source   Postfix smtp-source -L (lock-step: one command, one wait)
#   load     lmtp-ingest load --pipelining on (skipped, and said so, when the
#            binary has no `load` subcommand)
#   bdat     lmtp-ingest load --pipelining on --chunking on: BDAT, as Exim sends
#            (not in the default GENERATORS; smtp-sink offers no CHUNKING, so
#            only Dovecot and ours run it)
# Order: in each rep the sink and ours run back to back (which goes first
#   alternates by rep), then Dovecot; "ours / sink" is the median of the
#   per-rep ratios, listed under each table.
# Loads: NAME = {a: 4 KiB 1 rcpt, b: 4 KiB 50 rcpts, c: 64 KiB 1 rcpt,
#                d: 64 KiB 50 rcpts} + sessions (1 or 16), e.g. a16.
#
# Usage (from the repository root, as root for the package install):
#   QUICK=1 bench/peers.sh            # about 5 minutes: 1 rep, small counts, short settle
#   bench/peers.sh                    # full matrix, 3 reps (over an hour here: Dovecot
#                                     # takes minutes per 1-session run)
#   bench/peers.sh --install-only
# Knobs (environment): QUICK, REPS, LOADS, SERVERS, GENERATORS, MSGS_1RCPT,
#   MSGS_50RCPT, FAST_SCALE (smtp-sink and lmtp-ingest get this many times the
#   message count: 10, or 1 with QUICK; at the counts Dovecot can finish, their
#   runs last well under a second and vary by a tenth from run to run),
#   SETTLE (seconds of idle after deleting a store), RUN_TIMEOUT
#   (seconds per run), BUDGET (seconds for the whole matrix; later runs are
#   skipped and listed), WORK (scratch dir on the disk under test), BIN,
#   SKIP_BUILD=1, NO_DOC=1 (do not touch docs/BENCHMARKS.md), PORT_BASE.
# Output: $WORK/raw.csv, $WORK/summary.md, and the table between
#   <!-- peers:begin --> and <!-- peers:end --> in docs/BENCHMARKS.md.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
# shellcheck source=bench/lib.sh
. "$ROOT/bench/lib.sh"

QUICK=${QUICK:-0}
if [ "$QUICK" = 1 ]; then
  # Runs against smtp-sink and us last well under a second at these counts:
  # quick mode shows that everything works and the rough ratios, no more.
  REPS=${REPS:-1}; SETTLE=${SETTLE:-5}; MSGS_1RCPT=${MSGS_1RCPT:-5000}
  MSGS_50RCPT=${MSGS_50RCPT:-300}; LOADS=${LOADS:-"a1 a16 b16 c16 d16"}
  BUDGET=${BUDGET:-900}
else
  # Dovecot runs 1-session 50-recipient loads at 2-3 msg/s here: 300 messages
  # keep those runs near two minutes, inside RUN_TIMEOUT.
  REPS=${REPS:-3}; SETTLE=${SETTLE:-40}; MSGS_1RCPT=${MSGS_1RCPT:-10000}
  MSGS_50RCPT=${MSGS_50RCPT:-300}; LOADS=${LOADS:-"a1 a16 b1 b16 c1 c16 d1 d16"}
  BUDGET=${BUDGET:-5400}
fi
RUN_TIMEOUT=${RUN_TIMEOUT:-300}
if [ "$QUICK" = 1 ]; then FAST_SCALE=${FAST_SCALE:-1}; else FAST_SCALE=${FAST_SCALE:-10}; fi
[[ $FAST_SCALE =~ ^[1-9][0-9]*$ ]] || { echo "peers.sh: FAST_SCALE must be a whole number >= 1" >&2; exit 1; }
SERVERS=${SERVERS:-"sink dovecot ours"}
GENERATORS=${GENERATORS:-"source load"}
WORK=${WORK:-$ROOT/bench-out/peers}
BIN=${BIN:-$ROOT/target/release/lmtp-ingest}
# Dovecot resolves relative paths (its log file) from its own base_dir.
WORK=$(realpath -m "$WORK"); BIN=$(realpath -m "$BIN")
PORT_BASE=${PORT_BASE:-2460}
OURS_PORT=$PORT_BASE; SINK_PORT=$((PORT_BASE + 1)); DOVECOT_PORT=$((PORT_BASE + 2))
DOC=$ROOT/docs/BENCHMARKS.md
COMMAND_LINE="$(for v in QUICK REPS LOADS SETTLE MSGS_1RCPT MSGS_50RCPT FAST_SCALE; do printf "%s='%s' " "$v" "${!v}"; done)bench/peers.sh"

log() { printf '[%s] %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }
die() { log "FATAL: $*"; exit 1; }

# ------------------------------------------------------------------ install
PKGS="postfix dovecot-core dovecot-lmtpd"
install_peers() {
  local missing=() p
  for p in $PKGS; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
  done
  if ((${#missing[@]})); then
    [ "$(id -u)" = 0 ] || die "need root to install ${missing[*]} (or install them yourself)"
    log "installing ${missing[*]}"
    # Postfix with no configuration: nothing listens on port 25.
    echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
    # Keep the packages' scripts from starting system daemons.
    local policy=0
    if [ ! -e /usr/sbin/policy-rc.d ]; then
      printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d; chmod 755 /usr/sbin/policy-rc.d; policy=1
    fi
    apt-get update -q >/dev/null || log "apt-get update failed; trying the install anyway"
    local rc=0
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null || rc=$?
    [ "$policy" = 1 ] && rm -f /usr/sbin/policy-rc.d
    [ "$rc" = 0 ] || die "apt-get install ${missing[*]} failed (exit $rc)"
  fi
  if ! id vmail >/dev/null 2>&1; then
    [ "$(id -u)" = 0 ] || die "need root to create the user vmail for Dovecot's mail"
    getent group vmail >/dev/null || groupadd -r vmail
    useradd -r -g vmail -M -d /nonexistent -s /usr/sbin/nologin vmail
  fi
  { [ -x /usr/sbin/smtp-source ] && [ -x /usr/sbin/smtp-sink ]; } || die "smtp-source/smtp-sink missing from /usr/sbin (package postfix)"
  command -v dovecot >/dev/null || die "dovecot missing (packages dovecot-core dovecot-lmtpd)"
  command -v python3 >/dev/null || die "python3 missing (used to read JSON and summarize)"
}

# ------------------------------------------------------------------ processes
PIDS=()
stop_pid() {  # TERM, up to 10 s, then KILL; only PIDs this script started
  local pid=$1
  kill -0 "$pid" 2>/dev/null || { wait "$pid" 2>/dev/null || true; return 0; }
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
  if kill -0 "$pid" 2>/dev/null; then log "pid $pid ignored TERM for 10 s: KILL"; kill -KILL "$pid" 2>/dev/null || true; fi
  wait "$pid" 2>/dev/null || true
  local keep=() p
  for p in "${PIDS[@]}"; do [ "$p" != "$pid" ] && keep+=("$p"); done
  PIDS=("${keep[@]+"${keep[@]}"}")
}
cleanup() {
  local p
  for p in "${PIDS[@]+"${PIDS[@]}"}"; do stop_pid "$p"; done
  [ -n "${DOVECOT_RUN:-}" ] && rm -rf "$DOVECOT_RUN"
  [ -d "$WORK/dovecot/mail" ] && rm -rf "$WORK/dovecot/mail"
  [ -d "$WORK/spool" ] && rm -rf "$WORK/spool"
  return 0
}
trap cleanup EXIT
trap 'log "interrupted"; exit 130' INT TERM

port_free() { ! { (exec 3<>"/dev/tcp/127.0.0.1/$1"); } 2>/dev/null; }

wait_greeting() {  # PORT: up to 15 s for a 220 greeting
  local port=$1 line
  for _ in $(seq 1 75); do
    if { exec 3<>"/dev/tcp/127.0.0.1/$port"; } 2>/dev/null; then
      line=""
      read -r -t 2 line <&3 || true
      exec 3<&- 3>&-
      [[ $line == 220* ]] && return 0
    fi
    sleep 0.2
  done
  return 1
}

one_delivery() {  # PORT: one LMTP transaction, every recipient accepted
  python3 - "$1" <<'EOF'
import smtplib, sys
s = smtplib.LMTP("127.0.0.1", int(sys.argv[1]), timeout=10)
refused = s.sendmail("check@example.com", ["check@example.com"],
                     "Subject: peers.sh check\r\n\r\nhello\r\n")
s.quit()
sys.exit(1 if refused else 0)
EOF
}

SINK_PID=""; DOVECOT_PID=""; OURS_PID=""; DOVECOT_RUN=""
start_sink() {
  port_free "$SINK_PORT" || die "127.0.0.1:$SINK_PORT is in use (PORT_BASE=... to move)"
  local user=(); [ "$(id -u)" = 0 ] && user=(-u nobody)   # smtp-sink refuses root without -u
  /usr/sbin/smtp-sink "${user[@]}" -L "127.0.0.1:$SINK_PORT" 1024 >"$WORK/smtp-sink.log" 2>&1 &
  SINK_PID=$!; PIDS+=("$SINK_PID")
  wait_greeting "$SINK_PORT" || die "smtp-sink did not answer (see $WORK/smtp-sink.log)"
}

write_dovecot_conf() {
  DOVECOT_RUN=$(mktemp -d /tmp/lmtp-peers-dovecot.XXXXXX)   # sockets: short path
  mkdir -p "$WORK/dovecot/mail" "$DOVECOT_RUN/state"
  chown vmail:vmail "$WORK/dovecot/mail"
  cat >"$WORK/dovecot/dovecot.conf" <<EOF
# Written by bench/peers.sh. Standalone: does not read /etc/dovecot.
instance_name = lmtp-peers
base_dir = $DOVECOT_RUN/run
state_dir = $DOVECOT_RUN/state
log_path = $WORK/dovecot/dovecot.log
protocols = lmtp
listen = 127.0.0.1
ssl = no
auth_mechanisms = plain
default_internal_user = dovecot
default_login_user = dovenull
first_valid_uid = 100
mail_uid = vmail
mail_gid = vmail
mail_location = maildir:$WORK/dovecot/mail/%u
# Dovecot's default, spelled out: fdatasync each message file.
mail_fsync = optimized
passdb {
  driver = static
  args = nopassword=y
}
userdb {
  driver = static
  args = uid=vmail gid=vmail home=$WORK/dovecot/mail/%u
}
service lmtp {
  inet_listener lmtp {
    address = 127.0.0.1
    port = $DOVECOT_PORT
  }
}
service stats {
  inet_listener http {
    port = 0
  }
}
EOF
}

start_dovecot() {
  port_free "$DOVECOT_PORT" || die "127.0.0.1:$DOVECOT_PORT is in use"
  [ -n "$DOVECOT_RUN" ] || write_dovecot_conf
  mkdir -p "$WORK/dovecot/mail"; chown vmail:vmail "$WORK/dovecot/mail"
  dovecot -F -c "$WORK/dovecot/dovecot.conf" >>"$WORK/dovecot/master.out" 2>&1 &
  DOVECOT_PID=$!; PIDS+=("$DOVECOT_PID")
  wait_greeting "$DOVECOT_PORT" || die "dovecot did not answer (see $WORK/dovecot/dovecot.log)"
  one_delivery "$DOVECOT_PORT" || die "dovecot refused a test delivery (see $WORK/dovecot/dovecot.log)"
  ls "$WORK/dovecot/mail/check@example.com/new/" >/dev/null 2>&1 || die "the test delivery is not in the Maildir"
}

start_ours() {  # a fresh spool each time, like Dovecot's fresh Maildir
  port_free "$OURS_PORT" || die "127.0.0.1:$OURS_PORT is in use"
  rm -rf "$WORK/spool"
  "$BIN" serve --listen "127.0.0.1:$OURS_PORT" --spool "$WORK/spool" >>"$WORK/ours.log" 2>&1 &
  OURS_PID=$!; PIDS+=("$OURS_PID")
  wait_greeting "$OURS_PORT" || die "lmtp-ingest did not answer (see $WORK/ours.log)"
  # The start-up segment preparation (bench/lib.sh).
  wait_spool_prep "$OURS_PID"
}

stop_server() {  # SERVER
  case $1 in
    sink) [ -n "$SINK_PID" ] && stop_pid "$SINK_PID"; SINK_PID="" ;;
    dovecot) [ -n "$DOVECOT_PID" ] && stop_pid "$DOVECOT_PID"; DOVECOT_PID=""; rm -rf "$WORK/dovecot/mail" ;;
    ours) [ -n "$OURS_PID" ] && stop_pid "$OURS_PID"; OURS_PID="" ;;
  esac
}

# Fresh store, then let the file system settle (a file system that just freed
# many inodes allocates slower for ~30 s: ../shared/bench/peers/README.md).
fresh_server() {  # SERVER
  stop_server "$1"
  case $1 in
    sink) start_sink ;;
    dovecot) sync; sleep "$SETTLE"; start_dovecot ;;
    ours) sync; sleep "$SETTLE"; start_ours ;;
  esac
}

server_pid() { case $1 in sink) echo "$SINK_PID";; dovecot) echo "$DOVECOT_PID";; ours) echo "$OURS_PID";; esac; }
server_port() { case $1 in sink) echo "$SINK_PORT";; dovecot) echo "$DOVECOT_PORT";; ours) echo "$OURS_PORT";; esac; }

tree_ticks() {  # PID: CPU ticks of the process, its live descendants and reaped children
  python3 - "$1" <<'EOF'
import os, sys
root = sys.argv[1]; parent = {}; own = {}; reaped = {}
for d in os.listdir("/proc"):
    if not d.isdigit():
        continue
    try:
        s = open(f"/proc/{d}/stat").read()
    except OSError:
        continue
    f = s[s.rindex(")") + 2:].split()
    parent[d] = f[1]; own[d] = int(f[11]) + int(f[12]); reaped[d] = int(f[13]) + int(f[14])
total = reaped.get(root, 0)
for p in parent:
    q = p
    for _ in range(32):
        if q == root:
            total += own[p]; break
        q = parent.get(q)
        if q is None:
            break
print(total)
EOF
}

load_spec() {  # NAME -> "sessions rcpts bytes msgs"
  local n=$1 kind=${1:0:1} sess=${1:1}
  [[ $sess =~ ^[0-9]+$ ]] || die "load $n: sessions must follow the letter, e.g. a16"
  case $kind in
    a) echo "$sess 1 4096 $MSGS_1RCPT" ;;
    b) echo "$sess 50 4096 $MSGS_50RCPT" ;;
    c) echo "$sess 1 65536 $MSGS_1RCPT" ;;
    d) echo "$sess 50 65536 $MSGS_50RCPT" ;;
    *) die "load $n: the letter must be a, b, c or d" ;;
  esac
}

HAVE_LOAD=0
CLK=$(getconf CLK_TCK)
run_one() {  # SERVER GENERATOR LOAD REP -> one CSV row
  local server=$1 gen=$2 load=$3 rep=$4 sess rcpt bytes msgs
  read -r sess rcpt bytes msgs <<<"$(load_spec "$load")"
  case $server in sink|ours) msgs=$((msgs * FAST_SCALE)) ;; esac
  fresh_server "$server"
  local port pid out="$WORK/run.$server.$gen.$load.$rep" t0 t1 c0 c1 rc=0 spool_stats=","
  port=$(server_port "$server"); pid=$(server_pid "$server")
  c0=$(tree_ticks "$pid"); t0=$(date +%s.%N)
  if [ "$gen" = source ]; then
    timeout --kill-after=5 "$RUN_TIMEOUT" /usr/sbin/smtp-source -L -d -s "$sess" -m "$msgs" \
      -r "$rcpt" -l "$bytes" -M peers.local -f sender@example.com -t user@example.com \
      "127.0.0.1:$port" >"$out.log" 2>&1 || rc=$?
  else
    # Only the bdat rows name --chunking: older builds (BIN) lack the flag.
    local chunking=()
    [ "$gen" = bdat ] && chunking=(--chunking on)
    timeout --kill-after=5 "$RUN_TIMEOUT" "$BIN" load --target "127.0.0.1:$port" \
      --connections "$sess" --recipients "$rcpt" --size "$bytes" --messages "$msgs" \
      --pipelining on "${chunking[@]}" --json >"$out.json" 2>"$out.log" || rc=$?
  fi
  t1=$(date +%s.%N); c1=$(tree_ticks "$pid")
  local status=ok
  case $rc in 0) ;; 124|137) status=timeout ;; *) status="exit$rc" ;; esac
  if [ "$server" = dovecot ] && [ "$status" = ok ]; then
    local got; got=$(find "$WORK/dovecot/mail" -path '*/new/*' -type f | wc -l)
    # +1: the start-up check delivery.
    [ "$got" -eq $((msgs * rcpt + 1)) ] || status="stored$((got - 1))"
  fi
  if [ "$server" = ours ] && [ "$status" = ok ]; then
    # Every 250 must be in the spool: stop (commits what is queued), verify.
    stop_server ours
    "$BIN" spool verify --spool "$WORK/spool" --json >"$out.verify.json" 2>>"$out.log" || true
    status=$(python3 - "$out.verify.json" "$msgs" "$rcpt" <<'EOF2'
import json, sys
try:
    v = json.load(open(sys.argv[1]))
except Exception:
    print("verifyfailed"); sys.exit()
m, r = int(sys.argv[2]), int(sys.argv[3])
# No check delivery goes to our server, so the counts match exactly.
ok = v["corrupt"] == 0 and v["messages"] == m and v["recipients"] == m * r
print("ok" if ok else f"stored{v['messages']}corrupt{v['corrupt']}")
EOF2
)
    # The spool's own view of this run (logged at shutdown): batch size and
    # sync latency explain most of the variation between runs here.
    spool_stats=$(grep -a 'stopped; spool: SpoolStats' "$WORK/ours.log" | tail -1 | python3 -c '
import re, sys
t = sys.stdin.read()
g = lambda k: int(re.search(k + r": (\d+)", t).group(1))
try:
    batch = g("messages_committed") / max(g("batches"), 1)
    sync_us = g("fsync_ns_total") / max(g("fsyncs"), 1) / 1000
    print("%.1f,%.0f" % (batch, sync_us))
except Exception:
    print(",")')
  fi
  python3 - "$server" "$gen" "$load" "$rep" "$sess" "$rcpt" "$bytes" "$msgs" "$t0" "$t1" \
      "$status" "$((c1 - c0))" "$CLK" "$out.json" "$spool_stats" >>"$WORK/raw.csv" <<'EOF'
import json, sys
(server, gen, load, rep, sess, rcpt, size, msgs, t0, t1, status, ticks, clk, js, spool) = sys.argv[1:]
wall = float(t1) - float(t0)
mps = int(msgs) / wall if status == "ok" else 0.0
p99 = ""
if gen in ("load", "bdat") and status == "ok":
    try:
        r = json.load(open(js))
        mps = float(r["messages_per_s"])
        p99 = str(r["latency_us"]["p99"])
        if int(r.get("protocol_errors", 0)):
            status = f"errors{r['protocol_errors']}"
    except Exception as e:
        status = "badjson"
cpu = int(ticks) / int(clk) / wall * 100
print(f"{server},{gen},{load},{rep},{sess},{rcpt},{size},{msgs},{wall:.3f},{status},"
      f"{mps:.1f},{mps * int(rcpt):.1f},{p99},{cpu:.0f},{spool}")
EOF
  log "$(tail -1 "$WORK/raw.csv")"
}

summarize() {  # raw.csv -> Markdown tables on stdout
  python3 - "$1" <<'EOF'
import csv, statistics, sys
rows = list(csv.DictReader(open(sys.argv[1])))
names = {"a": "4 KiB, 1 rcpt", "b": "4 KiB, 50 rcpts", "c": "64 KiB, 1 rcpt", "d": "64 KiB, 50 rcpts"}
gens = {"source": "Postfix `smtp-source -L -d` (lock-step)", "load": "`lmtp-ingest load --pipelining on`",
        "bdat": "`lmtp-ingest load --pipelining on --chunking on` (BDAT; smtp-sink offers no CHUNKING)"}
def cell(rs):
    ok = [r for r in rs if r["status"] == "ok"]
    if not ok:
        return None, ", ".join(r["status"] for r in rs) or "-"
    mps = statistics.median(float(r["msgs_per_s"]) for r in ok)
    rcpt = int(ok[0]["rcpt"])
    txt = f"{mps:,.0f}" if mps >= 100 else f"{mps:,.1f}"
    if rcpt > 1:
        txt += f" ({mps * rcpt:,.0f} rcpt/s)"
    cpu = statistics.median(float(r["server_cpu_pct"]) for r in ok)
    txt += f", {cpu:.0f}% CPU"
    if ok[0].get("batch_mean"):
        b = statistics.median(float(r["batch_mean"]) for r in ok)
        f = statistics.median(float(r["fsync_us_mean"]) for r in ok)
        txt += f", batch {b:.1f}, sync {f / 1000:.2f} ms"
    if ok[0]["p99_us"]:
        txt += f", p99 {statistics.median(float(r['p99_us']) for r in ok) / 1000:.1f} ms"
    if len(ok) < len(rs):
        txt += f" ({len(rs) - len(ok)} of {len(rs)} failed)"
    return mps, txt
def per_rep(rs, a, b):
    by = {}
    for r in rs:
        if r["status"] == "ok":
            by.setdefault(r["rep"], {})[r["server"]] = float(r["msgs_per_s"])
    return [v[a] / v[b] for _, v in sorted(by.items(), key=lambda kv: int(kv[0])) if a in v and b in v and v[b]]
for gen in ["source", "load", "bdat"]:
    gr = [r for r in rows if r["generator"] == gen]
    if not gr:
        continue
    notes = []
    print(f"\n{gens[gen]}, median of {max(int(r['rep']) for r in gr)} run(s); msg/s, server CPU (100% = one core);"
          " for lmtp-ingest also the spool's mean batch (messages per fdatasync) and mean fdatasync:\n")
    print("| load | sessions | messages | smtp-sink (stores nothing) | Dovecot LMTP | lmtp-ingest | ours / sink (median of per-rep ratios) | ours / Dovecot |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    loads = []
    for r in gr:
        if r["load"] not in loads:
            loads.append(r["load"])
    for ld in loads:
        lr = [r for r in gr if r["load"] == ld]
        m = {}
        t = {}
        for s in ["sink", "dovecot", "ours"]:
            m[s], t[s] = cell([r for r in lr if r["server"] == s])
        ratio = lambda a, b: f"{m[a] / m[b]:.2f}" if m[a] and m[b] else "-"
        # Ours against the sink: the median of the per-rep ratios (the two
        # run back to back in each rep), not the ratio of the medians.
        pairs = per_rep(lr, "ours", "sink")
        if pairs:
            vs_sink = f"{statistics.median(pairs):.2f}"
            notes.append(f"{names[ld[0]]}, {lr[0]['sessions']} sessions: ours / sink per rep "
                         + ", ".join(f"{x:.2f}" for x in pairs) + f" (ratio of the medians {ratio('ours', 'sink')})")
        else:
            vs_sink = ratio("ours", "sink")
        counts = sorted({int(r["msgs"]) for r in lr})
        msgs = " / ".join(f"{c:,}" for c in counts)
        print(f"| {names[ld[0]]} | {lr[0]['sessions']} | {msgs} | {t['sink']} | {t['dovecot']} | {t['ours']} "
              f"| {vs_sink} | {ratio('ours', 'dovecot')} |")
    if notes:
        print("\nPer rep (" + gens[gen] + "; lmtp-ingest and smtp-sink back to back, which went first alternating by rep):\n")
        for n in notes:
            print(f"- {n}")
EOF
}

machine() {
  local model cores
  model=$(lscpu | sed -n 's/^Model name: *//p' | head -1)
  cores=$(nproc)
  # shellcheck disable=SC2016 # the backquotes are Markdown
  printf '%s, %s cores available (`nproc`), %s GiB, Linux %s' "$model" "$cores" \
    "$(awk '/MemTotal/{printf "%.0f", $2/1048576}' /proc/meminfo)" "$(uname -r)"
}

write_doc() {  # SUMMARY_FILE: replace the block between the markers (or append it)
  local begin='<!-- peers:begin -->' end='<!-- peers:end -->' block
  block=$(mktemp)
  {
    echo "$begin"
    echo "<!-- Written by bench/peers.sh; edit the prose outside the markers. -->"
    echo
    echo "- **Command:** \`$COMMAND_LINE\` (git $(git rev-parse --short HEAD 2>/dev/null || echo '?'))"
    echo "- **Machine:** $(machine); $SPOOL_DISK"
    echo "- **Date:** $(date -u '+%Y-%m-%d %H:%M UTC') (run started $STARTED); load average at start $LOAD_START, at end $(cut -d' ' -f1-3 /proc/loadavg)"
    echo "- **Versions:** $(dpkg-query -W -f='${Package} ${Version}, ' postfix dovecot-lmtpd 2>/dev/null)lmtp-ingest $("$BIN" --version | awk '{print $2}') (release build, default settings: one shard per CPU, 1 writer)"
    SKIPPED=${SKIPPED%; }
    echo "- **Skipped:** ${SKIPPED:-nothing}"
    cat "$1"
    echo
    echo "$end"
  } >"$block"
  if grep -qF "$begin" "$DOC" && grep -qF "$end" "$DOC"; then
    python3 - "$DOC" "$block" "$begin" "$end" <<'EOF'
import sys
doc, block, b, e = sys.argv[1:]
text = open(doc).read(); new = open(block).read().rstrip("\n")
i = text.index(b); j = text.index(e, i) + len(e)
open(doc, "w").write(text[:i] + new + text[j:])
EOF
  else
    printf '\n## Peer comparison\n\n' >>"$DOC"
    cat "$block" >>"$DOC"
  fi
  rm -f "$block"
  log "table written to $DOC"
}

# The order of SERVERS within one rep: smtp-sink and ours back to back (this
# host's speed drifts by a third over tens of seconds, and a Dovecot run in
# between takes that long), swapping which goes first from rep to rep; any
# other server after them.
run_order() {  # REP
  local pair=() rest=() s
  for s in $SERVERS; do
    case $s in sink|ours) pair+=("$s") ;; *) rest+=("$s") ;; esac
  done
  if [ "${#pair[@]}" = 2 ] && (($1 % 2 == 0)); then pair=("${pair[1]}" "${pair[0]}"); fi
  echo "${pair[*]+"${pair[*]}"} ${rest[*]+"${rest[*]}"}"
}

main() {
  install_peers
  [ "${1:-}" = --install-only ] && exit 0
  if [ "${SKIP_BUILD:-0}" != 1 ]; then
    log "cargo build --release"
    cargo build --release -q || die "cargo build --release failed"
  fi
  [ -x "$BIN" ] || die "$BIN missing: run cargo build --release"
  if "$BIN" load --help >/dev/null 2>&1; then HAVE_LOAD=1; fi
  mkdir -p "$WORK"; rm -f "$WORK"/run.* "$WORK/ours.log"
  STARTED=$(date -u +%H:%M); LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)
  # The spool's disk, measured the way doctor does.
  # (doctor exits 1 when it found any warning: the JSON is still complete.)
  SPOOL_DISK=$({ "$BIN" doctor --spool "$WORK" --json --fsync-seconds 1 2>/dev/null || true; } | python3 -c '
import json, sys
r = json.load(sys.stdin); o = r["fsync"]["overwrite"]
fs = next(c["value"] for c in r["checks"] if c["name"] == "spool_fs").split(" (")[0]
med, p99 = o["median_us"], o["p99_us"]
print(f"spool and Maildir on {fs}; fdatasync of a 4 KiB overwrite there: median {med:.0f} µs, p99 {p99:.0f} µs (lmtp-ingest doctor, 1 s, before the runs)")' \
    || echo "spool disk not measured (doctor failed)")
  echo "server,generator,load,rep,sessions,rcpt,bytes,msgs,wall_s,status,msgs_per_s,rcpts_per_s,p99_us,server_cpu_pct,batch_mean,fsync_us_mean" >"$WORK/raw.csv"
  SKIPPED=""
  local t_start=$SECONDS rep gen load server
  for rep in $(seq 1 "$REPS"); do
    for gen in $GENERATORS; do
      if [ "$gen" != source ] && [ "$HAVE_LOAD" = 0 ]; then
        [ "$rep" = 1 ] && { log "$BIN has no 'load' subcommand: load-generator rows skipped"; SKIPPED+="lmtp-ingest load rows (this build has no \`load\` subcommand); "; }
        continue
      fi
      for load in $LOADS; do
        for server in $(run_order "$rep"); do
          # smtp-sink offers no CHUNKING: nothing to compare BDAT against.
          [ "$gen" = bdat ] && [ "$server" = sink ] && continue
          if ((SECONDS - t_start > BUDGET)); then
            SKIPPED+="$server/$gen/$load rep $rep (BUDGET=$BUDGET s); "; continue
          fi
          run_one "$server" "$gen" "$load" "$rep"
        done
      done
    done
  done
  cleanup
  summarize "$WORK/raw.csv" | tee "$WORK/summary.md"
  [ "${NO_DOC:-0}" = 1 ] || write_doc "$WORK/summary.md"
}

main "$@"

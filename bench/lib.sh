# shellcheck shell=bash
# bench/lib.sh: waits the bench scripts share. Source it; it defines
# functions only.

# wait_listening PID PORT NAME LOG: returns once something listens on
# 127.0.0.1:PORT; exits the script, printing LOG, if PID dies first or after
# 60 s.
wait_listening() {
  local pid=$1 port=$2 name=$3 log=$4 waited=0
  until ss -ltn "sport = :$port" | grep -q LISTEN; do
    sleep 0.2; waited=$((waited + 1))
    if ! kill -0 "$pid" 2>/dev/null || [ $waited -ge 300 ]; then
      echo "$name did not start:" >&2; cat "$log" >&2; exit 1
    fi
  done
}

# wait_spool_prep PID: returns once lmtp-ingest process PID has no
# `spool-prep` thread, i.e. a fresh server has finished zero-filling its next
# segment in the background (64 MiB of disk writes, a few tenths of a
# second). A load started earlier shares the disk with it for a large share
# of a short run, far more than a running server's share (one segment per
# 64 MiB of records). Gives up with a warning after 30 s.
wait_spool_prep() {
  local pid=$1 waited=0
  while grep -qs '^spool-prep' /proc/"$pid"/task/*/comm; do
    sleep 0.2; waited=$((waited + 1))
    if [ $waited -ge 150 ]; then
      echo "warning: lmtp-ingest (pid $pid) still preparing a segment after 30 s; loading anyway" >&2
      return
    fi
  done
}

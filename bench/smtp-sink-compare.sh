#!/usr/bin/env bash
# Same-run comparison: lmtp-ingest (uring, epoll) vs Postfix smtp-sink -L.
set -u
# Run from the repository root after `cargo build --release`; needs Debian's postfix
# (smtp-source, smtp-sink) and bc. Spools go under ./bench-out (real disk).
BIN=${BIN:-target/release/lmtp-ingest}
OUT=${OUT:-bench-out}
mkdir -p "$OUT"
cd "$OUT"; BIN=$(realpath "$OLDPWD/$BIN")
rm -rf spool-uring spool-epoll
$BIN serve --io uring --listen 127.0.0.1:2450 --spool $PWD/spool-uring > uring.log 2>&1 &
U=$!
$BIN serve --io epoll --listen 127.0.0.1:2451 --spool $PWD/spool-epoll > epoll.log 2>&1 &
E=$!
smtp-sink -u nobody -L 127.0.0.1:2452 1024 > sink.log 2>&1 &
S=$!
sleep 1
for rep in 1 2; do
  for load in "1 20000" "50 4000"; do
    set -- $load
    for t in sink:2452 uring:2450 epoll:2451; do
      name=${t%%:*}; port=${t##*:}
      start=$(date +%s.%N)
      smtp-source -L -s 16 -r $1 -m $2 -l 4096 -f s@example.org -t r@example.com 127.0.0.1:$port || echo "FAIL $name"
      end=$(date +%s.%N)
      echo "rep=$rep rcpts=$1 msgs=$2 target=$name secs=$(echo "$end - $start" | bc) msg_per_s=$(echo "$2 / ($end - $start)" | bc)"
    done
  done
done
kill -TERM $U $E; kill $S; wait $U $E 2>/dev/null
for f in uring epoll; do $BIN spool verify --spool spool-$f --json | tr -d '\n '; echo; done

#!/usr/bin/env python3
"""Holds N idle LMTP connections (greeted, LHLO done) to a running server and
reports the growth of the server's resident memory per connection.
Usage: idle_connections.py PORT N SERVER_PID  (raise ulimit -n above N first)."""
import socket, sys, time, resource
resource.setrlimit(resource.RLIMIT_NOFILE, (20000, 20000))
port = int(sys.argv[1]); n = int(sys.argv[2]); pid = sys.argv[3]
def rss():
    for l in open(f"/proc/{pid}/status"):
        if l.startswith("VmRSS"): return int(l.split()[1])
base = rss()
socks = []
for i in range(n):
    s = socket.create_connection(("127.0.0.1", port))
    socks.append(s)
# read every greeting and send LHLO so each session is fully set up
for s in socks:
    s.recv(200)
for s in socks:
    s.sendall(b"LHLO idle\r\n")
for s in socks:
    buf = b""
    while not buf.endswith(b"RCPTMAX=1000\r\n"):
        got = s.recv(400)
        if not got:
            raise SystemExit(f"connection closed early: {buf!r}")
        buf += got
time.sleep(1)
held = rss()
print(f"connections={n} rss_before_kib={base} rss_held_kib={held} per_conn_bytes={(held-base)*1024/n:.0f}")

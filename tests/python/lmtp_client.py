#!/usr/bin/env python3
"""LMTP clients built on Python's smtplib (nothing of ours), for socket tests.

Usage: lmtp_client.py MODE TARGET
  TARGET: HOST:PORT or unix:/path
  MODE:
    deliver    LHLO, one message to one recipient, one to several (with a
               duplicate), with leading dots and a bare LF in the body;
               reads one reply per recipient after the data.
    pipelined  raw socket: MAIL/RCPT/RCPT/DATA in one packet, then the body
               and QUIT in one packet; checks every reply arrives, in order,
               and the 221 last.
Prints a JSON object with the queue ids and what was sent; exits non-zero on
any unexpected reply.
"""
import json
import re
import smtplib
import socket
import sys

ID = re.compile(rb"^2\.0\.0 <([^>]*)> ([0-9A-Z]{26}) Saved$")


def connect(target):
    if target.startswith("unix:"):
        return smtplib.LMTP(target[5:])
    host, port = target.rsplit(":", 1)
    return smtplib.LMTP(host, int(port))


def deliver(s, sender, rcpts, body):
    """One LMTP transaction; returns the queue id from each per-recipient reply."""
    code, msg = s.mail(sender)
    assert code == 250, ("MAIL", code, msg)
    for r in rcpts:
        code, msg = s.rcpt(r)
        assert code == 250, ("RCPT", r, code, msg)
    # smtplib's data() dot-stuffs, sends, and reads the first reply only; an
    # LMTP client must read one more per further recipient (RFC 2033 4.2).
    replies = [s.data(body)]
    for _ in rcpts[1:]:
        replies.append(s.getreply())
    ids = []
    for r, (code, msg) in zip(rcpts, replies):
        m = ID.match(msg)
        assert code == 250 and m, ("final reply", r, code, msg)
        assert m.group(1).decode() == r, ("reply names the recipient", r, msg)
        ids.append(m.group(2).decode())
    assert len(set(ids)) == 1, ("one message, one id", ids)
    return ids[0]


def mode_deliver(target):
    s = connect(target)
    code, msg = s.ehlo_or_helo_if_needed() or (250, b"")
    out = []
    one = b"Subject: one\r\n\r\nHello.\r\n.a line with a leading dot\r\n..two dots\r\n"
    out.append({"id": deliver(s, "sender@example.org", ["alice@example.com"], one),
                "rcpts": ["alice@example.com"], "body": one.decode()})
    many = ["bob+news@example.com", "carol@example.com", "bob+news@example.com"]
    text = "Subject: many\n\nbare LF lines are fixed by smtplib\n.\nend\n"
    expect = text.replace("\n", "\r\n")
    out.append({"id": deliver(s, "", many, text), "rcpts": many, "body": expect})
    code, msg = s.noop()
    assert code == 250, ("NOOP after the data: replies stayed in step", code, msg)
    code, msg = s.docmd("QUIT")
    assert code == 221, ("QUIT", code, msg)
    s.close()
    print(json.dumps(out))


def read_replies(sock, n):
    """Reads n complete replies (multi-line ones count once)."""
    buf = b""
    replies = []
    while len(replies) < n:
        chunk = sock.recv(65536)
        if not chunk:
            raise AssertionError(("connection closed early", replies, buf))
        buf += chunk
        while b"\r\n" in buf and len(replies) < n:
            line, buf = buf.split(b"\r\n", 1)
            if line[3:4] == b" ":
                replies.append(line)
    return replies, buf


def mode_pipelined(target):
    if target.startswith("unix:"):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(target[5:])
    else:
        host, port = target.rsplit(":", 1)
        sock = socket.create_connection((host, int(port)))
    sock.settimeout(20)
    greeting, _ = read_replies(sock, 1)
    assert greeting[0].startswith(b"220 "), greeting
    sock.sendall(b"LHLO pipeliner\r\n")
    read_replies(sock, 1)
    rcpts = ["p1@example.com", "p2@example.com", "p3@example.com"]
    head = b"MAIL FROM:<pipe@example.org> SIZE=100\r\n"
    head += b"".join(b"RCPT TO:<%s>\r\n" % r.encode() for r in rcpts)
    head += b"DATA\r\n"
    sock.sendall(head)
    replies, rest = read_replies(sock, 2 + len(rcpts))
    codes = [r[:3] for r in replies]
    assert codes == [b"250"] * (1 + len(rcpts)) + [b"354"], replies
    body = b"Subject: pipelined\r\n\r\nbody\r\n"
    # The final dot and QUIT in one packet, as Postfix does.
    sock.sendall(body + b".\r\nQUIT\r\n")
    finals, rest = read_replies(sock, len(rcpts) + 1)
    ids = []
    for r, line in zip(rcpts, finals):
        m = ID.match(line[4:])
        assert line.startswith(b"250 ") and m and m.group(1).decode() == r, (r, line)
        ids.append(m.group(2).decode())
    assert finals[-1].startswith(b"221 "), ("221 comes after every recipient's reply", finals)
    assert sock.recv(100) == b"", "the server closes after 221"
    print(json.dumps([{"id": ids[0], "rcpts": rcpts, "body": body.decode()}]))


if __name__ == "__main__":
    mode, target = sys.argv[1], sys.argv[2]
    {"deliver": mode_deliver, "pipelined": mode_pipelined}[mode](target)

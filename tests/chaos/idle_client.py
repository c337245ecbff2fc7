#!/usr/bin/env python3
"""Opens one client connection as a user — a WebSocket (`ws`, reading the 101
and the welcome frame) or an SSE stream (`sse`, reading until the welcome
message) — prints "ready", then never reads or writes again (until killed).

    idle_client.py HOST:PORT USER ws|sse
"""
import socket
import sys
import time

host, port = sys.argv[1].rsplit(":", 1)
user, transport = sys.argv[2], sys.argv[3]
if transport == "ws":
    request = (
        f"GET /ws?user={user} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
        "Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    )
    welcome = b"welcome"
elif transport == "sse":
    request = f"GET /sse?user={user} HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\n\r\n"
    welcome = b"event: welcome"
else:
    sys.exit(f"transport must be ws or sse, not {transport!r}")
s = socket.create_connection((host, int(port)), timeout=10)
s.sendall(request.encode())
buf = b""
while welcome not in buf:
    chunk = s.recv(4096)
    if not chunk:
        sys.exit("closed before welcome")
    buf += chunk
print("ready", flush=True)
time.sleep(600)

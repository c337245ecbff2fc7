#!/usr/bin/env python3
"""Opens one WebSocket as a user, reads the 101 and the welcome frame, prints
"ready", then never reads or writes again (until killed).

    ws_idle_client.py HOST:PORT USER
"""
import socket
import sys
import time

host, port = sys.argv[1].rsplit(":", 1)
s = socket.create_connection((host, int(port)), timeout=10)
s.sendall(
    (
        f"GET /ws?user={sys.argv[2]} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
        "Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    ).encode()
)
buf = b""
while b"welcome" not in buf:
    chunk = s.recv(4096)
    if not chunk:
        sys.exit("closed before welcome")
    buf += chunk
print("ready", flush=True)
time.sleep(600)

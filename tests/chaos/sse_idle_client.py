#!/usr/bin/env python3
"""Opens one /sse stream as a user, reads until the welcome message, prints
"ready", then never reads again (until killed).

    sse_idle_client.py HOST:PORT USER
"""
import socket
import sys
import time

host, port = sys.argv[1].rsplit(":", 1)
s = socket.create_connection((host, int(port)), timeout=10)
s.sendall(f"GET /sse?user={sys.argv[2]} HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\n\r\n".encode())
buf = b""
while b"event: welcome" not in buf:
    chunk = s.recv(4096)
    if not chunk:
        sys.exit("closed before welcome")
    buf += chunk
print("ready", flush=True)
time.sleep(600)

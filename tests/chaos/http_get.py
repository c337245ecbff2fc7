#!/usr/bin/env python3
"""GET a URL with a Bearer key and print the body (run inside a namespace).

    http_get.py URL KEY
"""
import sys
import urllib.request

req = urllib.request.Request(sys.argv[1], headers={"Authorization": f"Bearer {sys.argv[2]}"})
with urllib.request.urlopen(req, timeout=10) as r:
    sys.stdout.write(r.read().decode())

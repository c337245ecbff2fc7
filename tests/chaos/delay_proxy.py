#!/usr/bin/env python3
"""A userspace TCP proxy that delays and stalls traffic (this kernel has no
tc netem). Used by the chaos tests inside a network namespace.

    delay_proxy.py LISTEN_HOST:PORT TARGET_HOST:PORT DELAY_MS STALL_PROB STALL_MS

Every chunk is forwarded DELAY_MS late, in order, per direction; with
probability STALL_PROB a chunk waits STALL_MS more (a stalled path). Prints
the bound port on stdout once listening (LISTEN port 0 picks one).
"""
import asyncio
import random
import sys


async def pipe(reader, writer, delay, stall_prob, stall):
    try:
        while True:
            data = await reader.read(65536)
            if not data:
                break
            await asyncio.sleep(delay + (stall if random.random() < stall_prob else 0.0))
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        try:
            writer.close()
        except OSError:
            pass


async def main():
    listen, target = sys.argv[1], sys.argv[2]
    delay = float(sys.argv[3]) / 1000.0
    stall_prob = float(sys.argv[4])
    stall = float(sys.argv[5]) / 1000.0
    lhost, lport = listen.rsplit(":", 1)
    thost, tport = target.rsplit(":", 1)

    async def handle(cr, cw):
        try:
            ur, uw = await asyncio.open_connection(thost, int(tport))
        except OSError:
            cw.close()
            return
        await asyncio.gather(pipe(cr, uw, delay, stall_prob, stall), pipe(ur, cw, delay, stall_prob, stall))

    server = await asyncio.start_server(handle, lhost, int(lport))
    print(server.sockets[0].getsockname()[1], flush=True)
    async with server:
        await server.serve_forever()


asyncio.run(main())

"""Loopback port forwarder into the e2e node's network namespace.

``python -m tests.e2e.fwd NETNS_PID LPORT:RHOST:RPORT ...`` binds every
``127.0.0.1:LPORT`` in this machine's namespace first, then joins the network
namespace of NETNS_PID (setns on the still single-threaded process) and
relays each accepted connection to ``RHOST:RPORT`` as seen from inside. Test
code on this machine can then reach the node's apiserver and registry on
loopback, without any route, address or rule on the machine.
"""
from __future__ import annotations

import asyncio
import ctypes
import os
import socket
import sys

CLONE_NEWNET = 0x40000000


def setns_net(pid: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
    finally:
        os.close(fd)


async def _pipe(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
    try:
        while data := await r.read(65536):
            w.write(data)
            await w.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        try:
            w.close()
        except Exception:  # noqa: BLE001
            pass


def _handler(rhost: str, rport: int):
    async def handle(cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        try:
            sr, sw = await asyncio.open_connection(rhost, rport)
        except OSError:
            cw.close()
            return
        await asyncio.gather(_pipe(cr, sw), _pipe(sr, cw))
    return handle


async def serve(socks: list[tuple[socket.socket, str, int]]) -> None:
    servers = [await asyncio.start_server(_handler(h, p), sock=s) for s, h, p in socks]
    print("forwarding", flush=True)
    await asyncio.gather(*(s.serve_forever() for s in servers))


def main(argv: list[str]) -> None:
    pid, specs = int(argv[0]), argv[1:]
    socks = []
    for spec in specs:
        lport, rhost, rport = spec.split(":")
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", int(lport)))
        s.listen(128)
        s.setblocking(False)
        socks.append((s, rhost, int(rport)))
    setns_net(pid)   # before any thread exists: the whole process moves
    asyncio.run(serve(socks))


if __name__ == "__main__":
    main(sys.argv[1:])

"""A TCP proxy that delays every byte by a fixed time in each direction (netem is not in this kernel).

`delay_proxy((host, port), one_way_ms)` starts it as a child process listening on a free port and
stops it in every outcome. A connection through it gets a round trip longer by at least
2 × `one_way_ms` (never less: each chunk is held until its due time; the machine may add more).
Order and half-closes are kept: a chunk read at t is written at t + delay, after every earlier
one; an EOF is passed on after the last chunk.

    python -m tests.harness.delayproxy LISTEN_HOST TARGET_HOST TARGET_PORT ONE_WAY_MS
        (prints the port it listens on, then serves until terminated)
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

from . import REPO, child

__all__ = ["Proxy", "delay_proxy"]

_CHUNK = 65536
_QUEUED = 256
"""Chunks in flight per direction; past that the proxy stops reading, so TCP pushes back."""


@dataclass(frozen=True)
class Proxy:
    host: str
    port: int
    one_way_ms: float


@contextlib.contextmanager
def delay_proxy(target: tuple[str, int], one_way_ms: float, listen: str = "127.0.0.1") -> Iterator[Proxy]:
    """A proxy on `listen` forwarding to `target` with `one_way_ms` added each way; stopped on exit."""
    proc = subprocess.Popen(
        child("delayproxy", listen, target[0], str(target[1]), str(one_way_ms)),
        cwd=REPO,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line.strip().isdigit():
            proc.kill()
            raise RuntimeError(f"the delay proxy did not start: {line}{proc.communicate()[1]}".strip())
        yield Proxy(listen, int(line), one_way_ms)
    finally:
        proc.terminate()
        try:
            proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: float) -> None:
    """Copy `reader` to `writer`, each chunk written `delay` seconds after it was read."""
    queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue(_QUEUED)

    async def send() -> None:
        while True:
            due, data = await queue.get()
            await asyncio.sleep(due - time.monotonic())
            if not data:
                if writer.can_write_eof():
                    writer.write_eof()
                return
            writer.write(data)
            await writer.drain()

    sender = asyncio.create_task(send())
    try:
        while True:
            data = await reader.read(_CHUNK)
            await queue.put((time.monotonic() + delay, data))
            if not data:
                break
        await sender
    finally:
        sender.cancel()


async def _serve(listen: str, target_host: str, target_port: int, delay: float) -> None:
    async def connection(client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        try:
            server_r, server_w = await asyncio.open_connection(target_host, target_port)
        except OSError:
            client_w.close()
            return
        for w in (client_w, server_w):
            w.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            async with asyncio.TaskGroup() as pumps:
                pumps.create_task(_pump(client_r, server_w, delay))
                pumps.create_task(_pump(server_r, client_w, delay))
        except* OSError:
            pass  # a reset on either side ends the connection on both
        finally:
            client_w.close()
            server_w.close()

    server = await asyncio.start_server(connection, listen, 0)
    print(server.sockets[0].getsockname()[1], flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    if len(sys.argv) != 5:
        sys.exit(__doc__)
    asyncio.run(_serve(sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4]) / 1000))

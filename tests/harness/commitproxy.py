"""A TCP proxy to PostgreSQL that loses a COMMIT, or its reply, on demand: the faults a lost
connection makes around a transaction's commit point (tests/test_registry_postgresql.py, the
round-trip tests, the torture over three hosts).

Armed with `reply`, the next COMMIT that passes reaches the server, and the connection is closed
on both sides before the server's answer reaches the client (it cannot know whether it
committed). Armed with `commit`, the connection is closed before the COMMIT reaches the server.
Statements are recognised by their text on the wire (`COMMIT` followed by the message's NUL)."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from typing import Literal

Lost = Literal["reply", "commit"]


class CommitProxy:
    """Listens on `listen` (an ephemeral port: `port`, `address`) and forwards to `target`."""

    def __init__(self, target: tuple[str, int], listen: str = "127.0.0.1") -> None:
        self.target = target
        self.server = socket.create_server((listen, 0))
        self.port = int(self.server.getsockname()[1])
        self.address = (listen, self.port)
        self.armed: Lost | None = None
        """What the next COMMIT loses; set it to arm the proxy (it disarms itself at that COMMIT)."""
        self.dropped: list[Lost] = []
        """What each COMMIT it cut lost, in order."""
        self.drops: list[float] = []
        """When each COMMIT or reply was lost (time.time)."""
        self.sent = 0
        """Bytes passed on from clients to the server."""
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()
        threading.Thread(target=self._accept, daemon=True).start()

    def drop_reply(self, timeout: float = 20.0) -> bool:
        """Lose the reply of the next COMMIT; whether one passed within `timeout` seconds."""
        before = len(self.drops)
        with self._lock:
            self.armed = "reply"
        deadline = time.monotonic() + timeout
        while len(self.drops) == before and time.monotonic() < deadline:
            time.sleep(0.01)
        with self._lock:
            self.armed = None
        return len(self.drops) > before

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
                upstream = socket.create_connection(self.target)
            except OSError:
                return
            with self._lock:
                self._sockets |= {client, upstream}
            state = {"swallow": False}
            threading.Thread(target=self._up, args=(client, upstream, state), daemon=True).start()
            threading.Thread(target=self._down, args=(upstream, client, state), daemon=True).start()

    def _close(self, *socks: socket.socket) -> None:
        for s in socks:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()
            with self._lock:
                self._sockets.discard(s)

    def _up(self, client: socket.socket, upstream: socket.socket, state: dict[str, bool]) -> None:
        while data := _recv(client):
            if b"COMMIT\x00" in data:
                with self._lock:
                    lost, self.armed = self.armed, None
                if lost is not None:
                    self.dropped.append(lost)
                if lost == "commit":
                    self.drops.append(time.time())
                    break
                state["swallow"] = lost == "reply"
            try:
                upstream.sendall(data)
            except OSError:
                break
            with self._lock:
                self.sent += len(data)
        self._close(client, upstream)

    def _down(self, upstream: socket.socket, client: socket.socket, state: dict[str, bool]) -> None:
        while data := _recv(upstream):
            if state["swallow"]:  # the server's answer to the COMMIT: the client never hears it
                self.drops.append(time.time())
                break
            try:
                client.sendall(data)
            except OSError:
                break
        self._close(client, upstream)

    def close(self) -> None:
        """Accept no connection any more (shutdown wakes the accepting thread; close alone would
        not); the connections through it go on."""
        with contextlib.suppress(OSError):
            self.server.shutdown(socket.SHUT_RDWR)
        self.server.close()

    def cut(self) -> None:
        """Close every connection through the proxy."""
        with self._lock:
            open_ = list(self._sockets)
        self._close(*open_)


def _recv(s: socket.socket) -> bytes:
    try:
        return s.recv(65536)
    except OSError:
        return b""

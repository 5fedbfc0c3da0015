"""A lean HTTP/1.1 POST client for the open-loop load generator (``traffic.open_loop``).

Why not aiohttp: the load generator runs on the same 2 cores as the servers it measures. At 3x
the app's saturation (~1,900 req/s) aiohttp's per-request cost (~0.3 ms of CPU with its task,
headers object and cookie handling) took 0.5-1 core, and the overload figure measured the
client starving the server. This client keeps what a load generator needs and nothing else: a
pool of kept-alive connections (``asyncio.Protocol``, no stream objects), one pre-encoded request
head per path, and a response parser that reads the status line, ``Content-Length`` (or chunked
framing), ``Retry-After`` and ``Connection: close``. It is the same client for every system a
benchmark compares (rayrec's app and the FastAPI baseline), so ratios stay like for like.

Example::

    async with LeanClient("http://127.0.0.1:8340") as client:
        status, body, retry_after = await client.post_json("/recommend", {"user_id": 1}, timeout_s=10)
"""

from __future__ import annotations

import asyncio
import json
from urllib.parse import urlsplit


class _Connection(asyncio.Protocol):
    """One kept-alive connection: at most one request in flight, its answer parsed from bytes."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.waiter: asyncio.Future | None = None
        self.reusable = True

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.reusable = False
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ConnectionError("connection closed before the answer"))

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if self.waiter is None or self.waiter.done():
            return
        parsed = self._parse()
        if parsed is not None:
            self.waiter.set_result(parsed)

    def _parse(self) -> tuple[int, bytes, str | None] | None:
        """The whole answer once it is in the buffer (consumed from it), else None."""
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            return None
        lines = bytes(self.buffer[:end]).split(b"\r\n")
        status = int(lines[0].split(b" ", 2)[1])
        length, chunked, retry_after = 0, False, None
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"transfer-encoding" and b"chunked" in value.lower():
                chunked = True
            elif name == b"retry-after":
                retry_after = value.strip().decode()
            elif name == b"connection" and value.strip().lower() == b"close":
                self.reusable = False
        start = end + 4
        if chunked:
            body, consumed = _dechunk(self.buffer, start)
            if body is None:
                return None
            del self.buffer[:consumed]
            return status, body, retry_after
        if len(self.buffer) < start + length:
            return None
        body = bytes(self.buffer[start : start + length])
        del self.buffer[: start + length]
        return status, body, retry_after


def _dechunk(buffer: bytearray, at: int) -> tuple[bytes | None, int]:
    """(body, bytes consumed) of a complete chunked body starting at ``at``; (None, 0) if partial."""
    parts = []
    while True:
        line_end = buffer.find(b"\r\n", at)
        if line_end < 0:
            return None, 0
        size = int(bytes(buffer[at:line_end]).split(b";")[0], 16)
        at = line_end + 2
        if size == 0:
            trailer_end = buffer.find(b"\r\n", at)
            return (b"".join(parts), trailer_end + 2) if trailer_end >= 0 else (None, 0)
        if len(buffer) < at + size + 2:
            return None, 0
        parts.append(bytes(buffer[at : at + size]))
        at += size + 2


class LeanClient:
    """POSTs JSON bodies over a pool of kept-alive connections (up to ``limit`` open)."""

    def __init__(self, url: str, limit: int = 512) -> None:
        parts = urlsplit(url)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 80
        self._idle: list[_Connection] = []
        self._slots = asyncio.Semaphore(limit)
        self._heads: dict[str, bytes] = {}

    async def __aenter__(self) -> "LeanClient":
        return self

    async def __aexit__(self, *exc) -> None:
        for conn in self._idle:
            if conn.transport is not None:
                conn.transport.close()
        self._idle.clear()

    def _head(self, path: str, length: int) -> bytes:
        prefix = self._heads.get(path)
        if prefix is None:
            prefix = (f"POST {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
                      "Content-Type: application/json\r\nContent-Length: ").encode()  # fmt: skip
            self._heads[path] = prefix
        return prefix + str(length).encode() + b"\r\n\r\n"

    async def post(self, path: str, body: bytes, timeout_s: float) -> tuple[int, bytes, str | None]:
        """(status, body bytes, Retry-After or None). Raises ``asyncio.TimeoutError`` or
        ``ConnectionError`` (``OSError``); the connection is then dropped, not reused. A kept-alive
        connection the server closes just as the request goes out (its idle timeout racing our
        write: nothing of the answer came back) is retried once on a new connection."""
        async with self._slots:
            for attempt in (0, 1):
                conn, reused = self._take_idle(), True
                if conn is None:
                    _, conn = await asyncio.get_running_loop().create_connection(_Connection, self.host, self.port)
                    reused = False
                try:
                    return await self._exchange(conn, path, body, timeout_s)
                except ConnectionError:
                    if not reused or conn.buffer or attempt:
                        raise
            raise AssertionError("unreachable")

    async def post_json(self, path: str, payload: dict, timeout_s: float) -> tuple[int, dict | None, str | None]:
        """:meth:`post` of ``payload`` as JSON: (status, the parsed body of a 200 else None,
        Retry-After or None); raises as :meth:`post` does."""
        status, raw, retry_after = await self.post(path, json.dumps(payload).encode(), timeout_s)
        return status, json.loads(raw) if status == 200 else None, retry_after

    def _take_idle(self) -> _Connection | None:
        while self._idle:
            conn = self._idle.pop()
            if conn.reusable and conn.transport is not None and not conn.transport.is_closing():
                return conn  # else the server closed it while idle (keep-alive timeout)
        return None

    async def _exchange(self, conn: _Connection, path: str, body: bytes, timeout_s: float) -> tuple[int, bytes, str | None]:
        conn.waiter = asyncio.get_running_loop().create_future()
        try:
            conn.transport.write(self._head(path, len(body)) + body)  # type: ignore[union-attr]
            answer = await asyncio.wait_for(conn.waiter, timeout_s)
        except BaseException:
            conn.reusable = False
            if conn.transport is not None:
                conn.transport.close()
            raise
        finally:
            conn.waiter = None
        if conn.reusable:
            self._idle.append(conn)
        elif conn.transport is not None:
            conn.transport.close()
        return answer

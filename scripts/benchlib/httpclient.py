"""A small HTTP/1.1 keep-alive client on asyncio streams.

It does only what the benchmark needs, cheaply: one request at a time per
connection, bodies with Content-Length (given as one or more buffers, so a
large body can be sent from a shared buffer without building it), and
responses with Content-Length, chunked, or read-until-close bodies.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

Body = bytes | bytearray | memoryview | Sequence[bytes | bytearray | memoryview]

# Largest header block or chunk-size line we accept.
_READ_LIMIT = 1 << 20


class RequestFailed(Exception):
    """The request got no complete response: refused, reset, timed out, malformed."""


@dataclass
class Response:
    status: int
    reason: str
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    body_length: int = 0

    def json(self) -> Any:
        return json.loads(self.body)

    def errcode(self) -> str | None:
        try:
            value = self.json()
        except ValueError:
            return None
        if isinstance(value, dict):
            code = value.get("errcode")
            return code if isinstance(code, str) else None
        return None

    def short(self) -> str:
        text = self.body[:200].decode("utf-8", "replace")
        return f"{self.status} {self.reason}: {text}"


def split_base_url(base_url: str) -> tuple[str, int, str]:
    """``(host, port, path prefix)`` of an ``http://`` base URL."""
    parts = urlsplit(base_url)
    if parts.scheme != "http":
        raise ValueError(f"only http:// base URLs are supported, got {base_url!r}")
    host = parts.hostname or "127.0.0.1"
    return host, parts.port or 80, parts.path.rstrip("/")


class Connection:
    """One keep-alive connection; reconnects lazily after a failure or a close."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        headers: Mapping[str, str] | None = None,
        timeout: float = 60.0,
    ) -> None:
        self.host = host
        self.port = port
        self.timeout = timeout
        host_header = host if port == 80 else f"{host}:{port}"
        fixed = {"Host": host_header, "User-Agent": "mediarepo-bench"}
        fixed.update(headers or {})
        self._fixed_headers = "".join(f"{k}: {v}\r\n" for k, v in fixed.items())
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self.connects = 0

    async def _ensure_open(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if self._reader is None or self._writer is None:
            self._reader, self._writer = await asyncio.open_connection(
                self.host, self.port, limit=_READ_LIMIT
            )
            self.connects += 1
        return self._reader, self._writer

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        self._reader = self._writer = None

    async def request(
        self,
        method: str,
        path: str,
        *,
        headers: Mapping[str, str] | None = None,
        body: Body = b"",
        keep_body: bool = True,
    ) -> Response:
        """Send one request and read its whole response.

        Raises :class:`RequestFailed` (after closing the connection) when no
        complete response arrives within ``timeout`` seconds.
        """
        parts: Sequence[bytes | bytearray | memoryview]
        if isinstance(body, bytes | bytearray | memoryview):
            parts = (body,) if len(body) else ()
        else:
            parts = body
        length = sum(len(p) for p in parts)
        head = [f"{method} {path} HTTP/1.1\r\n", self._fixed_headers]
        if headers:
            head.extend(f"{k}: {v}\r\n" for k, v in headers.items())
        if length or method in ("POST", "PUT"):
            head.append(f"Content-Length: {length}\r\n")
        head.append("\r\n")
        try:
            async with asyncio.timeout(self.timeout):
                reader, writer = await self._ensure_open()
                writer.write("".join(head).encode("latin-1"))
                for part in parts:
                    writer.write(part)
                await writer.drain()
                response = await self._read_response(reader, method, keep_body)
        except (OSError, EOFError, TimeoutError, asyncio.IncompleteReadError) as e:
            self.close()
            raise RequestFailed(f"{type(e).__name__}: {e}") from e
        except (asyncio.LimitOverrunError, ValueError) as e:
            self.close()
            raise RequestFailed(f"malformed response: {e}") from e
        if response.headers.get("connection", "").lower() == "close":
            self.close()
        return response

    async def _read_response(
        self, reader: asyncio.StreamReader, method: str, keep_body: bool
    ) -> Response:
        version, status, reason, headers = await _read_head(reader)
        while 100 <= status < 200:
            # An interim answer such as 100 Continue.
            version, status, reason, headers = await _read_head(reader)
        if version == "HTTP/1.0" and headers.get("connection", "").lower() != "keep-alive":
            headers["connection"] = "close"
        response = Response(status, reason, headers)
        if method == "HEAD" or status in (204, 304):
            return response
        if "chunked" in headers.get("transfer-encoding", "").lower():
            await _read_chunked(reader, response, keep_body)
        elif "content-length" in headers:
            await _read_sized(reader, response, keep_body, int(headers["content-length"]))
        else:
            data = await reader.read()
            response.body_length = len(data)
            response.body = data if keep_body else b""
            headers["connection"] = "close"
        return response


async def _read_head(reader: asyncio.StreamReader) -> tuple[str, int, str, dict[str, str]]:
    """A response's status line and headers: HTTP version, status, reason,
    headers by lower-case name (repeated ones joined with commas)."""
    block = await reader.readuntil(b"\r\n\r\n")
    lines = block.decode("latin-1").split("\r\n")
    status_line = lines[0].split(" ", 2)
    if len(status_line) < 2 or not status_line[0].startswith("HTTP/"):
        raise ValueError(f"bad status line {lines[0]!r}")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if not line:
            continue
        name, _, value = line.partition(":")
        name = name.strip().lower()
        value = value.strip()
        headers[name] = f"{headers[name]}, {value}" if name in headers else value
    reason = status_line[2] if len(status_line) > 2 else ""
    return status_line[0], int(status_line[1]), reason, headers


async def _read_chunked(reader: asyncio.StreamReader, response: Response, keep_body: bool) -> None:
    chunks: list[bytes] = []
    while True:
        size_line = await reader.readuntil(b"\r\n")
        size = int(size_line.split(b";", 1)[0].strip(), 16)
        if size == 0:
            # Trailers, if any, end with an empty line.
            while (await reader.readuntil(b"\r\n")) != b"\r\n":
                pass
            break
        data = await reader.readexactly(size + 2)
        response.body_length += size
        if keep_body:
            chunks.append(data[:-2])
    response.body = b"".join(chunks)


async def _read_sized(
    reader: asyncio.StreamReader, response: Response, keep_body: bool, length: int
) -> None:
    response.body_length = length
    if keep_body:
        response.body = await reader.readexactly(length)
        return
    remaining = length
    while remaining:
        data = await reader.read(min(remaining, 1 << 20))
        if not data:
            raise EOFError("connection closed inside the body")
        remaining -= len(data)

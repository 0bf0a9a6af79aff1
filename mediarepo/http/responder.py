"""Writing a stored file as an HTTP response: conditional requests, byte ranges, HEAD."""

from __future__ import annotations

import logging
import re

import attrs

from mediarepo.errors import Codes, MatrixError
from mediarepo.http.headers import MEDIA_CACHE_CONTROL, MEDIA_ETAG, set_media_headers
from mediarepo.http.server import respond_error
from mediarepo.http.site import MediaRequest
from mediarepo.media.responder import Responder

logger = logging.getLogger(__name__)

_SINGLE_RANGE = re.compile(r"\Abytes=\s*(\d*)\s*-\s*(\d*)\s*\Z")


@attrs.frozen
class ByteRange:
    start: int
    length: int


class UnsatisfiableRange(Exception):
    pass


def parse_range(header: str | None, size: int) -> ByteRange | None:
    """The one byte range a ``Range`` header asks for, or ``None`` for the
    whole file. Malformed and multi-range headers are ignored, as RFC 9110
    allows; a range starting past the end raises :class:`UnsatisfiableRange`."""
    if header is None:
        return None
    match = _SINGLE_RANGE.match(header)
    if match is None:
        return None
    first, last = match.group(1), match.group(2)
    if not first and not last:
        return None
    if not first:
        suffix = int(last)
        if suffix == 0 or size == 0:
            raise UnsatisfiableRange()
        suffix = min(suffix, size)
        return ByteRange(size - suffix, suffix)
    start = int(first)
    if last and int(last) < start:
        return None
    if start >= size:
        raise UnsatisfiableRange()
    end = int(last) if last else size - 1
    end = min(end, size - 1)
    return ByteRange(start, end - start + 1)


def _header(request: MediaRequest, name: bytes) -> str | None:
    value = request.getHeader(name)
    return value.decode("latin-1") if isinstance(value, bytes) else value


async def respond_with_responder(
    request: MediaRequest,
    responder: Responder,
    media_type: str | None,
    filename: str | None,
) -> None:
    """Stream ``responder`` as the response, then close it."""
    try:
        if _header(request, b"If-None-Match") == MEDIA_ETAG:
            request.setResponseCode(304)
            request.setHeader("Cache-Control", MEDIA_CACHE_CONTROL)
            request.setHeader("ETag", MEDIA_ETAG)
            request.finish()
            return

        size = responder.size
        range_header = _header(request, b"Range")
        if_range = _header(request, b"If-Range")
        if if_range is not None and if_range != MEDIA_ETAG:
            range_header = None
        try:
            byte_range = parse_range(range_header, size)
        except UnsatisfiableRange:
            request.setHeader("Content-Range", f"bytes */{size}")
            respond_error(
                request,
                MatrixError(416, Codes.INVALID_PARAM, "Requested range is not satisfiable"),
            )
            return

        start, length = (0, size) if byte_range is None else (byte_range.start, byte_range.length)
        set_media_headers(request, media_type, filename, length)
        if byte_range is not None:
            request.setResponseCode(206)
            request.setHeader("Content-Range", f"bytes {start}-{start + length - 1}/{size}")
        if request.method == b"HEAD" or length == 0:
            request.finish()
            return
        try:
            await responder.write_to_consumer(request, start, length)
        except ConnectionError:
            return  # the client went away; nothing left to answer
        except OSError:
            logger.exception("reading media failed mid-response")
            if request.channel is not None:
                request.channel.transport.abortConnection()  # type: ignore[union-attr]
            return
        if not request.disconnected:
            request.finish()
    finally:
        responder.close()

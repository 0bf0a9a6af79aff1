"""Reading a ``multipart/*`` body (RFC 2046) as it arrives, strictly.

:class:`MultipartReader` turns the body, fed piece by piece, into events:
a part's headers, pieces of its content, the closing boundary. It never
holds more than a boundary's length of content back, never buffers more
than the header limit of anything else (a preamble, a part's headers), and
refuses what is not well-formed. What the parts must be is the caller's
business (see :mod:`mediarepo.federation.multipart` for federation media).
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterator, Mapping

import attrs

# Spaces and tabs RFC 2046 allows between a boundary and its line end.
MAX_TRANSPORT_PADDING = 256

# RFC 2046 §5.1.1: 1 to 70 of these, not ending in a space.
_BOUNDARY = re.compile(r"\A[0-9A-Za-z'()+_,\-./:=? ]{0,69}[0-9A-Za-z'()+_,\-./:=?]\Z")
_TOKEN_PATTERN = r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_TOKEN = re.compile(rf"\A{_TOKEN_PATTERN}\Z")
# One ``; name=value`` parameter of a media type.
_PARAM = re.compile(rf';[ \t]*({_TOKEN_PATTERN})=("(?:[^"\\]|\\.)*"|{_TOKEN_PATTERN})[ \t]*')
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
_WHITESPACE = b" \t"


class MultipartError(ValueError):
    """A body that is not well-formed multipart, or not what was expected."""


def is_boundary(value: str) -> bool:
    return _BOUNDARY.match(value) is not None


def is_token(value: str) -> bool:
    return _TOKEN.match(value) is not None


def media_type_params(value: str) -> tuple[str, dict[str, str]]:
    """``type/subtype`` (lowercased) and its parameters (names lowercased,
    values unquoted) from a Content-Type value; strict about the syntax."""
    main, sep, rest = value.partition(";")
    media_type = main.strip(" \t").lower()
    kind, slash, sub = media_type.partition("/")
    if not slash or not _TOKEN.match(kind) or not _TOKEN.match(sub):
        raise MultipartError(f"malformed media type {value!r}")
    params: dict[str, str] = {}
    rest = sep + rest
    pos = 0
    while pos < len(rest):
        match = _PARAM.match(rest, pos)
        if match is None:
            raise MultipartError(f"malformed parameters in {value!r}")
        name, raw = match.group(1).lower(), match.group(2)
        if raw.startswith('"'):
            raw = re.sub(r"\\(.)", r"\1", raw[1:-1])
        if name in params:
            raise MultipartError(f"repeated parameter {name!r} in {value!r}")
        params[name] = raw
        pos = match.end()
    return media_type, params


def boundary_of(content_type: str | bytes | None, expected: str = "multipart/mixed") -> str:
    """The boundary a ``Content-Type`` of type ``expected`` declares."""
    if isinstance(content_type, bytes):
        content_type = content_type.decode("latin-1")
    if not content_type:
        raise MultipartError("no Content-Type")
    media_type, params = media_type_params(content_type)
    if media_type != expected:
        raise MultipartError(f"Content-Type is {media_type}, not {expected}")
    boundary = params.get("boundary")
    if boundary is None:
        raise MultipartError("Content-Type has no boundary")
    if not _BOUNDARY.match(boundary):
        raise MultipartError(f"{boundary!r} is not a valid boundary")
    return boundary


def _decode_header(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        # Old-style headers are ISO-8859-1; nothing in them is lost this way.
        return raw.decode("latin-1")


@attrs.frozen
class PartStart:
    """A part begins: its number (from 1) and the headers asked for."""

    number: int
    headers: Mapping[str, str]


@attrs.frozen
class PartContent:
    """The next piece of the current part's content."""

    data: bytes


@attrs.frozen
class BodyEnd:
    """The closing boundary (what follows it, the epilogue, is ignored)."""


MultipartEvent = PartStart | PartContent | BodyEnd

_PREAMBLE = "preamble"
_DELIMITER = "delimiter"  # just after a boundary: "--" or the end of its line
_HEADERS = "headers"
_CONTENT = "content"
_DONE = "done"


class MultipartReader:
    """Reads a multipart body as it arrives.

    ``headers_wanted`` (lowercase names) are the part headers reported;
    every header line is checked, the others are then dropped. Once it has
    raised, the reader raises the same error on every call.
    """

    def __init__(
        self,
        content_type_header: str | bytes | None,
        *,
        headers_wanted: Collection[str],
        max_header_bytes: int = 16 * 1024,
    ) -> None:
        self._delimiter = b"\r\n--" + boundary_of(content_type_header).encode("ascii")
        self._wanted = frozenset(headers_wanted)
        self._max_header = max_header_bytes
        # A CRLF is supposed to precede every delimiter: pretending one came
        # before the body lets a body that opens with "--boundary" match too.
        self._buffer = bytearray(b"\r\n")
        # Where the next search of the buffer starts: what was searched
        # already is not searched again, so tiny feeds don't cost quadratic time.
        self._scanned = 0
        self._preamble = 0
        self._state = _PREAMBLE
        self._parts = 0
        self._error: MultipartError | None = None

    @property
    def parts(self) -> int:
        """How many parts have begun."""
        return self._parts

    @property
    def done(self) -> bool:
        """Whether the closing boundary has been read."""
        return self._state == _DONE

    def feed(self, data: bytes) -> Iterator[MultipartEvent]:
        """Take the next piece of the body; the events it completes, as
        they are read (iterate them all). Raises :class:`MultipartError`."""
        if self._error is not None:
            raise self._error
        if self._state == _DONE:
            return
        self._buffer += data
        try:
            while True:
                event, more = self._step()
                if event is not None:
                    yield event
                if not more:
                    return
        except MultipartError as e:
            self._error = e
            self._buffer.clear()
            raise

    # Each step consumes what it can: what it read, and whether another
    # step may follow.

    def _step(self) -> tuple[MultipartEvent | None, bool]:
        if self._state == _PREAMBLE:
            return None, self._step_preamble()
        if self._state == _DELIMITER:
            return self._step_delimiter()
        if self._state == _HEADERS:
            return self._step_headers()
        if self._state == _CONTENT:
            return self._step_content()
        return None, False

    def _consume(self, count: int) -> None:
        del self._buffer[:count]
        self._scanned = 0

    def _find_delimiter(self) -> int:
        start = max(0, self._scanned - len(self._delimiter) + 1)
        index = self._buffer.find(self._delimiter, start)
        if index == -1:
            self._scanned = len(self._buffer)
        return index

    def _step_preamble(self) -> bool:
        index = self._find_delimiter()
        if index == -1:
            # Drop what cannot be the start of a delimiter.
            drop = max(0, len(self._buffer) - len(self._delimiter) + 1)
            self._preamble += drop
            self._consume(drop)
            self._scanned = len(self._buffer)
            if self._preamble > self._max_header:
                raise MultipartError("no boundary at the start of the body")
            return False
        self._preamble += index
        if self._preamble > self._max_header:
            raise MultipartError("no boundary at the start of the body")
        self._consume(index + len(self._delimiter))
        self._state = _DELIMITER
        return True

    def _step_delimiter(self) -> tuple[MultipartEvent | None, bool]:
        buffer = self._buffer
        if len(buffer) < 2:
            return None, False
        if buffer.startswith(b"--"):
            self._state = _DONE
            buffer.clear()
            return BodyEnd(), False
        # RFC 2046 lets spaces and tabs come between a boundary and its CRLF.
        end = buffer.find(b"\r\n")
        if end == -1:
            # Only padding so far, perhaps with the CR of the line end.
            padding = buffer[:-1] if buffer.endswith(b"\r") else buffer
        else:
            padding = buffer[:end]
        if padding.strip(_WHITESPACE):
            raise MultipartError("a boundary is followed by something other than a line end")
        if len(padding) > MAX_TRANSPORT_PADDING:
            raise MultipartError("a boundary line is too long")
        if end == -1:
            return None, False
        self._consume(end + 2)
        self._state = _HEADERS
        return None, True

    def _step_headers(self) -> tuple[MultipartEvent | None, bool]:
        buffer = self._buffer
        if len(buffer) < 2:
            return None, False
        if buffer.startswith(b"\r\n"):
            # A part with no headers at all.
            block = b""
            self._consume(2)
        else:
            end = buffer.find(b"\r\n\r\n", max(0, self._scanned - 3))
            if end == -1:
                self._scanned = len(buffer)
                if len(buffer) > self._max_header:
                    raise MultipartError(f"part headers exceed {self._max_header} bytes")
                return None, False
            if end + 4 > self._max_header:
                raise MultipartError(f"part headers exceed {self._max_header} bytes")
            block = bytes(buffer[:end])
            self._consume(end + 4)
        self._parts += 1
        self._state = _CONTENT
        return PartStart(self._parts, self._parse_headers(block)), True

    def _parse_headers(self, block: bytes) -> dict[str, str]:
        """The wanted headers, by lowercased name; every line is checked."""
        headers: dict[str, str] = {}
        if not block:
            return headers
        for line in block.split(b"\r\n"):
            if line[:1] in (b" ", b"\t"):
                raise MultipartError("folded part header")
            raw_name, colon, raw_value = line.partition(b":")
            name = raw_name.decode("latin-1")
            if not colon or not _TOKEN.match(name):
                raise MultipartError(f"malformed part header {line[:64]!r}")
            value = _decode_header(raw_value.strip(_WHITESPACE))
            if _CONTROL.search(value):
                raise MultipartError(f"control character in part header {name}")
            name = name.lower()
            if name not in self._wanted:
                continue
            if name in headers:
                raise MultipartError(f"repeated part header {name}")
            if not value:
                raise MultipartError(f"empty part header {name}")
            headers[name] = value
        return headers

    def _step_content(self) -> tuple[MultipartEvent | None, bool]:
        buffer = self._buffer
        index = self._find_delimiter()
        if index != -1:
            content = bytes(buffer[:index])
            self._consume(index + len(self._delimiter))
            self._state = _DELIMITER
            return (PartContent(content) if content else None), True
        # Hold back only a tail that could be the start of the delimiter.
        keep_from = len(buffer)
        for start in range(max(0, len(buffer) - len(self._delimiter) + 1), len(buffer)):
            if buffer[start] == 0x0D and self._delimiter.startswith(buffer[start:]):
                keep_from = start
                break
        content = bytes(buffer[:keep_from])
        self._consume(keep_from)
        return (PartContent(content) if content else None), False

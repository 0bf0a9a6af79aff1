"""The ``multipart/mixed`` body of federation media answers (Matrix 1.11,
MSC3916): a JSON metadata part, then either the file or a ``Location``
header saying where to fetch it.

The writer produces Synapse's byte layout, but writes every part header
before any file byte, so a zero-byte file still gives a well-formed body
(Synapse writes them lazily and loses them). The parser reads an answer
incrementally and strictly: it never holds more than a boundary's length of
file data back, never buffers more than the header limit (or the metadata
limit) of anything else, and refuses any answer that is not exactly the two
parts the spec describes.
"""

from __future__ import annotations

import json
import re
import uuid
from typing import Any

import attrs

# The metadata part is ``{}`` today; a little room for MSC3911's additions.
MAX_METADATA_BYTES = 64 * 1024
# Spaces and tabs RFC 2046 allows between a boundary and its line end.
MAX_TRANSPORT_PADDING = 256

# RFC 2046 §5.1.1: 1 to 70 of these, not ending in a space.
_BOUNDARY = re.compile(r"\A[0-9A-Za-z'()+_,\-./:=? ]{0,69}[0-9A-Za-z'()+_,\-./:=?]\Z")
_TOKEN_PATTERN = r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_TOKEN = re.compile(rf"\A{_TOKEN_PATTERN}\Z")
# One ``; name=value`` parameter of a media type.
_PARAM = re.compile(rf';[ \t]*({_TOKEN_PATTERN})=("(?:[^"\\]|\\.)*"|{_TOKEN_PATTERN})[ \t]*')
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
_ESCAPED = re.compile(r"[\x00-\x1f\x7f]")
_WHITESPACE = b" \t"


class MultipartError(ValueError):
    """A body that is not a well-formed federation media answer."""


class MultipartTooLargeError(MultipartError):
    """The file part is over the size limit (the caller's ``M_TOO_LARGE``)."""


# ---------------------------------------------------------------- writing


def new_boundary() -> str:
    """A fresh boundary: 32 hex digits, which cannot occur by chance in a
    file and need no quoting."""
    return uuid.uuid4().hex


def multipart_content_type(boundary: str) -> str:
    # A boundary may hold characters a bare parameter value may not (RFC
    # 2046's ":", "/", "=", "?", spaces...); none of them needs escaping
    # inside quotes.
    if not _TOKEN.match(boundary):
        boundary = f'"{boundary}"'
    return f"multipart/mixed; boundary={boundary}"


def _header_value(value: str) -> bytes:
    """``value`` with every control character (CR and LF above all)
    percent-encoded, so it cannot end its header line or start another."""
    return _ESCAPED.sub(lambda m: f"%{ord(m.group()):02X}", value).encode("utf-8")


def _checked_boundary(boundary: str, metadata: bytes) -> bytes:
    if not _BOUNDARY.match(boundary):
        raise ValueError(f"{boundary!r} is not a multipart boundary")
    delimiter = b"\r\n--" + boundary.encode("ascii")
    if delimiter in b"\r\n" + metadata:
        raise ValueError("the metadata holds the boundary")
    return delimiter


def _metadata_part(delimiter: bytes, metadata: bytes) -> bytes:
    return delimiter + b"\r\nContent-Type: application/json\r\n\r\n" + metadata


def multipart_head(
    boundary: str, media_type: str, disposition: str, metadata: bytes = b"{}"
) -> bytes:
    """Everything before the file's bytes: the metadata part and the file
    part's headers. The file bytes and :func:`multipart_tail` follow."""
    delimiter = _checked_boundary(boundary, metadata)
    return (
        _metadata_part(delimiter, metadata)
        + delimiter
        + b"\r\nContent-Type: "
        + _header_value(media_type)
        + b"\r\nContent-Disposition: "
        + _header_value(disposition)
        + b"\r\n\r\n"
    )


def multipart_tail(boundary: str) -> bytes:
    """The closing boundary, after the file's bytes."""
    return _checked_boundary(boundary, b"") + b"--\r\n"


def multipart_redirect(boundary: str, location: str, metadata: bytes = b"{}") -> bytes:
    """A whole body sending the requester to ``location`` for the file."""
    delimiter = _checked_boundary(boundary, metadata)
    return (
        _metadata_part(delimiter, metadata)
        + delimiter
        + b"\r\nLocation: "
        + _header_value(location)
        + b"\r\n\r\n"
        + delimiter
        + b"--\r\n"
    )


# ---------------------------------------------------------------- parsing


@attrs.frozen
class FilePart:
    """The second part's headers: a file's type and disposition, or the
    ``Location`` it is to be fetched from (then both others are ``None``)."""

    media_type: str | None
    disposition: str | None
    location: str | None


def _media_type_params(value: str) -> tuple[str, dict[str, str]]:
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


def _boundary_of(content_type: str | bytes | None) -> str:
    if isinstance(content_type, bytes):
        content_type = content_type.decode("latin-1")
    if not content_type:
        raise MultipartError("no Content-Type")
    media_type, params = _media_type_params(content_type)
    if media_type != "multipart/mixed":
        raise MultipartError(f"Content-Type is {media_type}, not multipart/mixed")
    boundary = params.get("boundary")
    if boundary is None:
        raise MultipartError("Content-Type has no boundary")
    if not _BOUNDARY.match(boundary):
        raise MultipartError(f"{boundary!r} is not a valid boundary")
    return boundary


def _is_json_type(value: str) -> bool:
    """``application/json``, with at most a UTF-8 charset (JSON is UTF-8
    anyway, RFC 8259)."""
    try:
        media_type, params = _media_type_params(value)
    except MultipartError:
        return False
    charset = params.pop("charset", "utf-8").lower()
    return media_type == "application/json" and not params and charset in ("utf-8", "utf8")


def _decode_header(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        # Old-style headers are ISO-8859-1; nothing in them is lost this way.
        return raw.decode("latin-1")


_PREAMBLE = "preamble"
_DELIMITER = "delimiter"  # just after a boundary: "--" or the end of its line
_HEADERS = "headers"
_METADATA = "metadata"
_FILE = "file"
_DONE = "done"

_KNOWN_HEADERS = ("content-type", "content-disposition", "location")


class MultipartParser:
    """Reads a federation ``multipart/mixed`` answer as it arrives.

    :meth:`feed` takes the body piece by piece and gives back the file
    bytes it has made sure of; :meth:`finish` checks the answer was whole.
    Once it has raised, the parser raises the same error on every call.
    """

    def __init__(
        self,
        content_type_header: str | bytes | None,
        max_file_bytes: int,
        max_header_bytes: int = 16 * 1024,
    ) -> None:
        self._delimiter = b"\r\n--" + _boundary_of(content_type_header).encode("ascii")
        self._max_file = max_file_bytes
        self._max_header = max_header_bytes
        # A CRLF is supposed to precede every delimiter: pretending one came
        # before the body lets a body that opens with "--boundary" match too.
        self._buffer = bytearray(b"\r\n")
        # Where the next search of the buffer starts: what was searched
        # already is not searched again, so tiny feeds don't cost quadratic time.
        self._scanned = 0
        self._preamble = 0
        self._state = _PREAMBLE
        self._part = 0
        self._file_bytes = 0
        self._metadata: dict[str, Any] | None = None
        self._file_part: FilePart | None = None
        self._error: MultipartError | None = None

    @property
    def file_part(self) -> FilePart | None:
        """The second part's headers, once they have been read."""
        return self._file_part

    @property
    def metadata(self) -> dict[str, Any] | None:
        """The first part's JSON object, once it has been read."""
        return self._metadata

    @property
    def file_bytes(self) -> int:
        """How many file bytes :meth:`feed` has given back."""
        return self._file_bytes

    def feed(self, data: bytes) -> list[bytes]:
        """Take the next piece of the body; the file bytes now known to be
        file bytes (possibly none). Raises :class:`MultipartError`."""
        if self._error is not None:
            raise self._error
        if self._state == _DONE:
            return []
        self._buffer += data
        out: list[bytes] = []
        try:
            while self._step(out):
                pass
        except MultipartError as e:
            self._error = e
            self._buffer.clear()
            raise
        return out

    def finish(self) -> FilePart:
        """Call at the end of the body: the file part's headers, if the
        answer was whole. Raises :class:`MultipartError`."""
        if self._error is not None:
            raise self._error
        if self._state != _DONE or self._file_part is None:
            if self._part < 2:
                self._error = MultipartError("the body ended before the file part")
            else:
                self._error = MultipartError("the body ended before its closing boundary")
            raise self._error
        return self._file_part

    # Each step consumes what it can and says whether another may follow.

    def _step(self, out: list[bytes]) -> bool:
        if self._state == _PREAMBLE:
            return self._step_preamble()
        if self._state == _DELIMITER:
            return self._step_delimiter()
        if self._state == _HEADERS:
            return self._step_headers()
        if self._state == _METADATA:
            return self._step_metadata()
        if self._state == _FILE:
            return self._step_file(out)
        return False

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

    def _step_delimiter(self) -> bool:
        buffer = self._buffer
        if len(buffer) < 2:
            return False
        if buffer.startswith(b"--"):
            if self._part < 2:
                raise MultipartError("the body closes before its file part")
            self._state = _DONE
            # The epilogue is ignored.
            buffer.clear()
            return False
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
            return False
        self._consume(end + 2)
        self._part += 1
        if self._part > 2:
            raise MultipartError("the body has more than two parts")
        self._state = _HEADERS
        return True

    def _step_headers(self) -> bool:
        buffer = self._buffer
        if len(buffer) < 2:
            return False
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
                return False
            if end + 4 > self._max_header:
                raise MultipartError(f"part headers exceed {self._max_header} bytes")
            block = bytes(buffer[:end])
            self._consume(end + 4)
        headers = self._parse_headers(block)
        if self._part == 1:
            content_type = headers.get("content-type")
            if content_type is None or not _is_json_type(content_type):
                raise MultipartError("the first part is not application/json")
            self._state = _METADATA
        else:
            location = headers.get("location")
            if location is not None:
                self._file_part = FilePart(media_type=None, disposition=None, location=location)
            else:
                self._file_part = FilePart(
                    media_type=headers.get("content-type"),
                    disposition=headers.get("content-disposition"),
                    location=None,
                )
            self._state = _FILE
        return True

    def _parse_headers(self, block: bytes) -> dict[str, str]:
        """The headers we use, by lowercased name; every line is checked."""
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
            if name not in _KNOWN_HEADERS:
                continue
            if name in headers:
                raise MultipartError(f"repeated part header {name}")
            if not value:
                raise MultipartError(f"empty part header {name}")
            headers[name] = value
        return headers

    def _step_metadata(self) -> bool:
        index = self._find_delimiter()
        if index == -1:
            if len(self._buffer) > MAX_METADATA_BYTES + len(self._delimiter):
                raise MultipartError(f"the metadata part exceeds {MAX_METADATA_BYTES} bytes")
            return False
        if index > MAX_METADATA_BYTES:
            raise MultipartError(f"the metadata part exceeds {MAX_METADATA_BYTES} bytes")
        try:
            metadata = json.loads(bytes(self._buffer[:index]))
        except ValueError as e:
            raise MultipartError("the metadata part is not JSON") from e
        if not isinstance(metadata, dict):
            raise MultipartError("the metadata part is not a JSON object")
        self._metadata = metadata
        self._consume(index + len(self._delimiter))
        self._state = _DELIMITER
        return True

    def _step_file(self, out: list[bytes]) -> bool:
        buffer = self._buffer
        index = buffer.find(self._delimiter)
        if index != -1:
            self._emit(bytes(buffer[:index]), out)
            self._consume(index + len(self._delimiter))
            self._state = _DELIMITER
            return True
        # Hold back only a tail that could be the start of the delimiter.
        keep_from = len(buffer)
        for start in range(max(0, len(buffer) - len(self._delimiter) + 1), len(buffer)):
            if buffer[start] == 0x0D and self._delimiter.startswith(buffer[start:]):
                keep_from = start
                break
        self._emit(bytes(buffer[:keep_from]), out)
        self._consume(keep_from)
        return False

    def _emit(self, data: bytes, out: list[bytes]) -> None:
        if not data:
            return
        assert self._file_part is not None
        if self._file_part.location is not None:
            raise MultipartError("the Location part has a body")
        self._file_bytes += len(data)
        if self._file_bytes > self._max_file:
            raise MultipartTooLargeError(f"the file part is too large (> {self._max_file} bytes)")
        out.append(data)

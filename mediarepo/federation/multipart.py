"""The ``multipart/mixed`` body of federation media answers (Matrix 1.11,
MSC3916): a JSON metadata part, then either the file or a ``Location``
header saying where to fetch it.

The writer produces Synapse's byte layout, but writes every part header
before any file byte, so a zero-byte file still gives a well-formed body
(Synapse writes them lazily and loses them). The parser reads an answer
incrementally over the outbound client's strict multipart reader
(:mod:`mediarepo.outbound.multipart`), never buffering more than the
metadata limit, and refuses any answer that is not exactly the two parts
the spec describes.
"""

from __future__ import annotations

import json
import re
import uuid
from typing import Any

import attrs

from mediarepo.outbound.multipart import (
    BodyEnd,
    MultipartEvent,
    MultipartReader,
    PartStart,
    is_boundary,
    is_token,
    media_type_params,
)
from mediarepo.outbound.multipart import MultipartError as MultipartError

# The metadata part is ``{}`` today; a little room for MSC3911's additions.
MAX_METADATA_BYTES = 64 * 1024

_ESCAPED = re.compile(r"[\x00-\x1f\x7f]")


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
    if not is_token(boundary):
        boundary = f'"{boundary}"'
    return f"multipart/mixed; boundary={boundary}"


def _header_value(value: str) -> bytes:
    """``value`` with every control character (CR and LF above all)
    percent-encoded, so it cannot end its header line or start another."""
    return _ESCAPED.sub(lambda m: f"%{ord(m.group()):02X}", value).encode("utf-8")


def _checked_boundary(boundary: str, metadata: bytes) -> bytes:
    if not is_boundary(boundary):
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


def _is_json_type(value: str) -> bool:
    """``application/json``, with at most a UTF-8 charset (JSON is UTF-8
    anyway, RFC 8259)."""
    try:
        media_type, params = media_type_params(value)
    except MultipartError:
        return False
    charset = params.pop("charset", "utf-8").lower()
    return media_type == "application/json" and not params and charset in ("utf-8", "utf8")


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
        self._reader = MultipartReader(
            content_type_header, headers_wanted=_KNOWN_HEADERS, max_header_bytes=max_header_bytes
        )
        self._max_file = max_file_bytes
        self._metadata_bytes = bytearray()
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
        out: list[bytes] = []
        try:
            for event in self._reader.feed(data):
                self._take(event, out)
        except MultipartError as e:
            self._error = e
            raise
        return out

    def finish(self) -> FilePart:
        """Call at the end of the body: the file part's headers, if the
        answer was whole. Raises :class:`MultipartError`."""
        if self._error is not None:
            raise self._error
        if not self._reader.done or self._file_part is None:
            if self._reader.parts < 2:
                self._error = MultipartError("the body ended before the file part")
            else:
                self._error = MultipartError("the body ended before its closing boundary")
            raise self._error
        return self._file_part

    def _take(self, event: MultipartEvent, out: list[bytes]) -> None:
        if isinstance(event, BodyEnd):
            if self._reader.parts < 2:
                raise MultipartError("the body closes before its file part")
        elif isinstance(event, PartStart):
            self._start_part(event)
        elif self._reader.parts == 1:
            self._metadata_bytes += event.data
            if len(self._metadata_bytes) > MAX_METADATA_BYTES:
                raise MultipartError(f"the metadata part exceeds {MAX_METADATA_BYTES} bytes")
        else:
            self._emit(event.data, out)

    def _start_part(self, part: PartStart) -> None:
        if part.number > 2:
            raise MultipartError("the body has more than two parts")
        headers = part.headers
        if part.number == 1:
            content_type = headers.get("content-type")
            if content_type is None or not _is_json_type(content_type):
                raise MultipartError("the first part is not application/json")
            return
        self._metadata = self._parsed_metadata()
        location = headers.get("location")
        if location is not None:
            self._file_part = FilePart(media_type=None, disposition=None, location=location)
        else:
            self._file_part = FilePart(
                media_type=headers.get("content-type"),
                disposition=headers.get("content-disposition"),
                location=None,
            )

    def _parsed_metadata(self) -> dict[str, Any]:
        try:
            metadata = json.loads(bytes(self._metadata_bytes))
        except ValueError as e:
            raise MultipartError("the metadata part is not JSON") from e
        if not isinstance(metadata, dict):
            raise MultipartError("the metadata part is not a JSON object")
        self._metadata_bytes.clear()
        return metadata

    def _emit(self, data: bytes, out: list[bytes]) -> None:
        assert self._file_part is not None
        if self._file_part.location is not None:
            raise MultipartError("the Location part has a body")
        self._file_bytes += len(data)
        if self._file_bytes > self._max_file:
            raise MultipartTooLargeError(f"the file part is too large (> {self._max_file} bytes)")
        out.append(data)

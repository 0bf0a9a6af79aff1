"""``Authorization: X-Matrix`` request signatures, both ways.

A federation request is authenticated by signing a JSON object describing it
(method, request-target, origin, destination and any JSON body) with the
origin's ed25519 key; the signature travels in the ``Authorization`` header.
Nothing here does I/O: finding the origin's key is the keyring's job.

The header parser is deliberately stricter than HTTP needs to be: every
header it accepts is one a real server sends, and everything else is refused
before any key lookup is spent on it.
"""

from __future__ import annotations

import re
from typing import Any

import attrs
from signedjson.sign import SignatureVerifyException, sign_json, verify_signed_json

from mediarepo.identifiers import is_valid_server_name

SCHEME = "X-Matrix"

# Longer headers are refused unread: a real one is well under 1 KiB.
MAX_HEADER_LENGTH = 8 * 1024

# The only signature algorithm federation uses.
SUPPORTED_ALGORITHM = "ed25519"

# An HTTP token (RFC 9110 §5.6.2): parameter names.
_TOKEN_CHARS = frozenset(
    "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
)
# Unquoted values may also hold ":" (the spec asks recipients to accept
# that, as older servers send ``origin=example.org:8448`` unquoted) and the
# other characters of server names and base64; each value is checked for
# its own syntax afterwards.
_UNQUOTED_CHARS = _TOKEN_CHARS | frozenset(":[]/=")
_WHITESPACE = " \t"
# "<algorithm>:<version>"; versions are wider than the spec's [a-zA-Z0-9_]
# because keys named before it was written are still in use.
_KEY_ID = re.compile(r"\A[A-Za-z0-9_]{1,64}:[A-Za-z0-9_.+/=-]{1,255}\Z")
# Unpadded (or padded) standard or URL-safe base64, as signedjson decodes it.
_SIGNATURE = re.compile(r"\A[A-Za-z0-9+/_-]+={0,2}\Z")
# Printable ASCII and tab: nothing else belongs in any of the values.
_ALLOWED_CHARS = re.compile(r"\A[\t\x20-\x7e]*\Z")

_REQUIRED = ("origin", "key", "sig")


class AuthHeaderError(ValueError):
    """A malformed ``X-Matrix`` header, or one naming an unsupported key
    algorithm. The caller answers 400 ``M_UNAUTHORIZED``."""


@attrs.frozen
class XMatrixAuth:
    """The parameters of one ``X-Matrix`` header."""

    origin: str
    key_id: str
    signature: str
    # Optional on the wire: servers older than Matrix 1.3 don't send it.
    destination: str | None


class _Cursor:
    """A position in a header's text, moved forward as the text is read."""

    def __init__(self, text: str, pos: int) -> None:
        self.text = text
        self.pos = pos

    def at_end(self) -> bool:
        return self.pos >= len(self.text)

    def next_is(self, char: str) -> bool:
        return not self.at_end() and self.text[self.pos] == char

    def take(self, chars: frozenset[str] | str) -> str:
        """The run of ``chars`` from here (possibly empty), read."""
        start = self.pos
        while not self.at_end() and self.text[self.pos] in chars:
            self.pos += 1
        return self.text[start : self.pos]

    def skip_whitespace(self) -> None:
        self.take(_WHITESPACE)

    def read_char(self) -> str | None:
        """The next character, read; ``None`` at the end."""
        if self.at_end():
            return None
        self.pos += 1
        return self.text[self.pos - 1]


def _read_params(text: str, pos: int) -> dict[str, str]:
    """``name=value`` pairs from ``text[pos:]``, comma separated; values
    are unquoted or quoted strings with backslash escapes."""
    cursor = _Cursor(text, pos)
    params: dict[str, str] = {}
    while True:
        name, value = _read_param(cursor)
        if name in params:
            raise AuthHeaderError(f"parameter {name!r} is repeated")
        params[name] = value
        cursor.skip_whitespace()
        if cursor.at_end():
            return params
        if not cursor.next_is(","):
            raise AuthHeaderError(f"unexpected {text[cursor.pos]!r} after parameter {name!r}")
        cursor.pos += 1


def _read_param(cursor: _Cursor) -> tuple[str, str]:
    """One ``name=value``, the name lower-cased."""
    cursor.skip_whitespace()
    name = cursor.take(_TOKEN_CHARS).lower()
    if not name:
        raise AuthHeaderError("expected a parameter name")
    cursor.skip_whitespace()
    if not cursor.next_is("="):
        raise AuthHeaderError(f"parameter {name!r} has no value")
    cursor.pos += 1
    cursor.skip_whitespace()
    if cursor.next_is('"'):
        cursor.pos += 1
        value = _read_quoted(cursor, name)
    else:
        value = cursor.take(_UNQUOTED_CHARS)
    if not value:
        raise AuthHeaderError(f"parameter {name!r} is empty")
    return name, value


def _read_quoted(cursor: _Cursor, name: str) -> str:
    """The rest of a quoted value of parameter ``name``, its closing quote read."""
    chars: list[str] = []
    while True:
        char = cursor.read_char()
        if char == "\\":
            char = cursor.read_char()
        elif char == '"':
            return "".join(chars)
        if char is None:
            raise AuthHeaderError(f"unterminated quoted value of {name!r}")
        chars.append(char)


def parse_x_matrix(header: bytes | str) -> XMatrixAuth:
    """The parameters of an ``Authorization: X-Matrix ...`` value.

    Parameter names are case-insensitive; unknown parameters are ignored, so
    a later version of the spec can add some. Raises :class:`AuthHeaderError`
    for anything malformed.
    """
    text = _header_text(header)
    # Auth schemes are case-insensitive (RFC 9110 §11.1).
    scheme = text[: len(SCHEME)]
    rest = text[len(SCHEME) :]
    if scheme.lower() != SCHEME.lower() or not rest or rest[0] not in _WHITESPACE:
        raise AuthHeaderError("not an X-Matrix Authorization header")
    params = _read_params(text, len(SCHEME))
    for name in _REQUIRED:
        if name not in params:
            raise AuthHeaderError(f"X-Matrix header has no {name!r}")
    origin = params["origin"]
    if not is_valid_server_name(origin):
        raise AuthHeaderError(f"origin {origin!r} is not a server name")
    key_id = params["key"]
    if not _KEY_ID.match(key_id):
        raise AuthHeaderError(f"key {key_id!r} is not <algorithm>:<version>")
    signature = params["sig"]
    if not _SIGNATURE.match(signature):
        raise AuthHeaderError("sig is not base64")
    destination = params.get("destination")
    if destination is not None and not is_valid_server_name(destination):
        raise AuthHeaderError(f"destination {destination!r} is not a server name")
    return XMatrixAuth(origin=origin, key_id=key_id, signature=signature, destination=destination)


def _header_text(header: bytes | str) -> str:
    """The header as text, refused if too long or not printable ASCII."""
    if len(header) > MAX_HEADER_LENGTH:
        raise AuthHeaderError("Authorization header is too long")
    if isinstance(header, bytes):
        try:
            header = header.decode("ascii")
        except UnicodeDecodeError as e:
            raise AuthHeaderError("Authorization header is not ASCII") from e
    if not _ALLOWED_CHARS.match(header):
        raise AuthHeaderError("Authorization header has control or non-ASCII characters")
    return header


def request_json(
    method: str, uri: str, origin: str, destination: str, content: object | None = None
) -> dict[str, Any]:
    """The object whose canonical JSON is signed: ``uri`` is the
    request-target exactly as sent (path and query), ``content`` the JSON
    body if the request has one."""
    obj: dict[str, Any] = {
        "method": method,
        "uri": uri,
        "origin": origin,
        "destination": destination,
    }
    if content is not None:
        obj["content"] = content
    return obj


def _quote(value: str) -> str:
    """A quoted-string: server names may hold ``:`` and ``[]``, which are
    not token characters."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def sign_request(
    signing_key: Any,
    origin: str,
    destination: str,
    method: str,
    uri: str,
    content: object | None = None,
) -> list[str]:
    """The ``Authorization`` header values for a request from ``origin`` to
    ``destination``: one, for ``signing_key`` (a signedjson signing key)."""
    signed = sign_json(request_json(method, uri, origin, destination, content), origin, signing_key)
    key_id = f"{signing_key.alg}:{signing_key.version}"
    signature: str = signed["signatures"][origin][key_id]
    params = [("origin", origin), ("key", key_id), ("sig", signature), ("destination", destination)]
    return [SCHEME + " " + ",".join(f"{name}={_quote(value)}" for name, value in params)]


def verify_request(
    auth: XMatrixAuth,
    method: str,
    uri: str,
    destination: str,
    verify_key: Any,
    content: object | None = None,
) -> bool:
    """Whether ``auth`` is a valid signature by ``verify_key`` (a signedjson
    verify key, named as ``auth.key_id`` names it) of this request.

    ``destination`` is *our* server name, never the header's: a request
    signed for another server must not be accepted here. A bad signature
    gives ``False``; only a key algorithm we cannot check raises
    :class:`AuthHeaderError`.
    """
    algorithm = auth.key_id.partition(":")[0]
    if algorithm != SUPPORTED_ALGORITHM:
        raise AuthHeaderError(f"Not signed with a supported algorithm: {auth.key_id}")
    obj = request_json(method, uri, auth.origin, destination, content)
    obj["signatures"] = {auth.origin: {auth.key_id: auth.signature}}
    try:
        verify_signed_json(obj, auth.origin, verify_key)
    except SignatureVerifyException:
        return False
    return True

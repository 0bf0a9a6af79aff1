"""Matrix errors as types.

Every failure a client may see is a :class:`MatrixError`; ``mediarepo.http.server``
is the one place that turns it into a response.
"""

from __future__ import annotations

from typing import Any


class Codes:
    """The ``errcode`` strings the server sends."""

    UNRECOGNIZED = "M_UNRECOGNIZED"
    NOT_FOUND = "M_NOT_FOUND"
    FORBIDDEN = "M_FORBIDDEN"
    MISSING_TOKEN = "M_MISSING_TOKEN"
    UNKNOWN_TOKEN = "M_UNKNOWN_TOKEN"
    USER_LOCKED = "M_USER_LOCKED"
    USER_SUSPENDED = "M_USER_SUSPENDED"
    GUEST_ACCESS_FORBIDDEN = "M_GUEST_ACCESS_FORBIDDEN"
    TOO_LARGE = "M_TOO_LARGE"
    MISSING_PARAM = "M_MISSING_PARAM"
    INVALID_PARAM = "M_INVALID_PARAM"
    LIMIT_EXCEEDED = "M_LIMIT_EXCEEDED"
    RESOURCE_LIMIT_EXCEEDED = "M_RESOURCE_LIMIT_EXCEEDED"
    NOT_YET_UPLOADED = "M_NOT_YET_UPLOADED"
    CANNOT_OVERWRITE_MEDIA = "M_CANNOT_OVERWRITE_MEDIA"
    UNAUTHORIZED = "M_UNAUTHORIZED"
    UNKNOWN = "M_UNKNOWN"


class MatrixError(Exception):
    """An error with an HTTP status and a Matrix ``errcode``.

    ``extra`` holds additional body fields (``soft_logout``, ``retry_after_ms``);
    ``headers`` holds additional response headers (``Retry-After``).
    """

    def __init__(
        self,
        code: int,
        errcode: str,
        message: str,
        extra: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(f"{code} {errcode}: {message}")
        self.code = code
        self.errcode = errcode
        self.message = message
        self.extra = extra or {}
        self.headers = headers or {}

    def to_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {"errcode": self.errcode, "error": self.message}
        body.update(self.extra)
        return body


class NotFoundError(MatrixError):
    def __init__(self, message: str = "Not found") -> None:
        super().__init__(404, Codes.NOT_FOUND, message)


class DatabaseUnavailableError(MatrixError):
    """The database cannot be reached (down, restarting, cut off): the
    request failed before it could be served and may be tried again."""

    def __init__(self, cause: object) -> None:
        super().__init__(
            503,
            Codes.UNKNOWN,
            "The database is unavailable; try again shortly",
            headers={"Retry-After": "1"},
        )
        # What the logs and start-up failures show; clients see the message only.
        self.args = (f"database unavailable: {cause}",)


class InsufficientStorageError(MatrixError):
    """The media store (or a quota on it) is full: 507, with the errcode the
    Matrix spec gives a server out of disk, and the ``admin_contact`` it asks
    for (Synapse's key; null when unset, as Synapse sends it)."""

    def __init__(self, admin_contact: str | None) -> None:
        super().__init__(
            507,
            Codes.RESOURCE_LIMIT_EXCEEDED,
            "The media store is full; try again later",
            extra={"admin_contact": admin_contact},
        )


class ConfigError(Exception):
    """A configuration value that stops start-up; the message names the key
    and, once known, the file it came from (``source``)."""

    def __init__(self, key: str, problem: str, source: str | None = None) -> None:
        super().__init__(key, problem, source)
        self.key = key
        self.problem = problem
        self.source = source

    def __str__(self) -> str:
        if self.source is not None:
            return f"{self.key} in {self.source}: {self.problem}"
        return f"config key {self.key!r}: {self.problem}"


def one_line(error: object) -> str:
    """An error's message on one line (libpq's, for one, span several): for
    log records and the start-up failure line."""
    return " ".join(str(error).split())

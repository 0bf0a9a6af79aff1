"""Every response-header rule, in one place: Synapse's, except where the spec
asks more of thumbnails (a file name, and the same security headers as
downloads)."""

from __future__ import annotations

from urllib.parse import quote

from twisted.web import http
from twisted.web.http import Request

CORS_HEADERS = {
    "Access-Control-Allow-Origin": "*",
    "Access-Control-Allow-Methods": "GET, HEAD, POST, PUT, DELETE, OPTIONS",
    "Access-Control-Allow-Headers": "X-Requested-With, Content-Type, Authorization, Date",
    "Access-Control-Expose-Headers": "Synapse-Trace-Id, Server",
}

JSON_CACHE_CONTROL = "no-cache, no-store, must-revalidate"
MEDIA_CACHE_CONTROL = "public,max-age=86400,s-maxage=0,proxy-revalidate"
# Media never changes under its ID, so Synapse sends one constant ETag.
MEDIA_ETAG = "1"

# Set on download and thumbnail responses (Synapse: downloads only; the spec
# recommends them whenever content is served), before the media is looked up,
# so that error answers from those paths carry them too.
DOWNLOAD_SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "sandbox; default-src 'none'; script-src 'none'; plugin-types application/pdf;"
        " style-src 'unsafe-inline'; media-src 'self'; object-src 'self';"
    ),
    "X-Content-Security-Policy": "sandbox;",
    "Referrer-Policy": "no-referrer",
}

_TEXT_TYPES_NEEDING_CHARSET = frozenset(
    {
        "text/css",
        "text/csv",
        "text/html",
        "text/calendar",
        "text/plain",
        "text/javascript",
        "application/json",
        "application/ld+json",
        "application/rtf",
        "image/svg+xml",
        "text/xml",
    }
)

# The types the spec deems safe to show in a browser; SVG and HTML are not.
INLINE_CONTENT_TYPES = frozenset(
    {
        "text/css",
        "text/plain",
        "text/csv",
        "application/json",
        "application/ld+json",
        "image/jpeg",
        "image/gif",
        "image/png",
        "image/apng",
        "image/webp",
        "image/avif",
        "video/mp4",
        "video/webm",
        "video/ogg",
        "video/quicktime",
        "audio/mp4",
        "audio/webm",
        "audio/aac",
        "audio/mpeg",
        "audio/ogg",
        "audio/wave",
        "audio/wav",
        "audio/x-wav",
        "audio/x-pn-wav",
        "audio/flac",
        "audio/x-flac",
    }
)

_FILENAME_SEPARATORS = frozenset('()<>@,;:\\"/[]?={}')

# Extensions for thumbnails' file names (spec v1.12: e.g. ``thumbnail.png``).
_THUMBNAIL_EXTENSIONS = {
    "image/jpeg": "jpg",
    "image/png": "png",
    "image/apng": "png",
    "image/webp": "webp",
    "image/gif": "gif",
    "image/avif": "avif",
}


def response_content_type(media_type: str | None) -> str:
    """The Content-Type to send for a stored media type."""
    if not media_type:
        return "application/octet-stream"
    if media_type.lower() in _TEXT_TYPES_NEEDING_CHARSET:
        return f"{media_type}; charset=UTF-8"
    return media_type


def is_inline_type(media_type: str | None) -> bool:
    if not media_type:
        return False
    return media_type.split(";", 1)[0].strip().lower() in INLINE_CONTENT_TYPES


def content_disposition(media_type: str | None, filename: str | None) -> str:
    """``inline`` or ``attachment``, with the file name as Synapse encodes it:
    bare when it is a plain token, ``filename*=utf-8''...`` otherwise."""
    disposition = "inline" if is_inline_type(media_type) else "attachment"
    if not filename:
        return disposition
    if all(33 <= ord(c) <= 126 and c not in _FILENAME_SEPARATORS for c in filename):
        return f"{disposition}; filename={filename}"
    return f"{disposition}; filename*=utf-8''{quote(filename, safe='/')}"


def thumbnail_filename(media_type: str | None) -> str:
    """The file name a thumbnail is served under, from its type."""
    bare = (media_type or "").split(";", 1)[0].strip().lower()
    return f"thumbnail.{_THUMBNAIL_EXTENSIONS.get(bare, 'bin')}"


def thumbnail_content_disposition(media_type: str | None) -> str:
    """Thumbnails are ``inline`` (the spec: MUST) with a file name (SHOULD)."""
    return f"inline; filename={thumbnail_filename(media_type)}"


# Reason phrases Twisted lacks.
_REASONS = {429: b"Too Many Requests"}


def reason_phrase(code: int) -> bytes:
    return http.RESPONSES.get(code) or _REASONS.get(code, b"Error")


def set_json_headers(request: Request, length: int) -> None:
    request.setHeader("Content-Type", "application/json")
    if not request.responseHeaders.hasHeader(b"Cache-Control"):
        request.setHeader("Cache-Control", JSON_CACHE_CONTROL)
    request.setHeader("Content-Length", str(length))


def set_media_security_headers(request: Request) -> None:
    """Content-Security-Policy and Referrer-Policy of downloads and thumbnails."""
    for name, value in DOWNLOAD_SECURITY_HEADERS.items():
        request.setHeader(name, value)


def set_media_headers(
    request: Request,
    media_type: str | None,
    filename: str | None,
    length: int,
    *,
    thumbnail: bool = False,
) -> None:
    """The headers of a file response (download or thumbnail)."""
    request.setHeader("Content-Type", response_content_type(media_type))
    disposition = (
        thumbnail_content_disposition(media_type)
        if thumbnail
        else content_disposition(media_type, filename)
    )
    request.setHeader("Content-Disposition", disposition)
    request.setHeader("Cache-Control", MEDIA_CACHE_CONTROL)
    request.setHeader("ETag", MEDIA_ETAG)
    request.setHeader("X-Robots-Tag", "noindex, nofollow, noarchive, noimageindex")
    request.setHeader("Cross-Origin-Resource-Policy", "cross-origin")
    request.setHeader("Accept-Ranges", "bytes")
    request.setHeader("Content-Length", str(length))

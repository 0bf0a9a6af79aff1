"""Downloads for URL previews: a page, an oEmbed answer or an image, fetched
through the previews' own :class:`OutboundClient` (every resolved address of
every hop checked against ``url_preview_ip_range_*``) and stored as local
media under ``url_cache/`` with its row, as Synapse stores them.

Every failure is a :class:`MatrixError` with the status Synapse gives it
(section 9.3 of the reference), except that an unreachable site is a 502
and a site that does not answer in time a 504 (Synapse says 500).
"""

from __future__ import annotations

import base64
import binascii
import datetime
import fnmatch
import ipaddress
import logging
import re
from collections.abc import Sequence
from urllib.parse import SplitResult, unquote_to_bytes, urlsplit

import attrs
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.web.http_headers import Headers

from mediarepo.config_preview import UrlPattern, UrlPreviewConfig
from mediarepo.errors import Codes, MatrixError
from mediarepo.media.paths import random_letters, url_cache_path
from mediarepo.media.provider_chain import ProviderChain
from mediarepo.media.remote import filename_from_disposition
from mediarepo.outbound import (
    BlockedAddressError,
    BodyReadError,
    BodyTooLargeError,
    IPRangeFilter,
    OutboundClient,
    OutboundRequestError,
    OutboundResponse,
    OutboundSettings,
)
from mediarepo.storage.quarantine_rows import QuarantineRows
from mediarepo.storage.upload_rows import KnownContent, NewUpload, UploadRows
from mediarepo.values import LocalMedia

logger = logging.getLogger(__name__)

# What previews fetch with (Synapse does not disclose its version either).
USER_AGENT = b"mediarepo (bot; Matrix URL previews)"
# Synapse's limits: connecting, then the answer's headers.
CONNECT_TIMEOUT_SECONDS = 15.0
RESPONSE_TIMEOUT_SECONDS = 60.0
# How long a preview is valid unless oEmbed says otherwise (ms).
DEFAULT_EXPIRY_MS = 60 * 60 * 1000
# How long a page's body may take to arrive once its headers have.
BODY_TIMEOUT_SECONDS = 30.0


@attrs.frozen
class Downloaded:
    """A body a preview fetched, stored as URL-cache media (``media``)."""

    media: LocalMedia
    # The URL the body came from, after redirects (what relative links
    # on a page are resolved against).
    final_url: str
    response_code: int
    etag: str | None
    body: bytes

    @property
    def media_id(self) -> str:
        return self.media.media_id

    @property
    def media_type(self) -> str:
        return self.media.media_type or "application/octet-stream"


def preview_client_settings(config: UrlPreviewConfig) -> OutboundSettings:
    """The settings of the previews' own outbound client."""
    return OutboundSettings(
        ip_filter=IPRangeFilter(config.ip_range_blacklist, config.ip_range_whitelist),
        user_agent=USER_AGENT,
        connect_timeout=CONNECT_TIMEOUT_SECONDS,
        response_timeout=RESPONSE_TIMEOUT_SECONDS,
        proxy=config.proxy,
    )


def is_image(media_type: str) -> bool:
    return media_type.lower().startswith("image/")


def is_html(media_type: str) -> bool:
    return media_type.lower().startswith(("text/html", "application/xhtml"))


def is_json(media_type: str) -> bool:
    return media_type.lower().startswith("application/json")


def _previewable(media_type: str) -> bool:
    return is_html(media_type) or is_image(media_type) or is_json(media_type)


def _url_part(url: SplitResult, name: str) -> str | None:
    try:
        value = getattr(url, name)
    except ValueError:  # a port that is not a number
        return None
    return None if value is None else str(value)


def matches_url_pattern(url: str, patterns: Sequence[UrlPattern]) -> bool:
    """Whether ``url_preview_url_blacklist`` refuses ``url``: some entry
    all of whose parts match."""
    split = urlsplit(url)
    for entry in patterns:
        for name, pattern in entry.parts:
            value = _url_part(split, name)
            if value is None:
                break
            if pattern.startswith("^"):
                if not re.match(pattern, value):
                    break
            elif not fnmatch.fnmatch(value, pattern):
                break
        else:
            return True
    return False


_DATA_URL = re.compile(r"data:([^,]*?)(;base64)?,(.*)\Z", re.DOTALL | re.IGNORECASE)


def parse_data_url(url: str) -> tuple[str, bytes]:
    """The media type and bytes of a ``data:`` URL; 500, as Synapse answers,
    for one that cannot be read."""
    match = _DATA_URL.match(url)
    try:
        if match is None:
            raise ValueError("not a data: URL")
        header, encoded, payload = match.groups()
        data = unquote_to_bytes(payload)
        if encoded:
            data = base64.b64decode(data, validate=False)
    except (ValueError, binascii.Error) as e:
        raise MatrixError(500, Codes.UNKNOWN, f"Failed to parse data URL: {e}") from e
    media_type = header.split(";", 1)[0].strip().lower() or "text/plain"
    return media_type, data


def new_url_cache_id(today: datetime.date) -> str:
    """A URL-cache media ID as Synapse makes them: the date, then 16 letters."""
    return f"{today.isoformat()}_{random_letters(16)}"


def _is_ip_literal(url: str) -> bool:
    host = urlsplit(url).hostname or ""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


class PreviewDownloader:
    def __init__(
        self,
        client: OutboundClient,
        storage: ProviderChain,
        uploads: UploadRows,
        quarantine: QuarantineRows,
        clock: IReactorTime,
        *,
        max_size: int,
        accept_language: Sequence[str],
        url_blacklist: Sequence[UrlPattern],
        authenticated_media: bool,
        body_timeout: float = BODY_TIMEOUT_SECONDS,
    ) -> None:
        self._client = client
        self._storage = storage
        self._uploads = uploads
        self._quarantine = quarantine
        self._clock = clock
        self._max_size = max_size
        self._url_blacklist = tuple(url_blacklist)
        self._authenticated_media = authenticated_media
        self._body_timeout = body_timeout
        # One Accept-Language line per language, as Synapse sends them (the
        # User-Agent is the client's setting).
        self._headers = {
            b"Accept-Language": [language.encode("utf-8") for language in accept_language]
        }

    def blocked(self, url: str) -> bool:
        return matches_url_pattern(url, self._url_blacklist)

    async def download(self, url: str, user_id: str, *, allow_data: bool = False) -> Downloaded:
        """Fetch ``url`` and store it as URL-cache media of ``user_id``."""
        if self.blocked(url):
            raise MatrixError(403, Codes.UNKNOWN, "URL blocked by url pattern blocklist entry")
        if url[:5].lower() == "data:":
            if not allow_data:
                raise MatrixError(500, Codes.UNKNOWN, "Previewing of data: URLs is forbidden")
            media_type, body = parse_data_url(url)
            return await self._store(url, body, media_type, None, url, 200, None, user_id)
        response = await self._fetch(url)
        headers = response.headers
        content_type = (headers.getRawHeaders(b"Content-Type") or [b"application/octet-stream"])[0]
        media_type = content_type.decode("latin-1").replace("\x00", "")
        if not _previewable(media_type):
            self._client.drop_body(response)
            raise MatrixError(
                502,
                Codes.UNKNOWN,
                f"Requested file's content type not allowed for this operation: {media_type}",
            )
        body = await self._read(response)
        disposition = headers.getRawHeaders(b"Content-Disposition")
        etag = headers.getRawHeaders(b"ETag")
        return await self._store(
            url,
            body,
            media_type,
            filename_from_disposition(disposition[0].decode("latin-1") if disposition else None),
            response.url,
            response.code,
            etag[0].decode("latin-1").replace("\x00", "") if etag else None,
            user_id,
        )

    async def _fetch(self, url: str) -> OutboundResponse:
        try:
            response = await self._client.get(url, headers=Headers(self._headers))
        except BlockedAddressError as e:
            logger.info("URL preview of %s refused: %s", url, e)
            if _is_ip_literal(url):
                raise MatrixError(403, Codes.UNKNOWN, "IP address blocked") from e
            raise MatrixError(
                502, Codes.UNKNOWN, "DNS resolution failure during URL preview generation"
            ) from e
        except OutboundRequestError as e:
            logger.info("URL preview of %s failed: %s", url, e)
            if isinstance(e.__cause__, defer.TimeoutError):
                raise MatrixError(504, Codes.UNKNOWN, "Timed out fetching the URL") from e
            raise MatrixError(502, Codes.UNKNOWN, f"Failed to download content: {e}") from e
        if not 200 <= response.code < 300:
            self._client.drop_body(response)
            raise MatrixError(502, Codes.UNKNOWN, f"Got error {response.code}")
        return response

    async def _read(self, response: OutboundResponse) -> bytes:
        """The whole body (a page is parsed whole), within the size limit and
        the time limit."""
        reading: defer.Deferred[bytes] = defer.ensureDeferred(
            self._client.read_limited_body(response, self._max_size)
        )
        reading.addTimeout(self._body_timeout, self._clock)
        try:
            return await reading
        except BodyTooLargeError as e:
            raise MatrixError(
                502, Codes.TOO_LARGE, f"Requested file is too large > {self._max_size} bytes"
            ) from e
        except (defer.TimeoutError, BodyReadError) as e:
            raise MatrixError(
                502, Codes.TOO_LARGE, "Requested file took too long to download"
            ) from e

    async def _store(
        self,
        url: str,
        body: bytes,
        media_type: str,
        download_name: str | None,
        final_url: str,
        response_code: int,
        etag: str | None,
        user_id: str,
    ) -> Downloaded:
        created_ts = int(self._clock.seconds() * 1000)
        today = datetime.datetime.fromtimestamp(created_ts / 1000, datetime.UTC).date()
        media_id = new_url_cache_id(today)
        relative_path = url_cache_path(media_id)
        sink = self._storage.begin_upload(media_id)
        placed = False
        try:
            # A full disk fails the preview with 507 (logged once, not per request).
            with self._storage.full.converting("URL preview"):
                sink.write(body)
                written = await sink.finish()
            upload = NewUpload(
                LocalMedia(
                    media_id=media_id,
                    media_type=media_type,
                    media_length=written.length,
                    created_ts=created_ts,
                    upload_name=download_name,
                    user_id=user_id,
                    quarantined_by=None,
                    url_cache=url,
                    last_access_ts=None,
                    safe_from_quarantine=False,
                    authenticated=self._authenticated_media,
                    sha256=written.sha256,
                ),
                check_quarantine=await self._quarantine.hash_lookups_possible(),
            )

            def place(known: KnownContent) -> bool:
                nonlocal placed
                # URL-cache files share no bytes and stay in the local store,
                # as in Synapse.
                shared = self._storage.place_upload(written, relative_path)
                placed = True
                return shared

            def remove_staged() -> None:
                self._storage.remove_staged(written)

            with self._storage.full.converting("URL preview"):
                stored = await self._uploads.store(upload, place, remove_staged)
        except BaseException:
            if placed:
                await self._storage.delete_local([relative_path])
            await sink.abort()
            self._storage.end_upload(sink)
            raise
        self._storage.end_upload(sink)
        media = stored.media
        if media.quarantined_by is not None:
            logger.warning("URL preview of %s matches quarantined media", url)
        return Downloaded(media, final_url, response_code, etag, body)

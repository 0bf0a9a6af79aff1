"""Other servers' media: fetched over federation once, kept under Synapse's
``remote_content/`` layout and in ``remote_media_cache``, served from there
afterwards.

One download of a given media runs at a time; requests arriving meanwhile
share its result. The body streams to a staging file (hashed on the way,
bounded by ``max_upload_size``, the connection paused while the disk is
behind) and reaches the cache only whole: a peer that lies about sizes,
breaks its multipart answer or stalls leaves nothing behind.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable
from typing import Any
from urllib.parse import quote, unquote

import attrs
from prometheus_client import Counter

from mediarepo.config import Config
from mediarepo.errors import Codes, MatrixError, NotFoundError
from mediarepo.federation.client import FederationClient, FederationRequestError
from mediarepo.federation.multipart import (
    MultipartError,
    MultipartParser,
    MultipartTooLargeError,
)
from mediarepo.identifiers import is_valid_server_name
from mediarepo.media.events import MediaEvent, emit
from mediarepo.media.locks import WorkerLocks
from mediarepo.media.paths import is_valid_media_id, random_media_id, remote_media_path
from mediarepo.media.pending import ContentArrivals
from mediarepo.media.provider_chain import ProviderChain
from mediarepo.media.ratelimit import Ratelimiter
from mediarepo.media.thumbnail_sources import RemoteThumbnailSource
from mediarepo.media.thumbnails import ThumbnailMaker
from mediarepo.media.upload_sink import UploadSink
from mediarepo.outbound import BodyReadError, OutboundResponse
from mediarepo.sharing import SharedWork
from mediarepo.storage.lock_rows import LOCK_TIMEOUT_MS
from mediarepo.storage.media_rows import MediaRows, remote_content_key
from mediarepo.storage.quarantine_rows import QUARANTINED_BY_SYSTEM, QuarantineRows
from mediarepo.values import RemoteMedia

logger = logging.getLogger(__name__)

remote_downloads = Counter(
    "mediarepo_remote_downloads_total", "Downloads of remote media", ["outcome"]
)

# Headroom the requester's download bucket must have before a fetch starts.
_RATE_LIMIT_HEADROOM = 1024 * 1024
# What a multipart answer may add around the file.
_MULTIPART_OVERHEAD = 64 * 1024
# The worker lock a process holds while it downloads a remote media, so that
# processes sharing the database (workers, hosts) download it once.
_DOWNLOAD_LOCK = "mediarepo_remote_download"
# How long a request waits for another process's download of the same media
# before giving up: past the lock's timeout, so that a dead downloader's lock
# has freed and been taken over by then.
OTHER_DOWNLOAD_WAIT_SECONDS = LOCK_TIMEOUT_MS / 1000 + 30
# How often a request waiting for another process's download looks again
# when no announcement wakes it.
_OTHER_DOWNLOAD_POLL_SECONDS = 1.0


def _fetch_failed() -> MatrixError:
    return MatrixError(502, Codes.UNKNOWN, "Failed to fetch remote media")


def _too_large(limit: int) -> MatrixError:
    return MatrixError(502, Codes.TOO_LARGE, f"Requested file is too large > {limit} bytes")


_DISPOSITION_PARAM = re.compile(r';\s*([^\s=;]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^;]*)', re.IGNORECASE)


def filename_from_disposition(value: str | None) -> str | None:
    """The file name a ``Content-Disposition`` gives, as Synapse reads it:
    ``filename*=utf-8''...`` (percent-decoded) first, else a plain ASCII
    ``filename``."""
    if not value:
        return None
    params: dict[str, str] = {}
    for name, raw in _DISPOSITION_PARAM.findall(value):
        raw = raw.strip()
        if raw.startswith('"') and raw.endswith('"') and len(raw) >= 2:
            raw = re.sub(r"\\(.)", r"\1", raw[1:-1])
        params.setdefault(name.lower(), raw)
    extended = params.get("filename*")
    if extended and extended.lower().startswith("utf-8''"):
        try:
            return unquote(extended[7:], errors="strict") or None
        except UnicodeDecodeError:
            pass
    plain = params.get("filename")
    if plain and plain.isascii():
        return plain
    return None


def _is_unknown_endpoint(code: int, body: bytes) -> bool:
    """Whether a peer answered as a server that lacks the endpoint (so an
    older one should be tried), as Synapse decides it."""
    try:
        errcode = json.loads(body).get("errcode")
    except (ValueError, AttributeError):
        errcode = None
    if code in (404, 405):
        return errcode in (None, Codes.UNRECOGNIZED)
    return code == 400 and errcode == Codes.UNRECOGNIZED


@attrs.frozen
class RemoteAccess:
    """How a request may reach remote media."""

    allow_fetch: bool  # may it be fetched if not cached (legacy ?allow_remote=false)
    allow_authenticated: bool  # an authenticated (Matrix 1.11) endpoint
    requester_ip: str  # whose download budget pays
    timeout_ms: int  # passed on to the origin, for media not uploaded yet
    # A server admin's admin_unsafely_bypass_quarantine=true.
    bypass_quarantine: bool = False


@attrs.frozen
class _Fetched:
    media_type: str
    upload_name: str | None


class RemoteMediaCache:
    def __init__(
        self,
        config: Config,
        storage: ProviderChain,
        media_store: MediaRows,
        client: FederationClient,
        thumbnails: ThumbnailMaker,
        quarantine: QuarantineRows,
        locks: WorkerLocks,
        arrivals: ContentArrivals,
        clock: Any,
    ) -> None:
        self._config = config
        self._locks = locks
        self._arrivals = arrivals
        self._quarantine = quarantine
        self._storage = storage
        self._media_store = media_store
        self._client = client
        self._thumbnails = thumbnails
        self._clock = clock
        self._fetching: SharedWork[tuple[str, str], RemoteMedia] = SharedWork()
        self._limiter = Ratelimiter(config.federation.remote_download_rate, clock)

    async def get(self, origin: str, media_id: str, access: RemoteAccess) -> RemoteMedia:
        """The cached copy of ``mxc://origin/media_id``, fetched first if need be."""
        federation = self._config.federation
        if federation.domain_whitelist is not None and origin not in federation.domain_whitelist:
            raise MatrixError(403, Codes.FORBIDDEN, f"Federation denied with {origin}.")
        if origin in federation.prevent_media_downloads_from:
            raise NotFoundError()
        if not is_valid_server_name(origin) or not is_valid_media_id(media_id):
            raise NotFoundError()
        cached = await self._cached(origin, media_id, access.bypass_quarantine)
        authenticated_only = (
            self._config.enable_authenticated_media and not access.allow_authenticated
        )
        if authenticated_only and (cached is None or cached.authenticated):
            # The unauthenticated API never fetches, and never shows what was
            # fetched for the authenticated one.
            raise NotFoundError()
        if cached is not None:
            return cached
        if not access.allow_fetch:
            raise NotFoundError()
        return await self._fetching.run(
            (origin, media_id), lambda: self._download_once_everywhere(origin, media_id, access)
        )

    async def _download_once_everywhere(
        self, origin: str, media_id: str, access: RemoteAccess
    ) -> RemoteMedia:
        """Download unless another process sharing the database already is
        (it holds the download's worker lock): then wait for its copy, and
        take over if it gives up or dies (its lock then frees)."""
        key = remote_content_key(origin, media_id)
        deadline = self._clock.seconds() + OTHER_DOWNLOAD_WAIT_SECONDS
        while True:
            # The row is read with the lock: it may have landed since we looked.
            lock, row = await self._locks.try_lock_then(
                _DOWNLOAD_LOCK,
                key,
                lambda claim: self._media_store.take_download_lock(claim, origin, media_id),
            )
            if lock is not None:
                try:
                    cached = await self._usable(row, access.bypass_quarantine)
                    if cached is not None:
                        return cached
                    return await self._download(
                        origin, media_id, access.requester_ip, access.timeout_ms
                    )
                finally:
                    await lock.release()
            # Woken by its announcement, or looking again after a while
            # (announcements reach us only on PostgreSQL).
            await self._arrivals.wait(key, _OTHER_DOWNLOAD_POLL_SECONDS)
            cached = await self._cached(origin, media_id, access.bypass_quarantine)
            if cached is not None:
                return cached
            if self._clock.seconds() > deadline:
                raise _fetch_failed()

    async def _cached(
        self, origin: str, media_id: str, bypass_quarantine: bool
    ) -> RemoteMedia | None:
        return await self._usable(
            await self._media_store.get_remote_media(origin, media_id), bypass_quarantine
        )

    async def _usable(
        self, media: RemoteMedia | None, bypass_quarantine: bool
    ) -> RemoteMedia | None:
        """The cached row if it may be served and its file is there."""
        if media is None:
            return None
        if media.quarantined_by is not None and not bypass_quarantine:
            raise NotFoundError()
        if await self._storage.exists(remote_media_path(media.media_origin, media.filesystem_id)):
            return media
        logger.warning(
            "cached remote media %s/%s has lost its file", media.media_origin, media.media_id
        )
        return None

    async def _download(
        self, origin: str, media_id: str, requester_ip: str, timeout_ms: int
    ) -> RemoteMedia:
        self._limiter.require_room(requester_ip, _RATE_LIMIT_HEADROOM)
        filesystem_id = random_media_id()
        sink = self._storage.begin_upload(filesystem_id)
        try:
            fetched = await self._fetch_into(sink, origin, media_id, timeout_ms)
            with self._storage.full.converting("remote media"):
                written = await sink.finish()
        except BaseException as e:
            await sink.abort()
            self._storage.end_upload(sink)
            remote_downloads.labels("failed").inc()
            if isinstance(e, MatrixError):
                raise
            if isinstance(e, (FederationRequestError, BodyReadError)):
                logger.info("fetching %s/%s failed: %s", origin, media_id, e)
                raise _fetch_failed() from e
            raise
        self._limiter.charge(requester_ip, written.length)
        path = remote_media_path(origin, filesystem_id)
        try:
            await self._storage.publish(written, path)
            now = int(self._clock.seconds() * 1000)
            # Bytes quarantined elsewhere arrive quarantined (and are not served).
            quarantined = await self._quarantine.is_hash_quarantined(written.sha256)
            media = RemoteMedia(
                media_origin=origin,
                media_id=media_id,
                media_type=fetched.media_type,
                created_ts=now,
                upload_name=fetched.upload_name,
                media_length=written.length,
                filesystem_id=filesystem_id,
                last_access_ts=now,
                quarantined_by=QUARANTINED_BY_SYSTEM if quarantined else None,
                authenticated=self._config.enable_authenticated_media,
                sha256=written.sha256,
            )
            # Recorded with the row: a crash after it must not lose the thumbnails.
            thumbnails_owed = (
                self._thumbnails.pending.owed(origin, media_id)
                if not quarantined and self._thumbnails.pregenerates(media.media_type)
                else None
            )
            if not await self._media_store.store_remote_media(media, thumbnails_owed):
                # Another process fetched it first: keep its copy.
                await self._storage.delete(path)
                existing = await self._media_store.get_remote_media(origin, media_id)
                if existing is None:
                    raise _fetch_failed()
                media = existing
        finally:
            # The staging name (and the file, if publishing never closed it).
            await sink.abort()
            self._storage.end_upload(sink)
        remote_downloads.labels("fetched").inc()
        emit(
            MediaEvent.REMOTE_CACHED,
            media_id=media_id,
            origin=origin,
            length=written.length,
            sha256=written.sha256,
            quarantined=media.quarantined_by is not None,
        )
        if media.quarantined_by is not None:
            logger.info("%s/%s has quarantined bytes: not served", origin, media_id)
            raise NotFoundError()
        self._thumbnails.schedule_pregeneration(RemoteThumbnailSource(media, self._media_store))
        return media

    async def _fetch_into(
        self, sink: UploadSink, origin: str, media_id: str, timeout_ms: int
    ) -> _Fetched:
        path = f"/_matrix/federation/v1/media/download/{quote(media_id)}?timeout_ms={timeout_ms}"
        response = await self._client.get(origin, path)
        if response.code == 200:
            return await self._read_multipart(response, sink)
        body = await self._client.read_error_body(response)
        if not _is_unknown_endpoint(response.code, body):
            raise _error_from_peer(response.code, body)
        # A peer from before Matrix 1.11: the unauthenticated endpoint.
        legacy = (
            f"/_matrix/media/v3/download/{quote(origin)}/{quote(media_id)}"
            f"?allow_remote=false&timeout_ms={timeout_ms}"
        )
        response = await self._client.get(origin, legacy)
        if response.code != 200:
            raise _error_from_peer(response.code, await self._client.read_error_body(response))
        return await self._read_plain(response, sink)

    async def _read_plain(self, response: OutboundResponse, sink: UploadSink) -> _Fetched:
        """A response whose body is the file itself, its type in the headers."""
        limit = self._config.max_upload_size
        if response.length is not None and response.length > limit:
            self._client.outbound.drop_body(response)
            raise _too_large(limit)
        received = 0

        def on_data(data: bytes) -> None:
            nonlocal received
            received += len(data)
            if received > limit:
                raise _too_large(limit)
            sink.write(data)

        await self._read(response, sink, on_data)
        headers = response.headers
        return _Fetched(
            media_type=_first_header(headers, b"Content-Type") or "application/octet-stream",
            upload_name=filename_from_disposition(_first_header(headers, b"Content-Disposition")),
        )

    async def _read_multipart(self, response: OutboundResponse, sink: UploadSink) -> _Fetched:
        limit = self._config.max_upload_size
        if response.length is not None and response.length > limit + _MULTIPART_OVERHEAD:
            self._client.outbound.drop_body(response)
            raise _too_large(limit)
        try:
            parser = MultipartParser(
                _first_header(response.headers, b"Content-Type"), max_file_bytes=limit
            )
        except MultipartError as e:
            raise MatrixError(
                502,
                Codes.UNKNOWN,
                "Remote response is malformed: expected Content-Type of multipart/mixed"
                " with a boundary present.",
            ) from e

        def on_data(data: bytes) -> None:
            for chunk in parser.feed(data):
                sink.write(chunk)

        try:
            await self._read(response, sink, on_data)
            part = parser.finish()
        except MultipartTooLargeError as e:
            raise _too_large(limit) from e
        except MultipartError as e:
            raise MatrixError(502, Codes.UNKNOWN, f"Remote response is malformed: {e}") from e
        if part.location is not None:
            # The file is elsewhere (a CDN): fetch it from there.
            try:
                response = await self._client.get_url(part.location)
            except FederationRequestError as e:
                logger.info("fetching redirected media failed: %s", e)
                raise _fetch_failed() from e
            if response.code != 200:
                await self._client.read_error_body(response)
                raise MatrixError(502, Codes.UNKNOWN, f"Got error {response.code}")
            return await self._read_plain(response, sink)
        return _Fetched(
            media_type=part.media_type or "application/octet-stream",
            upload_name=filename_from_disposition(part.disposition),
        )

    async def _read(
        self, response: OutboundResponse, sink: UploadSink, on_data: Callable[[bytes], None]
    ) -> None:
        """Stream the body into ``on_data``, paused while the disk is behind;
        a peer idle for ``federation_idle_timeout`` is given up on."""
        await self._client.outbound.read_body(response, on_data, flow_control=sink.set_flow_control)


def _first_header(headers: Any, name: bytes) -> str | None:
    values = headers.getRawHeaders(name)
    if not values:
        return None
    value: bytes = values[0]
    return value.decode("ascii", "replace")


def _error_from_peer(code: int, body: bytes) -> MatrixError:
    """What the client hears when a peer refused: its 404 as it is, anything
    else as a failure to fetch (Synapse's mapping)."""
    if code == 404:
        try:
            error = json.loads(body)
            return MatrixError(
                404,
                str(error.get("errcode", Codes.NOT_FOUND)),
                str(error.get("error", "Not found")),
            )
        except (ValueError, AttributeError):
            return NotFoundError()
    return _fetch_failed()

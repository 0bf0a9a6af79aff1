"""What other servers ask of us: our media (``/_matrix/federation/v1/media/*``,
signed with X-Matrix, answered as ``multipart/mixed``) and our keys
(``/_matrix/key/v2/server``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from mediarepo.http.auth import FederationAuthenticator
from mediarepo.http.download import parse_timeout_ms
from mediarepo.http.file_response import (
    redirect_location,
    respond_with_multipart,
    respond_with_multipart_redirect,
)
from mediarepo.http.headers import content_disposition, thumbnail_content_disposition
from mediarepo.http.server import respond_json
from mediarepo.http.site import MediaRequest
from mediarepo.http.thumbnail import parse_thumbnail_request
from mediarepo.media.provider_chain import StoredFile
from mediarepo.media.ratelimit import OriginLimiter
from mediarepo.media.repository import MediaRepository


class FederationMediaHandler:
    def __init__(
        self, repository: MediaRepository, auth: FederationAuthenticator, limiter: OriginLimiter
    ) -> None:
        self._repository = repository
        self._auth = auth
        self._limiter = limiter

    async def on_download(self, request: MediaRequest, params: dict[str, str]) -> None:
        async with self._limiter.slot(await self._auth.origin(request)):
            await self._download(request, params)

    async def on_thumbnail(self, request: MediaRequest, params: dict[str, str]) -> None:
        async with self._limiter.slot(await self._auth.origin(request)):
            await self._thumbnail(request, params)

    async def _download(self, request: MediaRequest, params: dict[str, str]) -> None:
        download = await self._repository.get_local_media(
            params["media_id"], allow_authenticated=True, timeout_ms=parse_timeout_ms(request)
        )
        await self._respond(
            request,
            download.file,
            download.media_type,
            content_disposition(download.media_type, download.upload_name),
        )

    async def _thumbnail(self, request: MediaRequest, params: dict[str, str]) -> None:
        thumbnail = await self._repository.get_local_thumbnail(
            params["media_id"],
            parse_thumbnail_request(request),
            allow_authenticated=True,
            timeout_ms=parse_timeout_ms(request),
        )
        await self._respond(
            request,
            thumbnail.file,
            thumbnail.media_type,
            thumbnail_content_disposition(thumbnail.media_type),
        )

    async def _respond(
        self, request: MediaRequest, file: StoredFile, media_type: str | None, disposition: str
    ) -> None:
        """The file part, or, where a provider offers its copy, the
        ``Location`` part the spec allows in its place (then nothing is read
        here)."""
        location = await redirect_location(self._repository, file, media_type, disposition)
        if location is not None:
            respond_with_multipart_redirect(request, location)
            return
        await respond_with_multipart(request, await file.open(), media_type, disposition)


class KeyServerHandler:
    """``GET /_matrix/key/v2/server[/{keyId}]``: our keys, self-signed."""

    def __init__(self, keys_response: Callable[[], dict[str, Any]]) -> None:
        self._keys_response = keys_response

    async def on_get(self, request: MediaRequest, params: dict[str, str]) -> None:
        respond_json(request, 200, self._keys_response())

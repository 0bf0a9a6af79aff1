"""The thumbnail endpoints, legacy and authenticated (`/_matrix/client/v1/media`)."""

from __future__ import annotations

from mediarepo.errors import Codes, MatrixError
from mediarepo.http.auth import Authenticator
from mediarepo.http.download import allows_redirect, checked_server_name, parse_timeout_ms
from mediarepo.http.file_response import respond_with_file_or_redirect
from mediarepo.http.headers import set_media_security_headers
from mediarepo.http.server import query_bool, query_int, query_string
from mediarepo.http.site import MediaRequest
from mediarepo.media.remote import RemoteAccess
from mediarepo.media.repository import MediaRepository
from mediarepo.media.thumbnail_sizes import ThumbnailRequest

# Larger requests are refused rather than worked on: no client shows a
# thumbnail this big, and the numbers feed image arithmetic.
MAX_THUMBNAIL_DIMENSION = 10_000


def parse_thumbnail_request(request: MediaRequest) -> ThumbnailRequest:
    width = query_int(request, "width")
    height = query_int(request, "height")
    for name, value in (("width", width), ("height", height)):
        if not 1 <= value <= MAX_THUMBNAIL_DIMENSION:
            raise MatrixError(
                400,
                Codes.INVALID_PARAM,
                f"Query parameter {name!r} must be between 1 and {MAX_THUMBNAIL_DIMENSION}",
            )
    method = query_string(request, "method") or "scale"
    if method not in ("crop", "scale"):
        raise MatrixError(
            400, Codes.INVALID_PARAM, "Query parameter 'method' must be 'crop' or 'scale'"
        )
    return ThumbnailRequest(
        width=width,
        height=height,
        method=method,
        animated=query_bool(request, "animated", False),
        path=request.path.decode("ascii", "replace"),
    )


class ThumbnailHandler:
    def __init__(self, repository: MediaRepository, auth: Authenticator) -> None:
        self._repository = repository
        self._auth = auth

    async def on_legacy_get(self, request: MediaRequest, params: dict[str, str]) -> None:
        set_media_security_headers(request)
        await self._thumbnail(request, params, authenticated=False)

    async def on_authenticated_get(self, request: MediaRequest, params: dict[str, str]) -> None:
        await self._auth.requester(request, allow_guest=True)
        set_media_security_headers(request)
        await self._thumbnail(request, params, authenticated=True)

    async def _thumbnail(
        self, request: MediaRequest, params: dict[str, str], *, authenticated: bool
    ) -> None:
        server_name = checked_server_name(params)
        thumbnail_request = parse_thumbnail_request(request)
        timeout_ms = parse_timeout_ms(request)
        allow_remote = authenticated or query_bool(request, "allow_remote", True)
        if server_name == self._repository.server_name:
            thumbnail = await self._repository.get_local_thumbnail(
                params["media_id"],
                thumbnail_request,
                allow_authenticated=authenticated,
                timeout_ms=timeout_ms,
            )
        else:
            thumbnail = await self._repository.get_remote_thumbnail(
                server_name,
                params["media_id"],
                thumbnail_request,
                RemoteAccess(
                    allow_fetch=allow_remote,
                    allow_authenticated=authenticated,
                    requester_ip=request.client_ip(),
                    timeout_ms=timeout_ms,
                ),
            )
        await respond_with_file_or_redirect(
            request,
            self._repository,
            thumbnail.file,
            thumbnail.media_type,
            None,
            allow_redirect=authenticated and allows_redirect(request),
            thumbnail=True,
        )

"""``GET /_matrix/media/{r0,v3,v1}/download/...`` and ``/_matrix/client/v1/media/download/...``."""

from __future__ import annotations

from mediarepo.errors import Codes, MatrixError
from mediarepo.http.auth import Authenticator
from mediarepo.http.file_response import respond_with_file_or_redirect
from mediarepo.http.headers import set_media_security_headers
from mediarepo.http.server import query_bool, query_int
from mediarepo.http.site import MediaRequest
from mediarepo.identifiers import is_valid_server_name
from mediarepo.media.remote import RemoteAccess
from mediarepo.media.repository import MediaRepository

DEFAULT_TIMEOUT_MS = 20_000
MAX_TIMEOUT_MS = 60_000


def parse_timeout_ms(request: MediaRequest) -> int:
    return min(query_int(request, "timeout_ms", DEFAULT_TIMEOUT_MS), MAX_TIMEOUT_MS)


def allows_redirect(request: MediaRequest) -> bool:
    """Whether the client accepts a redirect for the bytes (MSC3860); only
    the authenticated endpoints use it, the legacy ones always serve them."""
    return query_bool(request, "allow_redirect", False)


def checked_server_name(params: dict[str, str]) -> str:
    server_name = params.get("server_name", "")
    if not is_valid_server_name(server_name):
        raise MatrixError(400, Codes.INVALID_PARAM, "Invalid server name")
    return server_name


class DownloadHandler:
    def __init__(self, repository: MediaRepository, auth: Authenticator) -> None:
        self._repository = repository
        self._auth = auth

    async def on_legacy_get(self, request: MediaRequest, params: dict[str, str]) -> None:
        set_media_security_headers(request)
        await self._download(request, params, authenticated=False)

    async def on_authenticated_get(self, request: MediaRequest, params: dict[str, str]) -> None:
        requester = await self._auth.requester(request, allow_guest=True)
        bypass = query_bool(request, "admin_unsafely_bypass_quarantine", False)
        if bypass and not requester.is_admin:
            raise MatrixError(400, Codes.UNKNOWN, "Must be a server admin to bypass quarantine")
        set_media_security_headers(request)
        await self._download(request, params, authenticated=True, bypass_quarantine=bypass)

    async def _download(
        self,
        request: MediaRequest,
        params: dict[str, str],
        *,
        authenticated: bool,
        bypass_quarantine: bool = False,
    ) -> None:
        server_name = checked_server_name(params)
        timeout_ms = parse_timeout_ms(request)
        allow_remote = authenticated or query_bool(request, "allow_remote", True)
        if server_name == self._repository.server_name:
            download = await self._repository.get_local_media(
                params["media_id"],
                allow_authenticated=authenticated,
                timeout_ms=timeout_ms,
                bypass_quarantine=bypass_quarantine,
            )
        else:
            download = await self._repository.get_remote_media(
                server_name,
                params["media_id"],
                RemoteAccess(
                    allow_fetch=allow_remote,
                    allow_authenticated=authenticated,
                    requester_ip=request.client_ip(),
                    timeout_ms=timeout_ms,
                    bypass_quarantine=bypass_quarantine,
                ),
            )
        filename = params.get("file_name") or download.upload_name
        await respond_with_file_or_redirect(
            request,
            self._repository,
            download.file,
            download.media_type,
            filename,
            allow_redirect=authenticated and allows_redirect(request),
        )

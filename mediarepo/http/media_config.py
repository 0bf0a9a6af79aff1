"""``GET /_matrix/media/{r0,v3,v1}/config`` and ``/_matrix/client/v1/media/config``."""

from __future__ import annotations

from mediarepo.http.auth import Authenticator
from mediarepo.http.server import respond_json
from mediarepo.http.site import MediaRequest


class MediaConfigHandler:
    def __init__(self, max_upload_size: int, auth: Authenticator) -> None:
        self._body = {"m.upload.size": max_upload_size}
        self._auth = auth

    async def on_get(self, request: MediaRequest, params: dict[str, str]) -> None:
        await self._auth.requester(request, allow_guest=False)
        respond_json(request, 200, self._body)

"""``GET /_matrix/media/{r0,v3,v1}/preview_url`` and
``/_matrix/client/v1/media/preview_url``: authenticated, no guests."""

from __future__ import annotations

from mediarepo.errors import Codes, MatrixError
from mediarepo.http.auth import Authenticator
from mediarepo.http.server import query_int, query_string, respond_encoded_json, unrecognized
from mediarepo.http.site import MediaRequest
from mediarepo.media.url_previewer import UrlPreviewer


class PreviewHandler:
    def __init__(self, previewer: UrlPreviewer | None, auth: Authenticator) -> None:
        # None: url_preview_enabled is false.
        self._previewer = previewer
        self._auth = auth

    async def on_get(self, request: MediaRequest, params: dict[str, str]) -> None:
        if self._previewer is None:
            # As Synapse: the endpoint does not exist, before any auth.
            unrecognized(request)
            return
        requester = await self._auth.requester(request, allow_guest=False)
        url = query_string(request, "url")
        if url is None:
            raise MatrixError(400, Codes.MISSING_PARAM, "Missing string query parameter 'url'")
        ts = None if query_string(request, "ts") is None else query_int(request, "ts")
        respond_encoded_json(request, 200, await self._previewer.preview(url, requester, ts))

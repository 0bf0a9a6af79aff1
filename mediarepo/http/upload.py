"""``POST /_matrix/media/{r0,v3,v1}/upload``."""

from __future__ import annotations

from mediarepo.errors import Codes, MatrixError
from mediarepo.http.auth import Authenticator
from mediarepo.http.server import respond_json
from mediarepo.http.site import MediaRequest
from mediarepo.media.repository import MediaRepository


def upload_filename(request: MediaRequest) -> str | None:
    values: list[bytes] | None = request.args.get(b"filename")
    if not values or not values[0]:
        return None
    try:
        return values[0].decode("utf-8")
    except UnicodeDecodeError as e:
        raise MatrixError(400, Codes.UNKNOWN, "Invalid UTF-8 filename parameter") from e


def upload_media_type(request: MediaRequest) -> str:
    values = request.requestHeaders.getRawHeaders(b"Content-Type")
    if not values or not values[0].strip():
        return "application/octet-stream"
    try:
        return values[0].decode("ascii").strip()
    except UnicodeDecodeError as e:
        raise MatrixError(400, Codes.UNKNOWN, "Content-Type is not ASCII") from e


class UploadHandler:
    def __init__(self, repository: MediaRepository, auth: Authenticator) -> None:
        self._repository = repository
        self._auth = auth

    async def on_post(self, request: MediaRequest, params: dict[str, str]) -> None:
        upload = request.take_upload()
        try:
            requester = await self._auth.requester(request, allow_guest=False)
            headers = request.requestHeaders
            if not headers.hasHeader(b"Content-Length") and not headers.hasHeader(
                b"Transfer-Encoding"
            ):
                raise MatrixError(400, Codes.UNKNOWN, "Request must specify a Content-Length")
            filename = upload_filename(request)
            media_type = upload_media_type(request)
        except BaseException:
            self._repository.abandon_upload(upload)
            raise
        mxc = await self._repository.complete_upload(upload, requester, media_type, filename)
        respond_json(request, 200, {"content_uri": mxc})

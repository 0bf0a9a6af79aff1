"""Uploads: ``POST /_matrix/media/{r0,v3,v1}/upload``, and async uploads:
``POST /_matrix/media/v1/create`` then ``PUT /_matrix/media/v3/upload/{serverName}/{mediaId}``."""

from __future__ import annotations

from mediarepo.errors import Codes, MatrixError
from mediarepo.http.auth import Authenticator
from mediarepo.http.server import request_text, respond_json
from mediarepo.http.site import MediaRequest
from mediarepo.http.upload_body import AcceptedUpload
from mediarepo.media.uploads import LocalUploads
from mediarepo.values import Requester


def upload_filename(request: MediaRequest) -> str | None:
    values: list[bytes] | None = request.args.get(b"filename")
    if not values or not values[0]:
        return None
    # Synapse answers bad UTF-8 here with M_UNKNOWN.
    return request_text(values[0], "filename parameter", errcode=Codes.UNKNOWN)


def upload_media_type(request: MediaRequest) -> str:
    values = request.requestHeaders.getRawHeaders(b"Content-Type")
    if not values or not values[0].strip():
        return "application/octet-stream"
    if not values[0].isascii():
        raise MatrixError(400, Codes.UNKNOWN, "Content-Type is not ASCII")
    return request_text(values[0], "Content-Type").strip()


class UploadHandler:
    def __init__(self, uploads: LocalUploads, auth: Authenticator) -> None:
        self._uploads = uploads
        self._auth = auth

    async def _uploader(self, request: MediaRequest) -> Requester:
        """Who adds media: not a guest, and not suspended (a suspended
        account keeps reading media, as the spec suggests, but adds none)."""
        requester = await self._auth.requester(request, allow_guest=False)
        if requester.is_suspended:
            raise MatrixError(
                403,
                Codes.USER_SUSPENDED,
                "You cannot upload media while your account is suspended.",
            )
        return requester

    async def accept_new(self, request: MediaRequest, params: dict[str, str]) -> AcceptedUpload:
        """Accept the body of new media, from the headers: the uploader's
        token (a cached lookup) and, with quotas on, the declared length."""
        uploader = await self._uploader(request)
        sink = await self._uploads.begin_upload(uploader, request.declared_length)
        return AcceptedUpload(sink, uploader)

    async def accept_reserved(
        self, request: MediaRequest, params: dict[str, str]
    ) -> AcceptedUpload:
        """Accept the content of a reservation, from the headers: token,
        owner, no content yet, quota; a refused PUT costs no transfer."""
        uploader = await self._uploader(request)
        sink = await self._uploads.begin_reserved_upload(
            uploader, params["server_name"], params["media_id"], request.declared_length
        )
        return AcceptedUpload(sink, uploader)

    async def on_post(
        self, request: MediaRequest, params: dict[str, str], upload: AcceptedUpload
    ) -> None:
        mxc = await self._store_body(request, upload)
        respond_json(request, 200, {"content_uri": mxc})

    async def on_put(
        self, request: MediaRequest, params: dict[str, str], upload: AcceptedUpload
    ) -> None:
        await self._store_body(request, upload)
        respond_json(request, 200, {})

    async def _store_body(self, request: MediaRequest, upload: AcceptedUpload) -> str:
        """Store the request's body as the media its path names; the body is
        rolled back if the request turns out to be bad."""
        try:
            headers = request.requestHeaders
            if not headers.hasHeader(b"Content-Length") and not headers.hasHeader(
                b"Transfer-Encoding"
            ):
                raise MatrixError(400, Codes.UNKNOWN, "Request must specify a Content-Length")
            filename = upload_filename(request)
            media_type = upload_media_type(request)
        except BaseException:
            await self._uploads.abandon_upload(upload.sink)
            raise
        return await self._uploads.complete_upload(
            upload.sink, upload.uploader, media_type, filename
        )

    async def on_create(self, request: MediaRequest, params: dict[str, str]) -> None:
        requester = await self._uploader(request)
        mxc, expires_at = await self._uploads.create_media_id(requester)
        respond_json(request, 200, {"content_uri": mxc, "unused_expires_at": expires_at})

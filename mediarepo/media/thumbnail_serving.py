"""Serving thumbnails: which thumbnail answers a request, and its file.

A request is answered with the smallest stored thumbnail that covers it,
else with one made for it from the original (whatever
``dynamic_thumbnails`` says: the spec asks for it), else with the closest
stored one; a stored thumbnail whose file is gone is made again. Which
sizes cover a request is :mod:`mediarepo.media.thumbnail_sizes`; making
them is :mod:`mediarepo.media.thumbnails`.
"""

from __future__ import annotations

import logging

import attrs

from mediarepo.errors import Codes, MatrixError, NotFoundError
from mediarepo.media.provider_chain import ProviderChain, StoredFile
from mediarepo.media.responder import Responder
from mediarepo.media.thumbnail_sizes import (
    ThumbnailRequest,
    closest_thumbnail,
    on_demand_spec,
    select_thumbnail,
)
from mediarepo.media.thumbnail_sources import ThumbnailSource
from mediarepo.media.thumbnailer import ImageTooLargeError, ThumbnailError
from mediarepo.media.thumbnails import ThumbnailMaker
from mediarepo.values import ThumbnailInfo

logger = logging.getLogger(__name__)

_NO_THUMBNAILS_MESSAGE = (
    "Cannot find any thumbnails for the requested media ({path}). This might mean the media"
    " is not a supported_media_format=(image/jpeg, image/jpg, image/webp, image/gif,"
    " image/png) or that thumbnailing failed for some other reason."
    " (Dynamic thumbnails are disabled on this server.)"
)


@attrs.frozen
class ThumbnailResponse:
    file: StoredFile
    media_type: str


class ThumbnailServing:
    """Answers thumbnail requests of local and cached remote media."""

    def __init__(self, maker: ThumbnailMaker, storage: ProviderChain) -> None:
        self._maker = maker
        self._storage = storage

    async def thumbnail(
        self, source: ThumbnailSource, request: ThumbnailRequest
    ) -> ThumbnailResponse:
        """The thumbnail answering ``request`` for ``source``: the smallest
        stored one covering it, else one made for it (whatever
        ``dynamic_thumbnails`` says), else the closest stored one."""
        static_type = self._maker.output_type(source.media_type)
        await self._maker.wait_for_pregeneration(source)
        rows = await source.rows()
        chosen = select_thumbnail(
            rows, request.width, request.height, request.method, request.animated, static_type
        )
        if chosen is None:
            chosen = await self._on_demand(source, request, rows, static_type)
        path = source.thumbnail_path(chosen)

        async def open_thumbnail() -> Responder:
            responder = await self._storage.fetch(path)
            if responder is None:
                # The row outlived its file: make it again with the row's parameters.
                logger.info("a thumbnail of %s is missing; regenerating", source.key)
                await self._maker.regenerate(source, chosen)
                responder = await self._storage.fetch(path)
                if responder is None:
                    raise NotFoundError()
            return responder

        return ThumbnailResponse(StoredFile(path, chosen.length, open_thumbnail), chosen.type)

    async def _on_demand(
        self,
        source: ThumbnailSource,
        request: ThumbnailRequest,
        rows: list[ThumbnailInfo],
        static_type: str | None,
    ) -> ThumbnailInfo:
        """The row answering a request no stored thumbnail covers: the one of
        exactly the right size if it exists (the original's own size, when
        the original is smaller than asked), else one made now, once however
        many ask at the same time. When none can be made, the closest stored
        one, or the error Synapse gives."""
        try:
            if static_type is None:
                raise ThumbnailError(f"cannot thumbnail media of type {source.media_type!r}")
            size = await self._maker.source_size(source)
            spec = on_demand_spec(size, static_type, request)
            for row in rows:
                if (row.width, row.height, row.type, row.method) == (
                    spec.width, spec.height, spec.type, spec.method,
                ):  # fmt: skip
                    return row
            return await self._maker.make(source, spec)
        except (ThumbnailError, NotFoundError) as e:
            closest = closest_thumbnail(
                rows, request.width, request.height, request.method, request.animated,
                static_type,
            )  # fmt: skip
            if closest is not None:
                return closest
            if isinstance(e, ImageTooLargeError):
                raise MatrixError(
                    413, Codes.TOO_LARGE, "The image is too large to thumbnail"
                ) from e
            if isinstance(e, NotFoundError):
                raise
            if self._maker.dynamic:
                raise MatrixError(400, Codes.UNKNOWN, "Failed to generate thumbnail.") from e
            raise MatrixError(
                400, Codes.UNKNOWN, _NO_THUMBNAILS_MESSAGE.format(path=request.path)
            ) from e

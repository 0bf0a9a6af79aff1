"""Which thumbnails there are to be: the sizes made at upload, the stored
one answering a request, the size made on demand when none does. Pure
arithmetic on sizes and rows, as the Matrix spec rules it (never upscaled,
never smaller than asked unless the original is) and readable by Synapse;
making them is :mod:`mediarepo.media.thumbnails`'s work.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import attrs

from mediarepo.config import ThumbnailSize
from mediarepo.media.source_formats import ANIMATED_THUMBNAIL_TYPE, THUMBNAIL_OUTPUT_TYPES, aspect
from mediarepo.values import ThumbnailInfo


@attrs.frozen
class ThumbnailSpec:
    """A thumbnail to make: its recorded size, type and method."""

    width: int
    height: int
    type: str
    method: str

    def info(self, length: int) -> ThumbnailInfo:
        return ThumbnailInfo(self.width, self.height, self.type, self.method, length)


@attrs.frozen
class ThumbnailRequest:
    """What a client asked for."""

    width: int
    height: int
    method: str  # "crop" or "scale"
    animated: bool
    path: str  # the request's path, which Synapse's error messages quote


def thumbnail_output_type(media_type: str | None) -> str | None:
    """The type of thumbnails made for ``media_type``, or ``None`` if it gets
    none. As in Synapse the lookup is exact after dropping parameters."""
    if not media_type:
        return None
    return THUMBNAIL_OUTPUT_TYPES.get(media_type.split(";", 1)[0].strip())


def fit_within_source(source_w: int, source_h: int, width: int, height: int) -> tuple[int, int]:
    """``aspect`` for a box, never larger than the source (scaling never upscales)."""
    fitted_w, fitted_h = aspect(source_w, source_h, width, height)
    return min(fitted_w, source_w), min(fitted_h, source_h)


def crop_within_source(source_w: int, source_h: int, width: int, height: int) -> tuple[int, int]:
    """The size of a ``crop`` thumbnail of a source for a ``width`` x
    ``height`` request, never larger than the source.

    The requested size when the source covers it; the source's own size when
    the source fits inside the request (the spec: the original rather than a
    thumbnail); otherwise the largest size of the requested aspect that the
    source holds.
    """
    if width <= source_w and height <= source_h:
        return width, height
    if source_w <= width and source_h <= height:
        return source_w, source_h
    if width * source_h > height * source_w:
        return source_w, max(1, source_w * height // width)
    return max(1, source_h * width // height), source_h


def target_size(
    source_w: int, source_h: int, width: int, height: int, method: str
) -> tuple[int, int]:
    """The size of the thumbnail answering a request, for a source of this size."""
    if method == "crop":
        return crop_within_source(source_w, source_h, width, height)
    return fit_within_source(source_w, source_h, width, height)


def pregeneration_specs(
    source_w: int,
    source_h: int,
    output_type: str,
    sizes: Iterable[ThumbnailSize],
    animated: bool,
) -> list[ThumbnailSpec]:
    """The thumbnails pre-generated for a source of this size.

    Each configured size is cut down to what the source allows (never
    upscaled). As in Synapse, sizes are keyed by (width, height, type): a crop
    size only claims a free key, a scale size takes it over, so equal sizes
    are made once and scale wins. The exception is a crop size cut down to the
    whole source: it keeps a crop row of its own, because Synapse answers a
    crop request only from crop rows. An animated source also gets an
    animated WebP of each distinct size and method.
    """
    by_key: dict[tuple[int, int, str, str], ThumbnailSpec] = {}
    for size in sizes:
        width, height = target_size(source_w, source_h, size.width, size.height, size.method)
        if size.method == "crop":
            whole_source = (width, height) == (source_w, source_h)
            shrunk = (width, height) != (size.width, size.height)
            key = (width, height, output_type, "crop" if whole_source and shrunk else "")
            by_key.setdefault(key, ThumbnailSpec(width, height, output_type, "crop"))
        else:
            by_key[(width, height, output_type, "")] = ThumbnailSpec(
                width, height, output_type, "scale"
            )
    specs = list(by_key.values())
    if animated:
        distinct = {(s.width, s.height, s.method): None for s in specs}
        specs += [ThumbnailSpec(w, h, ANIMATED_THUMBNAIL_TYPE, m) for (w, h, m) in distinct]
    return specs


def covers(row: ThumbnailInfo, width: int, height: int, method: str) -> bool:
    """Whether a stored thumbnail answers a request as the spec wants, by its
    size alone: a crop of the requested aspect (within a pixel of rounding)
    at least as large as asked; a scale (which has the source's aspect) at
    least as large as asked in one dimension, hence covering the box fitted
    to the source in both."""
    if row.method != method:
        return False
    if method == "crop":
        same_aspect = abs(width * row.height - height * row.width) <= max(width, height)
        return same_aspect and row.width >= width and row.height >= height
    return row.width >= width or row.height >= height


def _candidates(
    rows: Sequence[ThumbnailInfo], method: str, animated: bool, static_type: str | None
) -> tuple[list[ThumbnailInfo], str]:
    """The rows of ``method`` that may answer (animated WebP ones only for
    ``animated=true``, and then in preference), and the type wanted."""
    of_method = [r for r in rows if r.method == method]
    moving = [r for r in of_method if r.type == ANIMATED_THUMBNAIL_TYPE != static_type]
    if animated and moving:
        return moving, ANIMATED_THUMBNAIL_TYPE
    still = [r for r in of_method if r not in moving]
    return still, static_type or "image/png"


def select_thumbnail(
    rows: Sequence[ThumbnailInfo],
    width: int,
    height: int,
    method: str,
    animated: bool,
    static_type: str | None,
) -> ThumbnailInfo | None:
    """The smallest stored thumbnail that covers the request (see
    :func:`covers`), or ``None``; among equal sizes the wanted type, then the
    shorter file."""
    candidates, wanted = _candidates(rows, method, animated, static_type)
    covering = [r for r in candidates if covers(r, width, height, method)]
    if not covering:
        return None
    return min(covering, key=lambda r: (r.width * r.height, r.type != wanted, r.length))


def closest_thumbnail(
    rows: Sequence[ThumbnailInfo],
    width: int,
    height: int,
    method: str,
    animated: bool,
    static_type: str | None,
) -> ThumbnailInfo | None:
    """Synapse's pick among stored thumbnails, for when none covers the
    request and none can be made (the original is gone or unreadable here):
    rows at least as large as the request in one dimension first; among them
    (or else among all) the best by aspect, size, type and length."""
    candidates, wanted = _candidates(rows, method, animated, static_type)
    if method == "crop":

        def key(t: ThumbnailInfo) -> tuple[int, ...]:
            return (
                abs(width * t.height - height * t.width),
                0 if t.width >= width and t.height >= height else 1,
                abs((width - t.width) * (height - t.height)),
                t.type != wanted,
                t.length,
            )
    else:

        def key(t: ThumbnailInfo) -> tuple[int, ...]:
            return (abs((width - t.width) * (height - t.height)), t.type != wanted, t.length)

    preferred = [t for t in candidates if t.width >= width or t.height >= height]
    group = preferred or candidates
    return min(group, key=key) if group else None


@attrs.frozen
class SourceSize:
    """What the header of an original says: its displayed size and whether
    it is animated."""

    width: int
    height: int
    animated: bool


def on_demand_spec(
    source: SourceSize, static_type: str, request: ThumbnailRequest
) -> ThumbnailSpec:
    """The thumbnail to make for a request no stored one covers: its real
    size (recorded as such), animated WebP when asked for and possible."""
    width, height = target_size(
        source.width, source.height, request.width, request.height, request.method
    )
    animated = request.animated and source.animated
    output_type = ANIMATED_THUMBNAIL_TYPE if animated else static_type
    return ThumbnailSpec(width, height, output_type, request.method)

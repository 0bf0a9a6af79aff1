"""Which media thumbnails are made of, and of what type: the rules shared
by choosing thumbnails (``media/thumbnail_sizes.py``, ``media/thumbnails.py``)
and making them (``media/thumbnailer.py``, ``media/video.py``), without Pillow."""

from __future__ import annotations

# Source media type -> type of its (static) thumbnails. Synapse's for the
# types it thumbnails; for the others by the same rule: photos (HEIC, video
# frames) as JPEG, lossless sources that may carry transparency (BMP, TIFF)
# as PNG, and AVIF, used for photos and transparent stickers alike, as WebP,
# which keeps both small and transparent.
THUMBNAIL_OUTPUT_TYPES: dict[str, str] = {
    "image/jpeg": "image/jpeg",
    "image/jpg": "image/jpeg",
    "image/webp": "image/jpeg",
    "image/gif": "image/png",
    "image/png": "image/png",
    "image/heic": "image/jpeg",
    "image/heif": "image/jpeg",
    "image/avif": "image/webp",
    "image/bmp": "image/png",
    "image/x-ms-bmp": "image/png",
    "image/tiff": "image/png",
    "video/mp4": "image/jpeg",
    "video/quicktime": "image/jpeg",
    "video/webm": "image/jpeg",
}
ANIMATED_THUMBNAIL_TYPE = "image/webp"

# What each source media type must turn out to be (Pillow's format name, or
# VIDEO for what PyAV decodes: see mediarepo.media.video).
SOURCE_FORMATS = {
    "image/jpeg": "JPEG",
    "image/jpg": "JPEG",
    "image/png": "PNG",
    "image/gif": "GIF",
    "image/webp": "WEBP",
    "image/heic": "HEIF",
    "image/heif": "HEIF",
    "image/avif": "AVIF",
    "image/bmp": "BMP",
    "image/x-ms-bmp": "BMP",
    "image/tiff": "TIFF",
    "video/mp4": "VIDEO",
    "video/quicktime": "VIDEO",
    "video/webm": "VIDEO",
}
# Each source format's family: the name config (thumbnail_formats), metrics
# and events use for it. A few fixed names, so metric labels stay bounded.
SOURCE_FAMILIES = {
    "JPEG": "jpeg",
    "PNG": "png",
    "GIF": "gif",
    "WEBP": "webp",
    "HEIF": "heic",
    "AVIF": "avif",
    "BMP": "bmp",
    "TIFF": "tiff",
    "VIDEO": "video",
}


def bare_type(media_type: str) -> str:
    return media_type.split(";", 1)[0].strip().lower()


def source_family(media_type: str | None) -> str | None:
    """The family (``SOURCE_FAMILIES``) of a source media type, or ``None``
    if it is not one thumbnails are made of."""
    found = SOURCE_FORMATS.get(bare_type(media_type)) if media_type else None
    return SOURCE_FAMILIES[found] if found is not None else None


def is_video(media_type: str | None) -> bool:
    return source_family(media_type) == "video"


def aspect(source_w: int, source_h: int, max_w: int, max_h: int) -> tuple[int, int]:
    """The largest size with the source's aspect ratio that fits ``max_w`` x
    ``max_h`` (Synapse's rounding; never zero)."""
    if max_w * source_h < max_h * source_w:
        return max_w, max(max_w * source_h // source_w, 1)
    return max(max_h * source_w // source_h, 1), max_h

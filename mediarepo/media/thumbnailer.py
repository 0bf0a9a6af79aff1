"""Pillow's part of thumbnailing: open a source image, resize or crop it, encode the result.

Everything here blocks, and is meant to run on the thumbnail thread pool;
:mod:`mediarepo.media.thumbnails` decides what to make and stores it. The
rules (output types, aspect fitting, cropping, quality) are Synapse's, so the
files we make match the ones a Synapse sharing the media store would make.

A :class:`Thumbnailer` is used by one thread at a time. No Pillow global is
changed: the pixel limit is checked here from the header, before any pixel
is decoded, and ``ImageFile.LOAD_TRUNCATED_IMAGES`` stays off, so a truncated
or corrupt file fails rather than giving a half-grey thumbnail. Whatever goes
wrong inside Pillow comes out as :class:`ThumbnailError`.

Memory: the decoded source is kept (once, in the mode it is resized in) for
the life of the instance, so that several sizes cost one decode. A large JPEG
is decoded at a reduced scale (``draft``) when only a small thumbnail is
wanted. Animated sources are decoded frame by frame, at most
``MAX_ANIMATED_FRAMES + 1`` frames per animated thumbnail.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from contextlib import contextmanager
from types import TracebackType
from typing import Any, NamedTuple, Self

import pillow_heif
from PIL import Image

from mediarepo.media.orientation import (
    SWAPS_AXES,
    TRANSPOSITIONS,
    WHOLE,
    Box,
    orientation,
    source_window,
)
from mediarepo.media.source_formats import SOURCE_FORMATS, bare_type

# HEIF's decoder, registered with Pillow once: only the primary picture is
# read (no embedded thumbnails, depth maps or auxiliary pictures).
pillow_heif.register_heif_opener(thumbnails=False, depth_images=False, aux_images=False)

# An animated source with more frames than this gets a still thumbnail (see
# Thumbnailer.scale).
MAX_ANIMATED_FRAMES = 100

# The only decoders Pillow may try on a source (AVIF where this Pillow has it).
Image.init()
_OPENABLE_FORMATS = tuple(
    f for f in ("JPEG", "PNG", "GIF", "WEBP", "HEIF", "AVIF", "BMP", "TIFF") if f in Image.OPEN
)
# Formats whose several frames are an animation (a TIFF's pages or a HEIF's
# several pictures are not).
_ANIMATED_FORMATS = frozenset({"PNG", "GIF", "WEBP", "AVIF"})
# Bytes a decode holds per source pixel, in units of the 4 bytes of a decoded
# pixel that thumbnail_pixel_budget counts: libheif and libavif decode into
# planes of their own before Pillow copies the pixels out. Measured (peak RSS
# growth decoding a 4000x3000 image, against 48 MB for the decoded image, as
# a PNG's decode takes): HEIC 88-99 MB, AVIF 113-141 MB.
_DECODE_COST = {"HEIF": 2, "AVIF": 3}
_OUTPUT_FORMATS = {"image/jpeg": "JPEG", "image/png": "PNG", "image/webp": "WEBP"}

_QUALITY = 80
_DEFAULT_FRAME_MS = 100
_MAX_LOOP = 65535
# resize() first shrinks by an integer factor with reduce() while the image is
# more than this many times the target, then resamples the rest with LANCZOS.
_REDUCING_GAP = 2.0
_LANCZOS = Image.Resampling.LANCZOS


class ThumbnailError(Exception):
    """This source cannot be thumbnailed; the message says why."""


class ImageTooLargeError(ThumbnailError):
    """The source (or the requested thumbnail) has too many pixels."""


@contextmanager
def _pillow_errors(action: str) -> Iterator[None]:
    """Turn whatever Pillow (or the file) raises into a :class:`ThumbnailError`."""
    try:
        yield
    except ThumbnailError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageTooLargeError(f"{action}: {e}") from e
    except Exception as e:
        # Decoders raise OSError, ValueError, SyntaxError, EOFError,
        # struct.error, zlib.error, MemoryError...: all mean a bad source.
        raise ThumbnailError(f"{action}: {type(e).__name__}: {e}") from e


def _has_alpha(image: Image.Image) -> bool:
    return "A" in image.getbands() or image.info.get("transparency") is not None


def _resizable(image: Image.Image) -> Image.Image:
    """``image`` in a mode to resize and encode: RGB or CMYK kept, anything
    with transparency as premultiplied RGBa (what LANCZOS needs for alpha;
    converted once here rather than by every resize), the rest RGB."""
    mode = image.mode
    if mode in ("RGB", "CMYK"):
        return image
    if mode == "RGBA":
        return image.convert("RGBa")
    if mode == "I" or mode.startswith("I;16"):
        # 16-bit grey: scale to 8 bits rather than let convert() clip at 255.
        image = image.convert("I").point(lambda v: v * (1 / 257)).convert("L")
    if _has_alpha(image):
        return image.convert("RGBA").convert("RGBa")
    return image.convert("RGB")


def _rgb_icc_profile(image: Image.Image) -> bytes | None:
    """The source's ICC profile, if it is an RGB one (so still right for the
    RGB thumbnail); other metadata is never copied."""
    icc = image.info.get("icc_profile")
    if isinstance(icc, bytes) and icc[16:20] == b"RGB ":
        return icc
    return None


class _Decoded(NamedTuple):
    """The source's pixels, ready to resize: in stored orientation, and maybe
    drafted smaller; ``box`` is the whole source in ``image``'s coordinates."""

    image: Image.Image
    box: Box
    reduced: bool


class Thumbnailer:
    """One source image, from which thumbnails of any size are made.

    Opening reads only the header: the type is checked against the file, the
    pixel limit is enforced and the EXIF orientation read. Pixels are decoded
    at the first :meth:`scale`, :meth:`crop` or :meth:`prepare`, and kept for
    the next. Close it (or use it as a context manager) when done.
    """

    def __init__(self, path: str, media_type: str, max_image_pixels: int) -> None:
        self._path = path
        self._max_pixels = max_image_pixels
        self._image: Image.Image | None = None
        self._decoded: _Decoded | None = None
        self._too_many_frames = False
        expected = SOURCE_FORMATS.get(bare_type(media_type))
        if expected is None:
            raise ThumbnailError(f"cannot thumbnail media of type {media_type!r}")
        self._format = expected
        self._media_type = media_type
        image = self._open()
        # Kept, unloaded, for the first decode.
        self._image = image
        try:
            with _pillow_errors("cannot read the image"):
                self._source_size = image.size
                self._orientation = orientation(image)
                # An MPO (a JPEG with more pictures behind it) is not animated.
                self.is_animated = self._format in _ANIMATED_FORMATS and bool(
                    getattr(image, "is_animated", False)
                )
                self._icc = _rgb_icc_profile(image)
                # PNG and WebP declare their frame count in the header; GIF's
                # would mean reading the whole file, so it is left unknown.
                declared = getattr(image, "n_frames", None) if expected != "GIF" else None
                self._declared_frames = declared if isinstance(declared, int) else None
                self._loop = image.info.get("loop", 0)
                self._duration = image.info.get("duration")
        except BaseException:
            self.close()
            raise
        width, height = self._source_size
        if self._orientation in SWAPS_AXES:
            width, height = height, width
        self.width = width
        self.height = height

    # -- public ---------------------------------------------------------------

    def scale(self, width: int, height: int, output_type: str, animated: bool) -> bytes:
        """The whole image resized to exactly ``width`` x ``height``, encoded
        as ``output_type``.

        With ``animated`` and an animated source, an animated WebP whatever
        ``output_type`` is. A source with more than ``MAX_ANIMATED_FRAMES``
        frames (found after decoding at most one frame more) instead gets a
        still of its first frame as ``output_type``, as a static source does:
        the caller asks for ``image/webp``, so that is then a single-frame
        WebP and the bytes always match the type the caller records.
        """
        return self._render(width, height, (width, height), WHOLE, output_type, animated)

    def crop(self, width: int, height: int, output_type: str, animated: bool) -> bytes:
        """``width`` x ``height`` from the middle of the image scaled to cover
        it (scaling up if needed), encoded as in :meth:`scale`.

        Synapse's geometry (scale to the cover size, then cut the middle rows or
        columns), done as one resize of just the part kept, so a thin source
        cropped to a square never allocates its huge cover size.
        """
        self._check_request(width, height)
        cover, window = self._cover(width, height)
        return self._render(width, height, cover, window, output_type, animated)

    def pixels_to_decode(self, max_width: int, max_height: int) -> int:
        """How many pixels making thumbnails up to ``max_width`` x
        ``max_height`` decodes, as ``thumbnail_pixel_budget`` counts them:
        the source's (more for formats whose decoders hold copies of their
        own), or for a JPEG the reduced scale libjpeg decodes at (as
        :meth:`prepare` asks for it)."""
        source_w, source_h = self._source_size
        if self._format != "JPEG" or max_width < 1 or max_height < 1:
            return source_w * source_h * _DECODE_COST.get(self._format, 1)
        cover, _ = self._cover(max_width, max_height)
        need_w, need_h = self._stored_size(*cover)
        # Pillow's choice: the largest of 1/8, 1/4, 1/2 still covering the need.
        room = min(source_w // max(need_w, 1), source_h // max(need_h, 1))
        factor = 1
        for candidate in (8, 4, 2):
            if room >= candidate:
                factor = candidate
                break
        return -(-source_w // factor) * -(-source_h // factor)

    def prepare(self, max_width: int, max_height: int) -> None:
        """Optional: decode now at a resolution good enough for every
        :meth:`scale` or :meth:`crop` up to ``max_width`` x ``max_height``.

        It matters only for JPEG, whose decode is sized to the thumbnail:
        without it, asking for small sizes before larger ones decodes again
        (reopening the file) at each larger scale.
        """
        self._check_request(max_width, max_height)
        cover, _ = self._cover(max_width, max_height)
        self._decode(*self._stored_size(*cover))

    def close(self) -> None:
        image, self._image = self._image, None
        decoded, self._decoded = self._decoded, None
        if image is not None:
            image.close()
        if decoded is not None:
            decoded.image.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- rendering --------------------------------------------------------------

    def _render(
        self,
        width: int,
        height: int,
        cover: tuple[int, int],
        window: Box,
        output_type: str,
        animated: bool,
    ) -> bytes:
        """``window`` (fractions of the oriented image, which is ``cover`` big
        when scaled) resized to ``width`` x ``height`` and encoded."""
        self._check_request(width, height)
        output_format = _OUTPUT_FORMATS.get(bare_type(output_type))
        if output_format is None:
            raise ThumbnailError(f"cannot make thumbnails of type {output_type!r}")
        if animated and self.is_animated and not self._too_many_frames:
            data = self._render_animated(width, height, window)
            if data is not None:
                return data
        decoded = self._decode(*self._stored_size(*cover))
        with _pillow_errors("cannot resize the image"):
            thumbnail = self._resample(decoded.image, decoded.box, width, height, window)
        with _pillow_errors("cannot encode the thumbnail"):
            return self._encode(thumbnail, output_format)

    def _render_animated(self, width: int, height: int, window: Box) -> bytes | None:
        """An animated WebP, or ``None`` if the source has too many frames."""
        if self._declared_frames is not None and self._declared_frames > MAX_ANIMATED_FRAMES:
            self._too_many_frames = True
            return None
        frames: list[Image.Image] = []
        durations: list[int] = []
        image = self._open()
        try:
            with _pillow_errors("cannot decode the animation"):
                for index in range(MAX_ANIMATED_FRAMES + 1):
                    try:
                        image.seek(index)
                    except EOFError:
                        break
                    if index == MAX_ANIMATED_FRAMES:
                        self._too_many_frames = True
                        return None
                    # A GIF's canvas can grow with its frames.
                    self._check_pixels(*image.size)
                    frame = image.convert("RGBA")
                    durations.append(self._frame_duration(image.info.get("duration")))
                    full: Box = (0.0, 0.0, float(frame.width), float(frame.height))
                    frames.append(self._resample(frame, full, width, height, window))
                    frame.close()
        finally:
            image.close()
        if not frames:
            raise ThumbnailError("the animation has no frames")
        loop = self._loop if isinstance(self._loop, int) and 0 <= self._loop <= _MAX_LOOP else 0
        with _pillow_errors("cannot encode the animated thumbnail"):
            return self._save(
                frames[0],
                "WEBP",
                save_all=True,
                append_images=frames[1:],
                duration=durations,
                loop=loop,
                minimize_size=True,
            )

    def _frame_duration(self, own: object) -> int:
        for value in (own, self._duration):
            if isinstance(value, int | float) and value > 0:
                return max(1, round(value))
        return _DEFAULT_FRAME_MS

    def _resample(
        self, image: Image.Image, box: Box, width: int, height: int, window: Box
    ) -> Image.Image:
        """The displayed ``window`` of ``image`` (whose ``box`` is the whole
        stored source) at ``width`` x ``height``: resized in stored orientation,
        then turned, so only the small result is transposed."""
        x0, y0, x1, y1 = source_window(self._orientation, window)
        left, top, right, bottom = box
        span_x, span_y = right - left, bottom - top
        region: Box = (
            min(max(left + x0 * span_x, 0.0), image.width),
            min(max(top + y0 * span_y, 0.0), image.height),
            min(max(left + x1 * span_x, 0.0), image.width),
            min(max(top + y1 * span_y, 0.0), image.height),
        )
        size = self._stored_size(width, height)
        resized = image.resize(size, _LANCZOS, box=region, reducing_gap=_REDUCING_GAP)
        if resized.mode == "RGBa":
            resized = resized.convert("RGBA")
        transposition = TRANSPOSITIONS.get(self._orientation)
        if transposition is not None:
            resized = resized.transpose(transposition)
        return resized

    def _encode(self, image: Image.Image, output_format: str) -> bytes:
        if output_format == "JPEG":
            if image.mode != "RGB":
                image = image.convert("RGB")
        elif image.mode == "CMYK":
            image = image.convert("RGB")
        return self._save(image, output_format)

    def _save(self, image: Image.Image, output_format: str, **params: Any) -> bytes:
        # No EXIF, XMP or other source metadata: the pixels are already turned
        # upright, and thumbnails should not leak what the source carried.
        image.info = {}
        if self._icc is not None:
            params["icc_profile"] = self._icc
        out = io.BytesIO()
        image.save(out, format=output_format, quality=_QUALITY, **params)
        return out.getvalue()

    # -- decoding ---------------------------------------------------------------

    def _open(self) -> Image.Image:
        """The source, opened (header only) and checked."""
        with _pillow_errors("cannot open the image"):
            image = Image.open(self._path, formats=_OPENABLE_FORMATS)
        try:
            found = "JPEG" if image.format == "MPO" else image.format
            if found != self._format:
                raise ThumbnailError(
                    f"mislabelled: the file is {image.format}, not {self._media_type!r}"
                )
            self._check_pixels(*image.size)
        except BaseException:
            image.close()
            raise
        return image

    def _decode(self, need_w: int, need_h: int) -> _Decoded:
        """The source's pixels, with at least ``need_w`` x ``need_h`` (stored
        orientation) of resolution; decoded again only if the kept decode was
        drafted smaller than that."""
        decoded = self._decoded
        if decoded is not None:
            box_w = decoded.box[2] - decoded.box[0]
            box_h = decoded.box[3] - decoded.box[1]
            if not decoded.reduced or (box_w >= need_w and box_h >= need_h):
                return decoded
            # Drop the small decode before making the larger one.
            self._decoded = None
            decoded.image.close()
        image, self._image = self._image, None
        if image is None:
            image = self._open()
        try:
            with _pillow_errors("cannot decode the image"):
                source_w, source_h = image.size
                box: Box = (0.0, 0.0, float(source_w), float(source_h))
                if self._format == "JPEG":
                    # libjpeg decodes at 1/2, 1/4 or 1/8 scale, the smallest
                    # still at least as large as asked for.
                    drafted = image.draft("RGB", (need_w, need_h))
                    if drafted is not None:
                        box = drafted[1]
                image.load()
                ready = _resizable(image)
        except BaseException:
            image.close()
            raise
        if ready is not image:
            image.close()
        reduced = ready.size != (source_w, source_h)
        self._decoded = _Decoded(ready, box, reduced)
        return self._decoded

    # -- sizes ------------------------------------------------------------------

    def _cover(self, width: int, height: int) -> tuple[tuple[int, int], Box]:
        """The scaled size covering ``width`` x ``height``, and the middle
        window of it that a crop keeps (as fractions)."""
        source_w, source_h = self.width, self.height
        if width * source_h > height * source_w:
            scaled_h = width * source_h // source_w
            top = (scaled_h - height) // 2
            return (width, scaled_h), (0.0, top / scaled_h, 1.0, (top + height) / scaled_h)
        scaled_w = height * source_w // source_h
        left = (scaled_w - width) // 2
        return (scaled_w, height), (left / scaled_w, 0.0, (left + width) / scaled_w, 1.0)

    def _stored_size(self, width: int, height: int) -> tuple[int, int]:
        """A displayed size in the stored image's orientation."""
        if self._orientation in SWAPS_AXES:
            return height, width
        return width, height

    def _check_pixels(self, width: int, height: int) -> None:
        if width < 1 or height < 1:
            raise ThumbnailError(f"the image is empty ({width}x{height})")
        if width * height >= self._max_pixels:
            raise ImageTooLargeError(
                f"the image is {width}x{height}, over the limit of {self._max_pixels} pixels"
            )

    def _check_request(self, width: int, height: int) -> None:
        if width < 1 or height < 1:
            raise ThumbnailError(f"cannot make a {width}x{height} thumbnail")
        if width * height >= self._max_pixels:
            raise ImageTooLargeError(
                f"a {width}x{height} thumbnail is over the limit of {self._max_pixels} pixels"
            )

"""PyAV's part of thumbnailing: a still frame from the start of a video.

Like :mod:`mediarepo.media.thumbnailer` this blocks and runs on the
thumbnail thread pool; the frame, once decoded, is resized and encoded by the
same code as any image (:class:`VideoThumbnailer` is a
:class:`~mediarepo.media.thumbnailer.Thumbnailer` whose pixels come from
FFmpeg instead of Pillow).

A video is hostile input to a much larger decoder than an image is, so every
decode is bounded before it starts:

- the demuxer is the one the media type names (MP4 and QuickTime: ``mov``;
  WebM: ``webm``), never probed, so a file typed ``video/mp4`` that is a
  playlist or anything else is refused rather than opened as that;
- only a few common video codecs are decoded;
- the declared resolution is checked against ``max_image_pixels`` before any
  frame is decoded, and FFmpeg's own ``max_pixels`` refuses a frame larger
  than that should the stream change size midway;
- every byte is read through :class:`BoundedReader`: at most
  ``MAX_BYTES_READ`` bytes in all, and no read once the wall-clock deadline
  has passed; a read refused ends the demuxer's (and so the decoder's) work
  with an error. The decode loop checks the same deadline between packets,
  and only frames from the first ``MAX_FRAME_SECONDS`` are looked at. So a
  decode cannot run on for ever: each step works on bytes already read,
  and the bytes and the time are capped.

Whatever goes wrong comes out as
:class:`~mediarepo.media.thumbnailer.ThumbnailError`.
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import av
import av.error
from PIL import Image

from mediarepo.media.orientation import SWAPS_AXES
from mediarepo.media.thumbnailer import (
    ImageTooLargeError,
    Thumbnailer,
    ThumbnailError,
    _Decoded,
)

# Media type -> the FFmpeg demuxer that reads it.
VIDEO_DEMUXERS = {"video/mp4": "mov", "video/quicktime": "mov", "video/webm": "webm"}
# The codecs whose frames are decoded; anything else gets no thumbnail.
VIDEO_CODECS = frozenset({"h264", "hevc", "mpeg4", "vp8", "vp9", "av1"})
# Wall-clock seconds for opening the video and decoding its frame.
MAX_DECODE_SECONDS = 10.0
# Bytes of the file read for that (a non-"fast start" MP4 has its index at
# the end: seeking there is free, reading it counts).
MAX_BYTES_READ = 32 * 1024 * 1024
# The frame comes from the first seconds of the video.
MAX_FRAME_SECONDS = 5.0
# thumbnail_pixel_budget units (4 bytes) held per pixel while decoding: the
# decoder keeps reference frames (1.5 bytes a pixel each, several of them),
# and the frame is then converted to RGB. Measured: a 3840x2160 frame (33 MB
# at 4 bytes a pixel) decoded and thumbnailed grew the peak RSS by 167 MB
# (H.264) and 127 MB (VP9).
VIDEO_DECODE_COST = 5

# Displayed rotation (degrees counter-clockwise, as FFmpeg's display matrix
# gives it) -> the EXIF orientation that shows the same, so the frame is
# turned by the thumbnailer's own code.
_ORIENTATIONS = {0: 1, 90: 8, 180: 3, -180: 3, -90: 6, 270: 6}


class VideoLimitError(ThumbnailError):
    """The video needed more time or bytes than a thumbnail may take."""


class BoundedReader(io.RawIOBase):
    """A file, read at most ``max_bytes`` in all and not after ``deadline``
    (on ``clock``, a monotonic clock in seconds)."""

    def __init__(
        self,
        path: str,
        max_bytes: int,
        deadline: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__()
        self._file = open(path, "rb")  # closed by close()
        self._remaining = max_bytes
        self._max_bytes = max_bytes
        self._deadline = deadline
        self._clock = clock

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        if self._clock() > self._deadline:
            raise VideoLimitError("decoding the video took too long")
        if self._remaining <= 0:
            raise VideoLimitError(f"the video needed more than {self._max_bytes} bytes read")
        view = memoryview(buffer).cast("B")
        want = min(len(view), self._remaining)
        got = self._file.readinto(view[:want])
        self._remaining -= got
        return got

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        return self._file.seek(offset, whence)

    def tell(self) -> int:
        return self._file.tell()

    def close(self) -> None:
        self._file.close()
        super().close()


@contextmanager
def _video_errors(action: str) -> Iterator[None]:
    try:
        yield
    except ThumbnailError:
        raise
    except Exception as e:
        # av.error.FFmpegError (InvalidDataError, EOFError, ...), ValueError,
        # MemoryError, or what the reader raised (re-raised above).
        raise ThumbnailError(f"{action}: {type(e).__name__}: {e}") from e


class VideoThumbnailer(Thumbnailer):
    """A video's first frame, from which thumbnails are made as from an image.

    Opening reads only the container's header (checking the demuxer, codec
    and declared resolution); the frame is decoded at the first
    :meth:`scale`, :meth:`crop` or :meth:`prepare`, or at once with
    ``decode_now`` (which the caller asks for when it needs the displayed
    size: a video's rotation is known only from its frames).
    """

    def __init__(
        self,
        path: str,
        media_type: str,
        max_image_pixels: int,
        *,
        decode_now: bool = False,
        clock: Callable[[], float] = time.monotonic,
        max_seconds: float = MAX_DECODE_SECONDS,
        max_bytes: int = MAX_BYTES_READ,
    ) -> None:
        self._path = path
        self._max_pixels = max_image_pixels
        self._media_type = media_type
        self._image = None
        self._decoded = None
        self._too_many_frames = False
        self._format = "VIDEO"
        self.is_animated = False
        self._icc = None
        self._declared_frames = None
        self._loop = 0
        self._duration = None
        self._clock = clock
        self._max_seconds = max_seconds
        self._max_bytes = max_bytes
        demuxer = VIDEO_DEMUXERS.get(media_type.split(";", 1)[0].strip().lower())
        if demuxer is None:
            raise ThumbnailError(f"cannot thumbnail media of type {media_type!r}")
        self._demuxer = demuxer
        with self._container() as (_, stream):
            self._source_size = (stream.codec_context.width, stream.codec_context.height)
        self._orientation = 1
        self.width, self.height = self._source_size
        if decode_now:
            self._decode(*self._source_size)

    def pixels_to_decode(self, max_width: int, max_height: int) -> int:
        source_w, source_h = self._source_size
        return source_w * source_h * VIDEO_DECODE_COST

    def close(self) -> None:
        decoded, self._decoded = self._decoded, None
        if decoded is not None:
            decoded.image.close()

    @contextmanager
    def _container(self) -> Iterator[tuple[Any, Any]]:
        """The opened container and its video stream, checked."""
        deadline = self._clock() + self._max_seconds
        with _video_errors("cannot open the video"):
            reader = BoundedReader(self._path, self._max_bytes, deadline, self._clock)
        try:
            with _video_errors("cannot open the video"):
                container = av.open(
                    reader,
                    "r",
                    format=self._demuxer,
                    # Probe no further than a few MB and seconds of the file;
                    # the decoder that probing opens is bounded as ours is.
                    options={
                        "probesize": str(4 * 1024 * 1024),
                        "analyzeduration": "5000000",
                        **self._decoder_options(),
                    },
                    timeout=self._max_seconds,
                )
            try:
                with _video_errors("cannot read the video"):
                    if not container.streams.video:
                        raise ThumbnailError("the file has no video stream")
                    stream = container.streams.video[0]
                    codec = stream.codec_context.name
                    if codec not in VIDEO_CODECS:
                        raise ThumbnailError(f"cannot decode {codec!r} video")
                    self._check_pixels(stream.codec_context.width, stream.codec_context.height)
                    yield container, stream
            finally:
                container.close()
        finally:
            reader.close()

    def _decoder_options(self) -> dict[str, str]:
        # FFmpeg refuses frames of max_pixels or more (ours: under the limit).
        return {"max_pixels": str(max(self._max_pixels - 1, 1)), "threads": "1"}

    def _open(self) -> Image.Image:
        raise ThumbnailError("a video has no image to open")

    def _decode(self, need_w: int, need_h: int) -> _Decoded:
        if self._decoded is not None:
            return self._decoded
        image = self._first_frame()
        box = (0.0, 0.0, float(image.width), float(image.height))
        self._decoded = _Decoded(image, box, False)
        return self._decoded

    def _first_frame(self) -> Image.Image:
        with self._container() as (container, stream):
            deadline = self._clock() + self._max_seconds
            context = stream.codec_context
            # One thread: fewer frames held, and a decode confined to the
            # pool thread that runs it.
            context.thread_count = 1
            context.options = self._decoder_options()
            with _video_errors("cannot decode the video"):
                for packet in container.demux(stream):
                    if self._clock() > deadline:
                        raise VideoLimitError("decoding the video took too long")
                    for frame in packet.decode():
                        if frame.time is not None and frame.time > MAX_FRAME_SECONDS:
                            raise ThumbnailError(
                                f"no frame in the first {MAX_FRAME_SECONDS:g} seconds"
                            )
                        return self._upright(frame)
        raise ThumbnailError("the video has no frame")

    def _upright(self, frame: Any) -> Image.Image:
        """The frame as an RGB image, its size checked, and its rotation
        taken as the orientation the thumbnailer applies."""
        if frame.width * frame.height >= self._max_pixels:
            raise ImageTooLargeError(
                f"the video is {frame.width}x{frame.height}, over the limit"
                f" of {self._max_pixels} pixels"
            )
        image: Image.Image = frame.to_image()
        self._source_size = image.size
        self._orientation = _ORIENTATIONS.get(round(frame.rotation), 1)
        width, height = image.size
        if self._orientation in SWAPS_AXES:
            width, height = height, width
        self.width, self.height = width, height
        return image

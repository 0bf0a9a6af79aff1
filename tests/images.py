"""Real images for tests, made with Pillow."""

from __future__ import annotations

import io
import struct
import zlib

from PIL import Image


def encode(image: Image.Image, fmt: str, **params: object) -> bytes:
    out = io.BytesIO()
    image.save(out, fmt, **params)
    return out.getvalue()


def jpeg(width: int, height: int, orientation: int | None = None) -> bytes:
    image = Image.new("RGB", (width, height), (200, 30, 30))
    # A marker in the top-left corner, to tell orientations apart.
    image.paste((0, 0, 255), (0, 0, max(1, width // 4), max(1, height // 4)))
    if orientation is None:
        return encode(image, "JPEG", quality=90)
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(image, "JPEG", quality=90, exif=exif)


def png_with_alpha(width: int, height: int) -> bytes:
    image = Image.new("RGBA", (width, height), (0, 255, 0, 0))
    image.paste((255, 0, 0, 255), (width // 4, height // 4, width // 2, height // 2))
    return encode(image, "PNG")


def png(width: int, height: int) -> bytes:
    return encode(Image.new("RGB", (width, height), (10, 20, 30)), "PNG")


def animated_gif(width: int, height: int, frames: int = 3) -> bytes:
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)]
    images = [Image.new("RGB", (width, height), colours[i % 4]) for i in range(frames)]
    return encode(images[0], "GIF", save_all=True, append_images=images[1:], duration=80, loop=0)


def png_bomb(width: int = 100_000, height: int = 100_000) -> bytes:
    """A tiny PNG whose header claims ``width`` x ``height`` pixels."""
    data = bytearray(png(1, 1))
    # The IHDR chunk: length (4), type (4), then width and height, then CRC.
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[12:29]))
    data[29:33] = struct.pack(">I", crc)
    return bytes(data)


def size_of(data: bytes) -> tuple[int, int]:
    with Image.open(io.BytesIO(data)) as image:
        return image.size


def pixel(image: Image.Image, xy: tuple[int, int]) -> tuple[int, ...]:
    """The channels of one pixel of a multi-band image (Pillow types
    ``getpixel`` for every mode at once)."""
    value = image.getpixel(xy)
    assert isinstance(value, tuple), value
    return value


def frame_count(image: Image.Image) -> int:
    """How many frames an image has (only multi-frame formats say)."""
    return int(getattr(image, "n_frames", 1))


def open_image(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def heic(width: int, height: int) -> bytes:
    """A HEIC photo (pillow-heif, registered by mediarepo's thumbnailer)."""
    import pillow_heif

    pillow_heif.register_heif_opener()
    image = Image.new("RGB", (width, height), (200, 30, 30))
    image.paste((0, 0, 255), (0, 0, max(1, width // 4), max(1, height // 4)))
    return encode(image, "HEIF", quality=80)


def avif_with_alpha(width: int, height: int) -> bytes:
    image = Image.new("RGBA", (width, height), (0, 255, 0, 0))
    image.paste((255, 0, 0, 255), (width // 4, height // 4, width // 2, height // 2))
    return encode(image, "AVIF", quality=80)


def bmp(width: int, height: int) -> bytes:
    return encode(Image.new("RGB", (width, height), (10, 20, 30)), "BMP")


def tiff_with_alpha(width: int, height: int) -> bytes:
    image = Image.new("RGBA", (width, height), (0, 255, 0, 0))
    image.paste((255, 0, 0, 255), (width // 4, height // 4, width // 2, height // 2))
    return encode(image, "TIFF", compression="tiff_deflate")


def video(
    container: str,
    codec: str,
    width: int,
    height: int,
    frames: int = 10,
    rotation: int | None = None,
) -> bytes:
    """A short video (PyAV: its wheels carry FFmpeg's encoders): ``frames``
    red frames at 10 a second, blue in the top-left quarter as stored."""
    import av

    out = io.BytesIO()
    with av.open(out, "w", format=container) as output:
        stream = output.add_stream(codec, rate=10)
        assert isinstance(stream, av.VideoStream), codec
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        if rotation is not None:
            stream.set_display_rotation(rotation)
        image = Image.new("RGB", (width, height), (200, 30, 30))
        image.paste((0, 0, 255), (0, 0, width // 4, height // 4))
        for _ in range(frames):
            frame = av.VideoFrame.from_bytes(image.convert("RGBA").tobytes(), width, height)
            for packet in stream.encode(frame):
                output.mux(packet)
        for packet in stream.encode():
            output.mux(packet)
    return out.getvalue()


def mp4(width: int, height: int, rotation: int | None = None) -> bytes:
    return video("mp4", "h264", width, height, rotation=rotation)


def webm(width: int, height: int) -> bytes:
    return video("webm", "libvpx", width, height)


def webm_huge_declared() -> bytes:
    """A VP8 WebM whose container and keyframe both claim 16383 x 16383
    pixels (its real frames are 320 x 320)."""
    data = webm(320, 320)
    # Matroska PixelWidth (B0) and PixelHeight (BA), two-byte values.
    for element in (b"\xb0\x82", b"\xba\x82"):
        assert data.count(element + b"\x01\x40") == 1
        data = data.replace(element + b"\x01\x40", element + b"\x3f\xff")
    # The VP8 keyframe header: start code, then 14-bit width and height.
    keyframe = b"\x9d\x01\x2a\x40\x01\x40\x01"
    assert data.count(keyframe) == 1
    return data.replace(keyframe, b"\x9d\x01\x2a\xff\x3f\xff\x3f")

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


def open_image(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image

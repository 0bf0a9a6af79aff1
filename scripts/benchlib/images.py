"""Test JPEGs: 3000x2000 pictures of about 1.5 MB, distinct in content.

Making one takes most of a second, so they are made once (never inside a
timed section) and cached on disk. Each upload is then made unique by a
random JPEG comment segment, so a server that deduplicates by content
hash still sees a new file while the pixels (and the thumbnailing work)
stay the same.
"""

from __future__ import annotations

import io
import os
import random
import struct
from collections.abc import Callable

WIDTH, HEIGHT = 3000, 2000
_VERSION = 1


def make_jpeg(seed: int, width: int = WIDTH, height: int = HEIGHT) -> bytes:
    from PIL import Image, ImageDraw, ImageFilter

    rng = random.Random(seed)
    # A smooth random colour field, then shapes, a blur and film-like grain.
    cols, rows = 30, 20
    field = Image.new("RGB", (cols, rows))
    field.putdata(
        [(rng.randrange(256), rng.randrange(256), rng.randrange(256)) for _ in range(cols * rows)]
    )
    img = field.resize((width, height), Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(img)
    for _ in range(60):
        x0, y0 = rng.randrange(width), rng.randrange(height)
        x1, y1 = x0 + rng.randrange(20, 600), y0 + rng.randrange(20, 400)
        colour = (rng.randrange(256), rng.randrange(256), rng.randrange(256))
        if rng.random() < 0.5:
            draw.ellipse((x0, y0, x1, y1), fill=colour)
        else:
            draw.rectangle((x0, y0, x1, y1), fill=colour)
    img = img.filter(ImageFilter.GaussianBlur(2))
    # effect_noise has no seed of its own; blend it at a seeded strength so
    # the grain differs between images too.
    grain = Image.effect_noise((width, height), 40).convert("RGB")
    img = Image.blend(img, grain, 0.15 + rng.random() * 0.02)
    out = io.BytesIO()
    img.save(out, "JPEG", quality=87)
    return out.getvalue()


def cache_dir() -> str:
    base = os.environ.get("MEDIAREPO_BENCH_CACHE") or os.path.expanduser("~/.cache/mediarepo-bench")
    return os.path.join(base, f"images-v{_VERSION}")


def jpegs(
    count: int, *, first_seed: int = 0, progress: Callable[[str], None] | None = None
) -> list[bytes]:
    """``count`` distinct JPEGs, seeds ``first_seed``.., from the cache or made now."""
    directory = cache_dir()
    os.makedirs(directory, exist_ok=True)
    result: list[bytes] = []
    made = 0
    for seed in range(first_seed, first_seed + count):
        path = os.path.join(directory, f"{WIDTH}x{HEIGHT}-{seed}.jpg")
        try:
            with open(path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            if progress is not None and made == 0:
                progress(f"making test JPEGs in {directory} (once; not timed)")
            data = make_jpeg(seed)
            made += 1
            tmp = f"{path}.{os.getpid()}.tmp"
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        result.append(data)
    return result


def uniquified(jpeg: bytes) -> bytes:
    """The same picture with a random COM segment after SOI: new bytes, same pixels."""
    if jpeg[:2] != b"\xff\xd8":
        raise ValueError("not a JPEG")
    comment = b"mediarepo-bench " + os.urandom(16).hex().encode("ascii")
    segment = b"\xff\xfe" + struct.pack(">H", len(comment) + 2) + comment
    return jpeg[:2] + segment + jpeg[2:]


def image_size(data: bytes) -> tuple[int, int] | None:
    """Width and height of an image answer, or None if Pillow can't read it."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as img:
            return img.size
    except (UnidentifiedImageError, OSError):
        return None


def heics(
    count: int, *, first_seed: int = 0, progress: Callable[[str], None] | None = None
) -> list[bytes]:
    """``count`` distinct HEIC photos: the test JPEGs re-encoded (pillow-heif),
    as an iPhone stores its photos. Made now, outside any timed section."""
    import pillow_heif
    from PIL import Image

    pillow_heif.register_heif_opener()
    pictures = jpegs(count, first_seed=first_seed, progress=progress)
    if progress is not None:
        progress(f"encoding {count} HEIC photos (not timed)")
    result = []
    for picture in pictures:
        out = io.BytesIO()
        with Image.open(io.BytesIO(picture)) as image:
            image.save(out, "HEIF", quality=80)
        result.append(out.getvalue())
    return result


VIDEO_WIDTH, VIDEO_HEIGHT, VIDEO_FRAMES, VIDEO_RATE = 1920, 1080, 30, 30


def videos(
    count: int, *, first_seed: int = 0, progress: Callable[[str], None] | None = None
) -> list[bytes]:
    """``count`` distinct one-second 1080p H.264 MP4s (PyAV), each panning
    over one of the test pictures. Made now, outside any timed section."""
    import av
    from PIL import Image

    pictures = jpegs(count, first_seed=first_seed, progress=progress)
    if progress is not None:
        progress(f"encoding {count} 1080p MP4 videos (not timed)")
    result = []
    for picture in pictures:
        with Image.open(io.BytesIO(picture)) as image:
            source = image.convert("RGB")
        out = io.BytesIO()
        with av.open(out, "w", format="mp4") as container:
            stream = container.add_stream("h264", rate=VIDEO_RATE)
            stream.width, stream.height, stream.pix_fmt = VIDEO_WIDTH, VIDEO_HEIGHT, "yuv420p"
            for index in range(VIDEO_FRAMES):
                left = index * 10
                frame = source.crop((left, 0, left + VIDEO_WIDTH, VIDEO_HEIGHT))
                for packet in stream.encode(av.VideoFrame.from_image(frame)):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
        result.append(out.getvalue())
    return result

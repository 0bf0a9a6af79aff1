"""EXIF orientation: how a stored image is turned to be displayed, and
where a part of the displayed image lies in the stored one."""

from __future__ import annotations

from PIL import Image

_ORIENTATION_TAG = 0x0112
TRANSPOSITIONS = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
# Orientations whose displayed image is the stored one turned on its side.
SWAPS_AXES = frozenset({5, 6, 7, 8})

# A rectangle: (left, top, right, bottom).
Box = tuple[float, float, float, float]
WHOLE: Box = (0.0, 0.0, 1.0, 1.0)


def orientation(image: Image.Image) -> int:
    """The EXIF orientation (1 to 8); 1 when absent or unreadable."""
    try:
        # Image.getexif, not the image's own: PNG's would decode the whole
        # image to look for an eXIf chunk after the pixels. Only one before
        # them (where the PNG spec puts it) is honoured.
        value = Image.Image.getexif(image).get(_ORIENTATION_TAG)
    except Exception:
        return 1
    return value if isinstance(value, int) and value in TRANSPOSITIONS else 1


def _source_point(orientation: int, x: float, y: float) -> tuple[float, float]:
    """Where a point of the displayed (oriented) image is in the stored one,
    both as fractions of their width and height."""
    if orientation == 2:
        return 1 - x, y
    if orientation == 3:
        return 1 - x, 1 - y
    if orientation == 4:
        return x, 1 - y
    if orientation == 5:
        return y, x
    if orientation == 6:
        return y, 1 - x
    if orientation == 7:
        return 1 - y, 1 - x
    if orientation == 8:
        return 1 - y, x
    return x, y


def source_window(orientation: int, window: Box) -> Box:
    """The part of the stored image that ``window`` (fractions of the displayed
    image) shows, as fractions of the stored image."""
    x0, y0 = _source_point(orientation, window[0], window[1])
    x1, y1 = _source_point(orientation, window[2], window[3])
    return min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)

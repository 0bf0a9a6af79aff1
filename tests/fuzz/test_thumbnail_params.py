"""Thumbnail query parameters (width, height, method, animated): any query
string is either a request the thumbnailer can work on or a Matrix 400."""

from __future__ import annotations

from typing import cast
from urllib.parse import quote_from_bytes, urlencode

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial import unittest
from twisted.web.http import parse_qs
from twisted.web.test.requesthelper import DummyRequest

from mediarepo.errors import MatrixError
from mediarepo.http.site import MediaRequest
from mediarepo.http.thumbnail import MAX_THUMBNAIL_DIMENSION, parse_thumbnail_request
from mediarepo.media.thumbnail_sizes import ThumbnailRequest
from tests.fuzz.strategies import hostile_text

PATH = b"/_matrix/client/v1/media/thumbnail/test.example/abcdefgh"


def parse(query: bytes) -> ThumbnailRequest:
    """Parse a raw query string as Twisted parses a request's."""
    # Twisted's stand-in request: the parser reads only the query and path.
    request = cast(MediaRequest, DummyRequest([]))
    request.args = parse_qs(query, 1)
    request.path = PATH
    return parse_thumbnail_request(request)


numbers = st.one_of(
    st.integers(-(10**20), 10**20).map(str),
    st.integers(0, 20_000).map(str),
    st.builds(lambda zeros, n: "0" * zeros + str(n), st.integers(1, 5), st.integers(0, 20_000)),
    st.sampled_from(
        ["", "+5", " 5", "5 ", "1e3", "0x10", "\u0661\u0662", "\uff15", "5\x00", "NaN"]
    ),
)
values = st.one_of(
    numbers, hostile_text, st.sampled_from(["crop", "scale", "true", "false", "Crop"])
)
names = st.sampled_from(["width", "height", "method", "animated", "other"])
queries = st.one_of(
    # Known names with any values, sometimes repeated.
    st.lists(st.tuples(names, values), max_size=6).map(
        lambda pairs: "&".join(f"{n}={quote_from_bytes(v.encode())}" for n, v in pairs).encode()
    ),
    # Raw bytes after the "?", including broken percent-escapes and invalid UTF-8.
    st.binary(max_size=100),
    st.builds(lambda raw: b"width=64&height=64&method=" + raw, st.binary(max_size=20)),
)  # fmt: skip

dimensions = st.integers(1, MAX_THUMBNAIL_DIMENSION)


class ThumbnailParameterTests(unittest.TestCase):
    @given(queries)
    def test_any_query(self, query: bytes) -> None:
        try:
            request = parse(query)
        except MatrixError as e:
            self.assertEqual(e.code, 400)
            self.assertIn(e.errcode, ("M_INVALID_PARAM", "M_MISSING_PARAM"))
            return
        self.assertTrue(1 <= request.width <= MAX_THUMBNAIL_DIMENSION)
        self.assertTrue(1 <= request.height <= MAX_THUMBNAIL_DIMENSION)
        self.assertIn(request.method, ("crop", "scale"))
        self.assertIsInstance(request.animated, bool)

    @given(
        dimensions,
        dimensions,
        st.sampled_from(["crop", "scale", None]),
        st.sampled_from([True, False, None]),
        st.integers(0, 3),
    )
    def test_round_trip(
        self, width: int, height: int, method: str | None, animated: bool | None, zeros: int
    ) -> None:
        params = {"width": "0" * zeros + str(width), "height": str(height)}
        if method is not None:
            params["method"] = method
        if animated is not None:
            params["animated"] = "true" if animated else "false"
        request = parse(urlencode(params).encode())
        self.assertEqual(
            (request.width, request.height, request.method, request.animated),
            (width, height, method or "scale", bool(animated)),
        )

    @given(
        st.one_of(st.integers(max_value=0), st.integers(min_value=MAX_THUMBNAIL_DIMENSION + 1)),
        dimensions,
        st.booleans(),
    )
    def test_out_of_range_refused(self, bad: int, good: int, bad_width: bool) -> None:
        params = {"width": bad, "height": good} if bad_width else {"width": good, "height": bad}
        with self.assertRaises(MatrixError) as caught:
            parse(urlencode(params).encode())
        self.assertEqual(
            (caught.exception.code, caught.exception.errcode), (400, "M_INVALID_PARAM")
        )

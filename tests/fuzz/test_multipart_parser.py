"""The federation multipart/mixed parser, under any bytes a peer can send:
it only ever raises its own error, gives back exactly what our writer put
in whatever the chunking, and never passes more file bytes than allowed."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import assume, given
from hypothesis import strategies as st
from twisted.trial import unittest

from mediarepo.federation.multipart import (
    FilePart,
    MultipartError,
    MultipartParser,
    MultipartTooLargeError,
    multipart_content_type,
    multipart_head,
    multipart_redirect,
    multipart_tail,
)
from tests.fuzz.strategies import hostile_text

_BOUNDARY_CHARS = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ'()+_,-./:=?"
# RFC 2046: 1 to 70 characters, spaces allowed but not last.
boundaries = st.builds(
    lambda head, last: head + last,
    st.text(_BOUNDARY_CHARS + " ", max_size=69),
    st.sampled_from(_BOUNDARY_CHARS),
)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=10,
)
metadata_objects = st.dictionaries(st.text(max_size=8), json_values, max_size=4)
# Header values as a peer would send them: printable, no edge whitespace
# (which a header line does not keep).
header_values = (
    st.text(
        st.characters(min_codepoint=0x20, max_codepoint=0x7E)
        | st.characters(min_codepoint=0xA1, exclude_categories=["Cs"]),
        min_size=1,
        max_size=40,
    )
    .map(str.strip)
    .filter(bool)
)


def pieces(body: bytes, cuts: list[int]) -> list[bytes]:
    """``body`` cut at the given offsets."""
    ends = [*sorted({min(c, len(body)) for c in cuts}), len(body)]
    return [body[start:end] for start, end in zip([0, *ends[:-1]], ends, strict=True)]


def feed_all(parser: MultipartParser, body: bytes, cuts: list[int]) -> bytes:
    """Feed ``body`` split at ``cuts`` and finish; the file bytes."""
    out: list[bytes] = []
    for piece in pieces(body, cuts):
        out.extend(parser.feed(piece))
    parser.finish()
    return b"".join(out)


cut_points = st.lists(st.integers(0, 4096), max_size=12)


class MultipartPropertyTests(unittest.TestCase):
    @given(st.binary(max_size=2048), cut_points, st.integers(0, 4096))
    def test_any_bytes_only_our_error(self, body: bytes, cuts: list[int], limit: int) -> None:
        parser = MultipartParser("multipart/mixed; boundary=b", limit)
        try:
            data = feed_all(parser, body, cuts)
        except MultipartError:
            return
        self.assertLessEqual(len(data), limit)

    @given(
        st.binary(max_size=1024),
        st.lists(st.sampled_from([b"\r\n", b"--", b"--b", b"\r\n--b", b"\r\n--b--", b"\r\n\r\n",
                                  b"Content-Type: application/json", b"Location: x", b"{}", b" "]),
                 max_size=20),
        cut_points,
    )  # fmt: skip
    def test_near_miss_bodies_only_our_error(
        self, noise: bytes, pieces: list[bytes], cuts: list[int]
    ) -> None:
        """Bodies made of the parser's own landmarks in a wrong order reach
        deeper than random bytes do."""
        body = b"".join(pieces) + noise
        parser = MultipartParser("multipart/mixed; boundary=b", 100)
        try:
            data = feed_all(parser, body, cuts)
        except MultipartError:
            return
        self.assertLessEqual(len(data), 100)

    @given(st.one_of(hostile_text, st.binary(max_size=200), st.none()))
    def test_any_content_type_only_our_error(self, content_type: str | bytes | None) -> None:
        try:
            MultipartParser(content_type, 100)
        except MultipartError:
            pass

    @given(
        boundaries,
        metadata_objects,
        header_values,
        header_values,
        st.binary(max_size=4096),
        cut_points,
    )
    def test_round_trip(
        self,
        boundary: str,
        metadata: dict[str, Any],
        media_type: str,
        disposition: str,
        data: bytes,
        cuts: list[int],
    ) -> None:
        """What our writer builds, the parser reads back exactly, however the
        body is cut into pieces."""
        raw_metadata = json.dumps(metadata).encode()
        delimiter = b"\r\n--" + boundary.encode()
        assume(delimiter not in b"\r\n" + raw_metadata and delimiter not in b"\r\n" + data)
        body = multipart_head(boundary, media_type, disposition, raw_metadata)
        body += data + multipart_tail(boundary)
        parser = MultipartParser(multipart_content_type(boundary), len(data))
        self.assertEqual(feed_all(parser, body, cuts), data)
        self.assertEqual(parser.metadata, metadata)
        self.assertEqual(
            parser.file_part,
            FilePart(media_type=media_type, disposition=disposition, location=None),
        )
        self.assertEqual(parser.file_bytes, len(data))

    @given(boundaries, header_values, cut_points)
    def test_redirect_round_trip(self, boundary: str, location: str, cuts: list[int]) -> None:
        body = multipart_redirect(boundary, location)
        parser = MultipartParser(multipart_content_type(boundary), 0)
        self.assertEqual(feed_all(parser, body, cuts), b"")
        self.assertEqual(parser.file_part, FilePart(None, None, location))

    @given(hostile_text, hostile_text)
    def test_written_headers_stay_in_their_line(self, media_type: str, disposition: str) -> None:
        """Whatever the type and disposition (a stored upload's, so the
        uploader's choice), the part keeps exactly its two header lines."""
        boundary = "0123456789abcdef0123456789abcdef"
        body = multipart_head(boundary, media_type, disposition) + multipart_tail(boundary)
        parser = MultipartParser(multipart_content_type(boundary), 0)
        try:
            feed_all(parser, body, [])
        except MultipartError:
            # Refused whole (an empty header after stripping), never misread.
            self.assertFalse(media_type.strip(" \t") and disposition.strip(" \t"))
            return
        assert parser.file_part is not None
        self.assertNotIn("\n", parser.file_part.media_type or "")
        self.assertNotIn("\n", parser.file_part.disposition or "")
        self.assertIsNone(parser.file_part.location)

    @given(st.binary(min_size=1, max_size=2048), st.data(), cut_points)
    def test_size_limit(self, data: bytes, draw: st.DataObject, cuts: list[int]) -> None:
        """Over the limit is refused before more than the limit is passed on."""
        limit = draw.draw(st.integers(0, len(data) - 1), label="limit")
        boundary = "0123456789abcdef0123456789abcdef"
        assume(b"\r\n--" + boundary.encode() not in b"\r\n" + data)
        body = multipart_head(boundary, "a/b", "attachment") + data + multipart_tail(boundary)
        parser = MultipartParser(multipart_content_type(boundary), limit)
        passed: list[bytes] = []
        with self.assertRaises(MultipartTooLargeError):
            for piece in pieces(body, cuts):
                passed.extend(parser.feed(piece))
        self.assertLessEqual(len(b"".join(passed)), limit)

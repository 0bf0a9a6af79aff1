"""The generic multipart reader: parts and their headers as events,
content streamed whatever the chunking, any number of parts. (The
federation media answer's rules on top of it: tests/federation/
test_multipart.py and tests/fuzz/test_multipart_parser.py.)"""

from __future__ import annotations

from twisted.trial import unittest

from mediarepo.outbound.multipart import (
    BodyEnd,
    MultipartError,
    MultipartEvent,
    MultipartReader,
    PartContent,
    PartStart,
    boundary_of,
)

BODY = (
    b"preamble\r\n--xyz\r\nContent-Type: text/plain\r\nX-Other: dropped\r\n\r\none"
    b"\r\n--xyz  \r\n\r\ntwo\r\n--xy\r\n--xyz\r\nContent-Type: a/b\r\n\r\n\r\n--xyz--\r\nepilogue"
)


def events(reader: MultipartReader, pieces: list[bytes]) -> list[MultipartEvent]:
    found = [event for piece in pieces for event in reader.feed(piece)]
    # Content pieces joined: how the body was cut does not matter.
    joined: list[MultipartEvent] = []
    for event in found:
        if isinstance(event, PartContent) and joined and isinstance(joined[-1], PartContent):
            joined[-1] = PartContent(joined[-1].data + event.data)
        else:
            joined.append(event)
    return joined


class ReaderTests(unittest.TestCase):
    def reader(self) -> MultipartReader:
        return MultipartReader("multipart/mixed; boundary=xyz", headers_wanted={"content-type"})

    def expected(self) -> list[MultipartEvent]:
        return [
            PartStart(1, {"content-type": "text/plain"}),
            PartContent(b"one"),
            PartStart(2, {}),
            PartContent(b"two\r\n--xy"),
            PartStart(3, {"content-type": "a/b"}),
            BodyEnd(),
        ]

    def test_whole_body(self) -> None:
        reader = self.reader()
        self.assertEqual(events(reader, [BODY]), self.expected())
        self.assertTrue(reader.done)
        self.assertEqual(reader.parts, 3)

    def test_byte_by_byte(self) -> None:
        pieces = [BODY[i : i + 1] for i in range(len(BODY))]
        self.assertEqual(events(self.reader(), pieces), self.expected())

    def test_content_is_not_held_back_longer_than_a_boundary(self) -> None:
        reader = self.reader()
        list(reader.feed(b"--xyz\r\n\r\n"))
        self.assertEqual(list(reader.feed(b"a" * 1000 + b"\r\n--x")), [PartContent(b"a" * 1000)])

    def test_malformed_bodies(self) -> None:
        for body in (
            b"--xyz\r\n Folded: header\r\n\r\n",
            b"--xyz\r\nContent-Type: a\r\nContent-Type: b\r\n\r\n",
            b"--xyzjunk\r\n",
            b"x" * 20_000,
        ):
            with self.assertRaises(MultipartError):
                list(self.reader().feed(body))

    def test_content_types(self) -> None:
        self.assertEqual(boundary_of(b'multipart/mixed; boundary="a b:c"'), "a b:c")
        for value in (None, "text/plain", "multipart/mixed", "multipart/mixed; boundary=a b"):
            with self.assertRaises(MultipartError):
                boundary_of(value)

"""The federation multipart/mixed body: Synapse's bytes out, strict parsing in."""

from __future__ import annotations

import json
import random
import re

from twisted.trial import unittest

from mediarepo.federation.multipart import (
    MAX_METADATA_BYTES,
    FilePart,
    MultipartError,
    MultipartParser,
    MultipartTooLargeError,
    multipart_content_type,
    multipart_head,
    multipart_redirect,
    multipart_tail,
    new_boundary,
)

B = "6d8e0b8a5e2b4c0f9a1d3c7e2f4b6a80"
CONTENT_TYPE = f"multipart/mixed; boundary={B}"
LIMIT = 1024 * 1024

# Synapse's test fixture (reference §2.1): a leading CRLF of preamble and a
# trailing CRLF of epilogue around the layout its writer produces.
SYNAPSE_SAMPLE = (
    f"\r\n\r\n--{B}\r\nContent-Type: application/json\r\n\r\n{{}}\r\n--{B}\r\n"
    "Content-Type: text/plain\r\nContent-Disposition: inline; filename=test_upload\r\n\r\n"
    f"file_to_stream\r\n--{B}--\r\n\r\n"
).encode()


def body(
    data: bytes,
    media_type: str = "application/octet-stream",
    disposition: str = "attachment",
    boundary: str = B,
) -> bytes:
    return multipart_head(boundary, media_type, disposition) + data + multipart_tail(boundary)


def parse(
    raw: bytes,
    chunk_sizes: list[int] | None = None,
    content_type: str | bytes | None = CONTENT_TYPE,
    **kwargs: int,
) -> tuple[FilePart, bytes]:
    """Feed ``raw`` in pieces of the given sizes (cycled), then finish."""
    parser = MultipartParser(content_type, kwargs.pop("max_file_bytes", LIMIT), **kwargs)
    out: list[bytes] = []
    sizes = chunk_sizes or [len(raw) or 1]
    pos = 0
    index = 0
    while pos < len(raw):
        size = sizes[index % len(sizes)]
        out.extend(parser.feed(raw[pos : pos + size]))
        pos += size
        index += 1
    return parser.finish(), b"".join(out)


def tricky_data(rng: random.Random, boundary: str) -> bytes:
    """File bytes built from pieces that look like the framing."""
    delimiter = b"\r\n--" + boundary.encode()
    pieces = [
        b"--",
        b"\r\n",
        b"\r",
        b"\n",
        b"\r\n--",
        b"--" + boundary.encode(),  # no CRLF before it: not a delimiter
        b"\r\n\r\n",
        b"-",
        bytes([rng.randrange(256)]),
        rng.randbytes(rng.randrange(50)),
    ]
    pieces += [delimiter[: rng.randrange(1, len(delimiter))] for _ in range(3)]
    while True:
        data = b"".join(rng.choice(pieces) for _ in range(rng.randrange(60)))
        # A whole delimiter would end the part: no sender can send that.
        if delimiter not in data:
            return data


class WriterTests(unittest.TestCase):
    def test_synapse_sample(self) -> None:
        written = body(b"file_to_stream", "text/plain", "inline; filename=test_upload")
        self.assertEqual(written, SYNAPSE_SAMPLE[2:-2])
        self.assertEqual(b"\r\n" + written + b"\r\n", SYNAPSE_SAMPLE)

    def test_synapse_content_length_arithmetic(self) -> None:
        # Synapse announces file + JSON + both header lines + 156 (32-char boundary).
        media_type, disposition = "image/png", "inline; filename=a.png"
        overhead = len(multipart_head(B, media_type, disposition)) + len(multipart_tail(B))
        self.assertEqual(
            overhead,
            len(b"{}")
            + len(f"Content-Type: {media_type}")
            + len(f"Content-Disposition: {disposition}")
            + 156,
        )

    def test_head_layout(self) -> None:
        self.assertEqual(
            multipart_head(B, "image/png", "inline", b'{"a":1}'),
            (
                f"\r\n--{B}\r\nContent-Type: application/json\r\n\r\n"
                + '{"a":1}'
                + f"\r\n--{B}\r\nContent-Type: image/png\r\nContent-Disposition: inline\r\n\r\n"
            ).encode(),
        )
        self.assertEqual(multipart_tail(B), f"\r\n--{B}--\r\n".encode())

    def test_zero_byte_file(self) -> None:
        written = body(b"", "text/plain", "inline")
        self.assertEqual(
            written,
            (
                f"\r\n--{B}\r\nContent-Type: application/json\r\n\r\n{{}}\r\n--{B}\r\n"
                f"Content-Type: text/plain\r\nContent-Disposition: inline\r\n\r\n\r\n--{B}--\r\n"
            ).encode(),
        )
        part, data = parse(written)
        self.assertEqual(part, FilePart("text/plain", "inline", None))
        self.assertEqual(data, b"")

    def test_redirect_layout(self) -> None:
        self.assertEqual(
            multipart_redirect(B, "https://cdn.example/a?b=c"),
            (
                f"\r\n--{B}\r\nContent-Type: application/json\r\n\r\n{{}}\r\n--{B}\r\n"
                f"Location: https://cdn.example/a?b=c\r\n\r\n\r\n--{B}--\r\n"
            ).encode(),
        )

    def test_content_type_and_boundary(self) -> None:
        boundary = new_boundary()
        self.assertTrue(re.fullmatch(r"[0-9a-f]{32}", boundary), boundary)
        self.assertNotEqual(boundary, new_boundary())
        self.assertEqual(multipart_content_type(boundary), f"multipart/mixed; boundary={boundary}")

    def test_header_values_cannot_break_lines(self) -> None:
        head = multipart_head(B, "text/plain\r\nX-Evil: 1", "inline\n\x00; filename=a")
        lines = head.split(b"\r\n")
        self.assertIn(b"Content-Type: text/plain%0D%0AX-Evil: 1", lines)
        self.assertIn(b"Content-Disposition: inline%0A%00; filename=a", lines)
        self.assertNotIn(b"\n", head.replace(b"\r\n", b""))
        part, _ = parse(head + multipart_tail(B))
        self.assertEqual(part.media_type, "text/plain%0D%0AX-Evil: 1")
        redirect = multipart_redirect(B, "https://a.example/\r\nX-Evil: 1")
        self.assertEqual(parse(redirect)[0].location, "https://a.example/%0D%0AX-Evil: 1")

    def test_non_ascii_header_values(self) -> None:
        part, _ = parse(body(b"x", "text/plain", "inline; filename=caf\u00e9"))
        self.assertEqual(part.disposition, "inline; filename=caf\u00e9")

    def test_bad_boundary_refused(self) -> None:
        for boundary in ("", "a" * 71, "ends with space ", "semi;colon", 'quote"', "ctl\r\n"):
            with self.assertRaises(ValueError, msg=repr(boundary)):
                multipart_head(boundary, "text/plain", "inline")
        with self.assertRaises(ValueError):
            multipart_head(B, "text/plain", "inline", metadata=f"\r\n--{B}".encode())


class RoundTripTests(unittest.TestCase):
    def test_random_bodies(self) -> None:
        rng = random.Random(4)
        for _ in range(300):
            boundary = rng.choice([B, new_boundary(), "a", "x-y", "simple boundary"])
            data = tricky_data(rng, boundary)
            raw = body(data, "image/png", "inline; filename=x.png", boundary=boundary)
            content_type = f'multipart/mixed; boundary="{boundary}"'
            sizes = rng.choice([[1], [2], [3, 1, 7], [len(boundary) + 3], [rng.randrange(1, 99)]])
            part, parsed = parse(raw, sizes, content_type)
            self.assertEqual(parsed, data)
            self.assertEqual(part, FilePart("image/png", "inline; filename=x.png", None))

    def test_one_byte_feeding(self) -> None:
        data = b"\r\n--" + B.encode()[:-1] + b"\r\n--" + B[:5].encode() + b"--\r\n\r\n"
        part, parsed = parse(body(data), [1])
        self.assertEqual(parsed, data)
        self.assertEqual(part.media_type, "application/octet-stream")

    def test_every_split_point(self) -> None:
        data = b"ab\r\n-\r\n--" + B.encode()[:10] + b"cd"
        raw = body(data)
        for split in range(len(raw) + 1):
            parser = MultipartParser(CONTENT_TYPE, LIMIT)
            out = parser.feed(raw[:split]) + parser.feed(raw[split:])
            self.assertEqual(b"".join(out), data, split)
            parser.finish()

    def test_large_file_in_big_chunks(self) -> None:
        data = random.Random(1).randbytes(3 * 1024 * 1024)
        _, parsed = parse(body(data), [65536, 1, 100_000], max_file_bytes=len(data))
        self.assertEqual(parsed, data)

    def test_holds_back_only_a_delimiter(self) -> None:
        # File bytes are handed out as soon as they cannot be a delimiter.
        parser = MultipartParser(CONTENT_TYPE, LIMIT)
        parser.feed(multipart_head(B, "text/plain", "inline"))
        delimiter_length = len(B) + 4
        given = 0
        fed = 0
        for _ in range(2000):
            piece = random.Random(fed).choice([b"x", b"\r", b"\r\n", b"\r\n-", b"\r\n--" + b"6d"])
            fed += len(piece)
            given += sum(len(c) for c in parser.feed(piece))
            self.assertGreaterEqual(given, fed - delimiter_length + 1)
            self.assertLessEqual(given, fed)
        self.assertEqual(parser.file_bytes, given)

    def test_file_data_never_has_the_delimiter_crlf(self) -> None:
        _, parsed = parse(body(b"data"), [1])
        self.assertEqual(parsed, b"data")
        _, parsed = parse(body(b"data\r\n"), [1])
        self.assertEqual(parsed, b"data\r\n")

    def test_synapse_sample_parses(self) -> None:
        for sizes in ([1], [len(SYNAPSE_SAMPLE)]):
            part, data = parse(SYNAPSE_SAMPLE, sizes)
            self.assertEqual(part, FilePart("text/plain", "inline; filename=test_upload", None))
            self.assertEqual(data, b"file_to_stream")

    def test_metadata(self) -> None:
        parser = MultipartParser(CONTENT_TYPE, LIMIT)
        parser.feed(multipart_head(B, "text/plain", "inline", b'{"a": [1, 2]}'))
        self.assertEqual(parser.metadata, {"a": [1, 2]})
        self.assertEqual(parser.file_part, FilePart("text/plain", "inline", None))

    def test_file_part_known_after_its_headers(self) -> None:
        parser = MultipartParser(CONTENT_TYPE, LIMIT)
        head = multipart_head(B, "text/plain", "inline")
        parser.feed(head[:-1])
        self.assertIsNone(parser.file_part)
        parser.feed(head[-1:])
        self.assertEqual(parser.file_part, FilePart("text/plain", "inline", None))

    def test_location(self) -> None:
        for sizes in ([1], [1000]):
            part, data = parse(multipart_redirect(B, "https://cdn.example/file"), sizes)
            self.assertEqual(part, FilePart(None, None, "https://cdn.example/file"))
            self.assertEqual(data, b"")

    def test_no_leading_crlf(self) -> None:
        raw = body(b"abc")[2:]
        self.assertEqual(parse(raw, [1])[1], b"abc")

    def test_preamble_and_epilogue(self) -> None:
        raw = b"This is a preamble.\r\n" + body(b"abc") + b"epilogue\r\n--" + B.encode() + b"\r\n"
        self.assertEqual(parse(raw, [1])[1], b"abc")
        self.assertEqual(parse(raw)[1], b"abc")

    def test_transport_padding(self) -> None:
        raw = body(b"abc").replace(f"--{B}\r\n".encode(), f"--{B} \t \r\n".encode())
        self.assertEqual(parse(raw, [1])[1], b"abc")

    def test_content_type_header_forms(self) -> None:
        raw = body(b"abc")
        for header in (
            CONTENT_TYPE,
            CONTENT_TYPE.encode(),
            f'multipart/mixed; boundary="{B}"',
            f"Multipart/Mixed;BOUNDARY={B}",
            f"multipart/mixed; charset=utf-8; boundary={B}",
            f"multipart/mixed ;\tboundary={B} ",
        ):
            self.assertEqual(parse(raw, content_type=header)[1], b"abc", header)

    def test_quoted_boundary_with_special_characters(self) -> None:
        boundary = "a:b=c?d/e f"
        raw = body(b"abc", boundary=boundary)
        content_type = 'multipart/mixed; boundary="a:b=c?d/e f"'
        self.assertEqual(parse(raw, [1], content_type)[1], b"abc")

    def test_part_header_forms(self) -> None:
        raw = (
            f"\r\n--{B}\r\ncontent-type:application/json; charset=UTF-8\r\nX-Other: 1\r\n\r\n"
            f"{{}}\r\n--{B}\r\nCONTENT-TYPE:  image/png \r\ncontent-disposition: inline\r\n"
            f"X-Unknown: whatever\r\n\r\nabc\r\n--{B}--"
        ).encode()
        part, data = parse(raw, [1])
        self.assertEqual(part, FilePart("image/png", "inline", None))
        self.assertEqual(data, b"abc")

    def test_file_part_without_headers(self) -> None:
        raw = (
            f"\r\n--{B}\r\nContent-Type: application/json\r\n\r\n{{}}\r\n--{B}\r\n\r\nab\r\n--{B}--"
        )
        self.assertEqual(parse(raw.encode(), [1]), (FilePart(None, None, None), b"ab"))

    def test_feed_after_end(self) -> None:
        parser = MultipartParser(CONTENT_TYPE, LIMIT)
        parser.feed(body(b"abc"))
        self.assertEqual(parser.feed(b"more"), [])
        self.assertEqual(parser.finish().media_type, "application/octet-stream")

    def test_exactly_at_the_limit(self) -> None:
        self.assertEqual(parse(body(b"x" * 100), [7], max_file_bytes=100)[1], b"x" * 100)


class MalformedTests(unittest.TestCase):
    def assertRejected(
        self, raw: bytes, content_type: str = CONTENT_TYPE, **kwargs: int
    ) -> MultipartError:
        for sizes in ([1], [len(raw) or 1]):
            with self.assertRaises(MultipartError, msg=repr(raw[:200])) as caught:
                parse(raw, sizes, content_type, **kwargs)
        error: MultipartError = caught.exception
        return error

    def test_content_type_without_boundary(self) -> None:
        for header in (
            None,
            "",
            b"",
            "multipart/mixed",
            "multipart/mixed;",
            "multipart/mixed; boundary=",
            'multipart/mixed; boundary=""',
            "multipart/mixed; boundary=a b",
            "multipart/mixed; boundary=a; boundary=b",
            "multipart/mixed; boundary=" + "a" * 71,
            "multipart/mixed; foo",
            'multipart/mixed; boundary="unterminated',
            "multipart/form-data; boundary=" + B,
            "application/json",
            "multipart; boundary=" + B,
        ):
            with self.assertRaises(MultipartError, msg=repr(header)):
                MultipartParser(header, LIMIT)

    def test_first_part_not_json(self) -> None:
        for first_type in (
            "text/plain",
            "application/jsonx",
            "application/json; charset=latin-1",
            "application/json; profile=x",
            "application/octet-stream",
        ):
            raw = body(b"x").replace(b"application/json", first_type.encode(), 1)
            self.assertRejected(raw)
        no_type = body(b"x").replace(b"Content-Type: application/json\r\n", b"", 1)
        self.assertRejected(no_type)

    def test_first_part_not_an_object(self) -> None:
        for metadata in (b"[]", b"{", b"", b"null", b"\xff", b'"{}"'):
            raw = multipart_head(B, "text/plain", "inline", metadata=metadata) + multipart_tail(B)
            self.assertRejected(raw)

    def test_metadata_too_long(self) -> None:
        metadata = json.dumps({"a": "x" * MAX_METADATA_BYTES}).encode()
        head = multipart_head(B, "text/plain", "inline", metadata=metadata)
        self.assertRejected(head + multipart_tail(B))
        # Refused before the part ends.
        parser = MultipartParser(CONTENT_TYPE, LIMIT)
        with self.assertRaises(MultipartError):
            parser.feed(head[: MAX_METADATA_BYTES + 200])

    def test_truncated_everywhere(self) -> None:
        raw = body(b"file\r\n--bytes")
        complete_at = len(raw) - 2  # the final CRLF is not needed
        for cut in range(len(raw) + 1):
            parser = MultipartParser(CONTENT_TYPE, LIMIT)
            parser.feed(raw[:cut])
            if cut < complete_at:
                with self.assertRaises(MultipartError, msg=cut):
                    parser.finish()
            else:
                parser.finish()

    def test_no_second_part(self) -> None:
        raw = f"\r\n--{B}\r\nContent-Type: application/json\r\n\r\n{{}}\r\n--{B}--\r\n"
        self.assertRejected(raw.encode())
        # As soon as the closing boundary shows.
        parser = MultipartParser(CONTENT_TYPE, LIMIT)
        self.assertRaises(MultipartError, parser.feed, raw.encode())

    def test_no_parts(self) -> None:
        self.assertRejected(f"\r\n--{B}--\r\n".encode())
        self.assertRejected(b"")

    def test_three_parts(self) -> None:
        raw = body(b"abc").replace(
            f"--{B}--".encode(),
            f"--{B}\r\nContent-Type: text/plain\r\n\r\nmore\r\n--{B}--".encode(),
        )
        self.assertRejected(raw)

    def test_oversized_file_raises_early(self) -> None:
        parser = MultipartParser(CONTENT_TYPE, max_file_bytes=10)
        parser.feed(multipart_head(B, "text/plain", "inline"))
        fed = 0
        with self.assertRaises(MultipartTooLargeError):
            for _ in range(1000):
                parser.feed(b"xxxxx")
                fed += 5
        # Within a delimiter's length (and one feed) of the limit.
        self.assertLessEqual(fed, 10 + len(B) + 4)
        # And it stays failed.
        self.assertRaises(MultipartTooLargeError, parser.feed, b"")
        self.assertRaises(MultipartTooLargeError, parser.finish)

    def test_oversized_file_in_one_feed(self) -> None:
        error = self.assertRejected(body(b"x" * 101), max_file_bytes=100)
        self.assertIsInstance(error, MultipartTooLargeError)
        self.assertIn("too large", str(error))

    def test_other_errors_are_not_too_large(self) -> None:
        # Callers tell M_TOO_LARGE apart by type (or "large" in the message).
        error = self.assertRejected(body(b"x").replace(b"application/json", b"text/plain", 1))
        self.assertNotIsInstance(error, MultipartTooLargeError)
        self.assertNotIn("large", str(error))

    def test_oversized_headers(self) -> None:
        big = b"X-Padding: " + b"p" * 20_000 + b"\r\n"
        raw = body(b"abc").replace(b"Content-Disposition", big + b"Content-Disposition", 1)
        self.assertRejected(raw, max_header_bytes=16 * 1024)
        self.assertEqual(parse(raw, max_header_bytes=32 * 1024)[1], b"abc")
        # Headers that never end are refused once over the limit.
        parser = MultipartParser(CONTENT_TYPE, LIMIT, max_header_bytes=1024)
        parser.feed(f"\r\n--{B}\r\nX-Endless: ".encode())
        with self.assertRaises(MultipartError):
            for _ in range(2000):
                parser.feed(b"x")

    def test_garbage(self) -> None:
        rng = random.Random(7)
        for _ in range(50):
            self.assertRejected(rng.randbytes(rng.randrange(1, 300)))
        self.assertRejected(b"<html>Not found</html>")
        self.assertRejected(b'{"errcode": "M_NOT_FOUND"}')
        # Endless garbage is refused without reading it all.
        parser = MultipartParser(CONTENT_TYPE, LIMIT, max_header_bytes=1024)
        with self.assertRaises(MultipartError):
            for _ in range(100):
                parser.feed(b"garbage " * 100)

    def test_boundary_followed_by_garbage(self) -> None:
        raw = body(b"abc\r\n--" + B.encode() + b"X")
        self.assertRejected(raw)
        raw = body(b"abc").replace(
            f"--{B}\r\nContent-Type: app".encode(), f"--{B}x\r\nContent-Type: app".encode()
        )
        self.assertRejected(raw)
        raw = body(b"abc").replace(
            f"--{B}\r\nContent-Type: app".encode(), f"--{B} x\r\nContent-Type: app".encode()
        )
        self.assertRejected(raw)

    def test_location_part_with_body(self) -> None:
        raw = multipart_redirect(B, "https://cdn.example/").replace(
            b"\r\n\r\n\r\n--", b"\r\n\r\nbody\r\n--"
        )
        self.assertRejected(raw)

    def test_bad_part_headers(self) -> None:
        for bad in (
            b"No-Colon-Here\r\n",
            b" Folded: header\r\n",
            b"Content-Type: image/png\r\n",  # a second Content-Type
            b"Bad Name: x\r\n",
            b": no name\r\n",
            b"Location:\r\n",
            b"X-Ctl: a\x00b\r\n",
        ):
            raw = body(b"abc").replace(b"Content-Disposition", bad + b"Content-Disposition", 1)
            self.assertRejected(raw)

    def test_error_is_sticky(self) -> None:
        parser = MultipartParser(CONTENT_TYPE, LIMIT)
        with self.assertRaises(MultipartError):
            parser.feed(body(b"x").replace(b"application/json", b"text/plain", 1))
        with self.assertRaises(MultipartError):
            parser.feed(body(b"x"))
        with self.assertRaises(MultipartError):
            parser.finish()

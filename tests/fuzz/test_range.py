"""``Range`` headers on downloads: any header gives the whole file, one
range inside the file, or 416, and the single ranges RFC 9110 defines are
read exactly."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial import unittest

from mediarepo.http.file_response import ByteRange, UnsatisfiableRange, parse_range
from tests.fuzz.strategies import hostile_text

sizes = st.integers(0, 10**12)
# Positions as a client may write them: with leading zeros, or far longer
# than any file (int() refuses more than 4300 digits).
positions = st.one_of(
    st.integers(0, 10**13).map(str),
    st.builds(lambda zeros, n: "0" * zeros + str(n), st.integers(0, 30), st.integers(0, 10**6)),
    st.integers(19, 6000).map(lambda n: "9" * n),
)
ows = st.text(" \t", max_size=2)
headers = st.one_of(
    hostile_text.map(lambda s: "bytes=" + s),
    hostile_text,
    st.builds(
        lambda a, b, s1, s2, s3: f"bytes={s1}{a}{s2}-{s3}{b}",
        st.one_of(positions, st.just("")),
        st.one_of(positions, st.just("")),
        ows,
        ows,
        ows,
    ),
    st.lists(st.builds(lambda a, b: f"{a}-{b}", positions, positions), min_size=2, max_size=3).map(
        lambda ranges: "bytes=" + ",".join(ranges)
    ),
)


class RangePropertyTests(unittest.TestCase):
    @given(headers, sizes)
    def test_any_header(self, header: str, size: int) -> None:
        """The whole file, a non-empty range inside it, or 416: nothing else."""
        try:
            result = parse_range(header, size)
        except UnsatisfiableRange:
            return
        if result is not None:
            self.assertGreaterEqual(result.start, 0)
            self.assertGreaterEqual(result.length, 1)
            self.assertLessEqual(result.start + result.length, size)

    @given(sizes.filter(bool), st.data())
    def test_first_last(self, size: int, data: st.DataObject) -> None:
        first = data.draw(st.integers(0, size - 1), label="first")
        last = data.draw(st.integers(first, size * 2), label="last")
        self.assertEqual(
            parse_range(f"bytes={first}-{last}", size),
            ByteRange(first, min(last, size - 1) - first + 1),
        )
        self.assertEqual(parse_range(f"bytes={first}-", size), ByteRange(first, size - first))

    @given(sizes, st.integers(0, 10**13))
    def test_past_the_end(self, size: int, past: int) -> None:
        with self.assertRaises(UnsatisfiableRange):
            parse_range(f"bytes={size + past}-", size)
        with self.assertRaises(UnsatisfiableRange):
            parse_range("bytes=" + "9" * 5000 + "-", size)

    @given(sizes.filter(bool), st.integers(1, 10**13))
    def test_suffix(self, size: int, suffix: int) -> None:
        expected = ByteRange(size - min(suffix, size), min(suffix, size))
        self.assertEqual(parse_range(f"bytes=-{suffix}", size), expected)
        self.assertEqual(parse_range("bytes=-" + "9" * 5000, size), ByteRange(0, size))

    @given(sizes, positions, positions)
    def test_backwards_range_ignored(self, size: int, first: str, last: str) -> None:
        """``last`` before ``first`` is not a range (RFC 9110 §14.1.1): the
        header is ignored, however long the numbers."""

        def value(digits: str) -> tuple[int, str]:
            # Numbers compared without int(), which refuses over 4300 digits.
            digits = digits.lstrip("0")
            return len(digits), digits

        if value(last) < value(first):
            self.assertIsNone(parse_range(f"bytes={first}-{last}", size))

    @given(sizes, st.sampled_from(["\u0661", "\u00b2", "\uff11", "\u0967"]), st.booleans())
    def test_only_ascii_digits(self, size: int, digit: str, as_first: bool) -> None:
        """Other scripts' digits, which int() would read, are not digits here."""
        header = f"bytes={digit}-" if as_first else f"bytes=-{digit}"
        self.assertIsNone(parse_range(header, size))

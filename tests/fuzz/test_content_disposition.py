"""Content-Disposition, built for every download and read back from peers'
multipart answers: any file name survives the trip, and none can break out
of its header."""

from __future__ import annotations

import re
from urllib.parse import unquote

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial import unittest

from mediarepo.http.headers import INLINE_CONTENT_TYPES, content_disposition, is_inline_type
from mediarepo.media.remote import filename_from_disposition
from tests.fuzz.strategies import decoded_text, hostile_text

# RFC 9110 token characters, and RFC 8187 (5987) attr-char with "%XX"
# escapes, plus "/", which Synapse leaves unescaped and browsers accept.
_TOKEN = r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_EXT_VALUE = r"(?:[!#$&+\-.^_`|~0-9A-Za-z/]|%[0-9A-F]{2})*"
_HEADER = re.compile(
    rf"(inline|attachment)"
    rf"(?:; filename=(?P<plain>{_TOKEN})|; filename\*=utf-8''(?P<ext>{_EXT_VALUE}))?"
)

media_types = st.one_of(
    st.sampled_from(sorted(INLINE_CONTENT_TYPES)),
    st.sampled_from(["image/svg+xml", "text/html", "application/pdf", "TEXT/PLAIN; charset=x"]),
    hostile_text,
    st.none(),
)
file_names = st.one_of(decoded_text, hostile_text, st.none())


class ContentDispositionTests(unittest.TestCase):
    @given(media_types, file_names)
    def test_well_formed_and_printable(self, media_type: str | None, name: str | None) -> None:
        """Only printable ASCII: no CR, LF or NUL to end the header early,
        nothing outside what a header may carry, and the RFC 6266 shape."""
        value = content_disposition(media_type, name)
        self.assertRegex(value, r"\A[\x20-\x7e]*\Z")
        match = _HEADER.fullmatch(value)
        assert match is not None, value
        self.assertEqual(match.group(1), "inline" if is_inline_type(media_type) else "attachment")
        self.assertEqual(match.group("plain") is None and match.group("ext") is None, not name)

    @given(media_types, file_names)
    def test_name_round_trips(self, media_type: str | None, name: str | None) -> None:
        """What we send, the RFC's decoding gives back exactly, and so does
        our reader of peers' headers."""
        value = content_disposition(media_type, name)
        match = _HEADER.fullmatch(value)
        assert match is not None, value
        if match.group("plain") is not None:
            sent = match.group("plain")
        elif match.group("ext") is not None:
            sent = unquote(match.group("ext"), errors="strict")
        else:
            sent = None
        self.assertEqual(sent, name or None)
        self.assertEqual(filename_from_disposition(value), name or None)

    @given(hostile_text)
    def test_reading_any_header(self, value: str) -> None:
        """A peer's header never makes the reader raise."""
        name = filename_from_disposition(value)
        self.assertTrue(name is None or (isinstance(name, str) and name != ""))

    @given(decoded_text.filter(bool), st.sampled_from(["", "utf-8", "UTF-8"]), st.booleans())
    def test_extended_name_wins(self, name: str, charset: str, quoted_plain: bool) -> None:
        """``filename*`` in UTF-8 is taken over a plain ``filename``, as
        Synapse reads them; another charset is not trusted."""
        from urllib.parse import quote

        plain = '"fallback.bin"' if quoted_plain else "fallback.bin"
        value = f"attachment; filename={plain}; filename*={charset}''{quote(name, safe='')}"
        expected = name if charset.lower() == "utf-8" else "fallback.bin"
        self.assertEqual(filename_from_disposition(value), expected)

"""Sizes ("50M") and durations ("24h") in homeserver.yaml: what Synapse
accepts reads as the same number, and anything else stops start-up with a
ConfigError naming the key, never another exception."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial import unittest

from mediarepo.config_reader import parse_duration_ms, parse_size
from mediarepo.errors import ConfigError
from tests.fuzz.strategies import hostile_text

SIZE_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}
DURATION_UNITS = {
    "": 1,
    "s": 1000,
    "m": 60_000,
    "h": 3_600_000,
    "d": 86_400_000,
    "w": 604_800_000,
    "y": 31_536_000_000,
}
padding = st.text(" \t", max_size=2)
# What YAML hands over for a value: strings, numbers, and the rest.
yaml_values = st.one_of(
    hostile_text,
    st.text("0123456789KMGTkmgtshdwy \t.-+_\u00b2\u0661\uff11", max_size=8),
    # Digits of other scripts, which str.isdigit() and int() take.
    st.builds(
        lambda digits, unit: digits + unit,
        st.text("0123456789\u00b2\u0661\uff11", min_size=1, max_size=4),
        st.sampled_from(["", "K", "M", "s", "h"]),
    ),
    st.integers(-(10**20), 10**20),
    st.floats(allow_nan=True),
    st.booleans(),
    st.none(),
    st.lists(st.integers(), max_size=2),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)


class SizePropertyTests(unittest.TestCase):
    @given(
        st.integers(0, 10**15), st.sampled_from(sorted(SIZE_UNITS)), st.booleans(), padding, padding
    )
    def test_round_trip(self, number: int, unit: str, lower: bool, before: str, after: str) -> None:
        text = f"{before}{number}{unit.lower() if lower else unit}{after}"
        self.assertEqual(parse_size("max_upload_size", text), number * SIZE_UNITS[unit])

    @given(st.integers(0, 10**15))
    def test_plain_integers(self, number: int) -> None:
        self.assertEqual(parse_size("max_upload_size", number), number)

    @given(yaml_values)
    def test_anything_else_is_a_config_error(self, value: object) -> None:
        try:
            size = parse_size("max_upload_size", value)
        except ConfigError as e:
            self.assertIn("max_upload_size", str(e))
            return
        self.assertIsInstance(size, int)
        self.assertGreaterEqual(size, 0)
        if isinstance(value, str):
            # Only ASCII digits and one unit make a size.
            self.assertRegex(value.strip(), r"\A[0-9]+[KMGTkmgt]?\Z")


class DurationPropertyTests(unittest.TestCase):
    @given(st.integers(0, 10**12), st.sampled_from(sorted(DURATION_UNITS)), padding, padding)
    def test_round_trip(self, number: int, unit: str, before: str, after: str) -> None:
        text = f"{before}{number}{unit}{after}"
        self.assertEqual(parse_duration_ms("media_retention", text), number * DURATION_UNITS[unit])

    @given(yaml_values)
    def test_anything_else_is_a_config_error(self, value: object) -> None:
        try:
            duration = parse_duration_ms("media_retention", value)
        except ConfigError as e:
            self.assertIn("media_retention", str(e))
            return
        self.assertIsInstance(duration, int)
        self.assertGreaterEqual(duration, 0)
        if isinstance(value, str):
            self.assertRegex(value.strip(), r"\A[0-9]+[smhdwy]?\Z")

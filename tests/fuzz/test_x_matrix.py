"""``Authorization: X-Matrix`` parsing: any header a peer sends is either
parsed into checked values or refused with our error, and every way of
writing the same parameters reads the same."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from signedjson.key import generate_signing_key, get_verify_key
from twisted.trial import unittest

from mediarepo.federation.signing import (
    MAX_HEADER_LENGTH,
    AuthHeaderError,
    XMatrixAuth,
    parse_x_matrix,
    sign_request,
    verify_request,
)
from mediarepo.identifiers import is_valid_server_name
from tests.fuzz.strategies import hostile_text, server_names

KEY = generate_signing_key("a_fuzz")
VERIFY_KEY = get_verify_key(KEY)

key_ids = st.builds(
    lambda alg, version: f"{alg}:{version}",
    st.text(
        "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_", min_size=1, max_size=64
    ),
    st.text(
        "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.+/=-",
        min_size=1,
        max_size=40,
    ),
)
signatures = st.builds(
    lambda body, pad: body + pad,
    st.text(
        "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789+/_-",
        min_size=1,
        max_size=90,
    ),
    st.sampled_from(["", "=", "=="]),
)
# Request targets as a client library writes them: printable ASCII.
uris = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=60).map(
    lambda s: "/" + s
)
whitespace = st.text(" \t", max_size=2)


def _quoted(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


# Headers close to real ones: the right names, each usually with a right
# value and otherwise with a wrong or hostile one, quoted or not, in any
# order, some missing, some repeated, with parameters we do not know.
@st.composite
def near_headers(draw: st.DrawFn) -> str:
    wrong = st.one_of(server_names, key_ids, signatures, hostile_text)
    good = {"origin": server_names, "key": key_ids, "sig": signatures, "destination": server_names}
    params = []
    for name, strategy in good.items():
        for _ in range(draw(st.sampled_from([1] * 8 + [0, 2]))):
            value = draw(st.one_of(*[strategy] * 6, wrong))
            params.append((name, value))
    for _ in range(draw(st.sampled_from([0, 0, 0, 1]))):
        params.append((draw(st.sampled_from(["x", "", "ORIGIN"])), draw(wrong)))
    params = draw(st.permutations(params))
    return "X-Matrix " + ",".join(
        f"{name}={_quoted(value) if draw(st.booleans()) else value}" for name, value in params
    )


class XMatrixPropertyTests(unittest.TestCase):
    @given(st.one_of(hostile_text, st.binary(max_size=300), near_headers(), near_headers()))
    def test_any_header_only_our_error(self, header: str | bytes) -> None:
        try:
            auth = parse_x_matrix(header)
        except AuthHeaderError:
            return
        # Whatever is accepted is what the rest of the server relies on.
        self.assertTrue(is_valid_server_name(auth.origin))
        self.assertTrue(auth.destination is None or is_valid_server_name(auth.destination))
        self.assertRegex(auth.key_id, r"\A[A-Za-z0-9_]+:[A-Za-z0-9_.+/=-]+\Z")
        self.assertRegex(auth.signature, r"\A[A-Za-z0-9+/_-]+={0,2}\Z")

    @given(server_names, server_names, st.sampled_from(["GET", "PUT", "POST"]), uris)
    def test_signed_header_round_trips(
        self, origin: str, destination: str, method: str, uri: str
    ) -> None:
        """What we sign, we parse back and verify; only for its destination."""
        (header,) = sign_request(KEY, origin, destination, method, uri)
        auth = parse_x_matrix(header.encode("ascii"))
        self.assertEqual(
            (auth.origin, auth.destination, auth.key_id), (origin, destination, "ed25519:a_fuzz")
        )
        self.assertTrue(verify_request(auth, method, uri, destination, VERIFY_KEY))
        self.assertFalse(verify_request(auth, method, uri + "x", destination, VERIFY_KEY))

    @given(
        server_names,
        key_ids,
        signatures,
        st.one_of(st.none(), server_names),
        st.permutations(range(5)),
        st.lists(st.booleans(), min_size=5, max_size=5),
        st.lists(whitespace, min_size=10, max_size=10),
        st.sampled_from(["X-Matrix", "x-matrix", "X-MATRIX"]),
        st.lists(st.sampled_from(["origin", "Origin", "ORIGIN"]), min_size=1, max_size=1),
    )
    def test_any_spelling_reads_the_same(
        self,
        origin: str,
        key_id: str,
        signature: str,
        destination: str | None,
        order: list[int],
        quote: list[bool],
        spaces: list[str],
        scheme: str,
        origin_name: list[str],
    ) -> None:
        """Parameter order, quoting, case of names and scheme, spaces around
        ``=`` and ``,``, and parameters the spec may add later: none of them
        changes what is read."""
        params = [
            (origin_name[0], origin),
            ("key", key_id),
            ("sig", signature),
            ("destination", destination),
            ("future_param", 'some value, "quoted"'),
        ]
        parts = []
        for index in order:
            name, value = params[index]
            if value is None:
                continue
            # The unknown parameter holds characters only a quoted string can.
            written = _quoted(value) if quote[index] or name == "future_param" else value
            parts.append(f"{name}{spaces[2 * index]}={spaces[2 * index + 1]}{written}")
        header = f"{scheme} " + ",".join(parts)
        auth = parse_x_matrix(header)
        self.assertEqual(auth, XMatrixAuth(origin, key_id, signature, destination))

    @given(server_names, key_ids, signatures, st.sampled_from(["origin", "key", "sig"]))
    def test_missing_or_repeated_parameter_refused(
        self, origin: str, key_id: str, signature: str, name: str
    ) -> None:
        values = {"origin": origin, "key": key_id, "sig": signature}
        without = ",".join(f"{k}={_quoted(v)}" for k, v in values.items() if k != name)
        with self.assertRaises(AuthHeaderError):
            parse_x_matrix("X-Matrix " + without)
        doubled = ",".join(f"{k}={_quoted(v)}" for k, v in values.items())
        with self.assertRaises(AuthHeaderError):
            parse_x_matrix(f"X-Matrix {doubled},{name}={_quoted(values[name])}")

    @given(st.integers(MAX_HEADER_LENGTH + 1, MAX_HEADER_LENGTH * 4))
    def test_long_header_refused(self, length: int) -> None:
        header = 'X-Matrix origin="a",key="ed25519:a",sig="' + "A" * length + '"'
        with self.assertRaises(AuthHeaderError):
            parse_x_matrix(header)

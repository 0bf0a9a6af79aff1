"""X-Matrix headers: signing, parsing and verifying them."""

from __future__ import annotations

from typing import Any

import attrs
from signedjson.key import (
    decode_signing_key_base64,
    decode_verify_key_bytes,
    generate_signing_key,
    get_verify_key,
)
from signedjson.sign import sign_json
from twisted.trial import unittest
from unpaddedbase64 import decode_base64

from mediarepo.federation.signing import (
    MAX_HEADER_LENGTH,
    AuthHeaderError,
    XMatrixAuth,
    parse_x_matrix,
    request_json,
    sign_request,
    verify_request,
)

ORIGIN = "origin.example"
DESTINATION = "dest.example"
URI = "/_matrix/federation/v1/media/download/abcdef?timeout_ms=20000"
SIG = "c2lnbmF0dXJl"

# The signing key of the Matrix spec's JSON-signing examples.
SPEC_SEED = "YJDBA9Xnr2sVqXD9Vj7XVUnmFZcZrlw8Md7kMW+3XA1"
SPEC_VERIFY_KEY = "XGX0JRS2Af3be3knz2fBiRbApjm2Dh61gXDJA8kcJNI"
# ed25519 signatures are deterministic: this is that key's signature of
# GET URI from ORIGIN to DESTINATION, as key "ed25519:a_fixed".
FIXED_SIGNATURE = (
    "f8uYJuiX0AYersbw0zLfhWgWmQigmIE/r6fHLo1v+ua3uFRs8DUaYTkrIl/6dTmND7HXS+SGG9Uw8V5TuHFXBg"
)


def header(params: str) -> str:
    return "X-Matrix " + params


def minimal(**extra: str) -> str:
    params = {"origin": ORIGIN, "key": "ed25519:a_1", "sig": SIG}
    params.update(extra)
    return header(",".join(f'{k}="{v}"' for k, v in params.items()))


class SignAndVerifyTests(unittest.TestCase):
    def setUp(self) -> None:
        self.key = generate_signing_key("a_test")
        self.verify_key = get_verify_key(self.key)

    def sign(
        self,
        *,
        origin: str = ORIGIN,
        destination: str = DESTINATION,
        method: str = "GET",
        content: object | None = None,
    ) -> XMatrixAuth:
        headers = sign_request(self.key, origin, destination, method, URI, content)
        self.assertEqual(len(headers), 1)
        return parse_x_matrix(headers[0])

    def test_round_trip(self) -> None:
        auth = self.sign()
        self.assertEqual(auth.origin, ORIGIN)
        self.assertEqual(auth.destination, DESTINATION)
        self.assertEqual(auth.key_id, "ed25519:a_test")
        self.assertTrue(verify_request(auth, "GET", URI, DESTINATION, self.verify_key))

    def test_header_layout(self) -> None:
        (value,) = sign_request(self.key, ORIGIN, DESTINATION, "GET", URI)
        self.assertTrue(
            value.startswith(f'X-Matrix origin="{ORIGIN}",key="ed25519:a_test",sig="'), value
        )
        self.assertTrue(value.endswith(f'",destination="{DESTINATION}"'), value)
        signature = parse_x_matrix(value).signature
        self.assertNotIn("=", signature)  # unpadded
        self.assertEqual(len(decode_base64(signature)), 64)

    def test_header_bytes(self) -> None:
        (value,) = sign_request(self.key, ORIGIN, DESTINATION, "GET", URI)
        self.assertEqual(parse_x_matrix(value.encode("ascii")), parse_x_matrix(value))

    def test_server_names_with_ports_and_ipv6(self) -> None:
        auth = self.sign(origin="[2001:db8::1]:8448", destination="dest.example:8448")
        self.assertEqual(auth.origin, "[2001:db8::1]:8448")
        self.assertEqual(auth.destination, "dest.example:8448")
        self.assertTrue(verify_request(auth, "GET", URI, "dest.example:8448", self.verify_key))

    def test_content_is_signed(self) -> None:
        content: dict[str, Any] = {"server_keys": {"a.example": {}}}
        auth = self.sign(method="POST", content=content)
        self.assertTrue(
            verify_request(auth, "POST", URI, DESTINATION, self.verify_key, content=content)
        )
        self.assertFalse(verify_request(auth, "POST", URI, DESTINATION, self.verify_key))
        self.assertFalse(
            verify_request(auth, "POST", URI, DESTINATION, self.verify_key, content={"x": 1})
        )

    def test_tampered_method(self) -> None:
        self.assertFalse(verify_request(self.sign(), "PUT", URI, DESTINATION, self.verify_key))

    def test_tampered_uri(self) -> None:
        auth = self.sign()
        for uri in (URI + "0", URI.replace("abcdef", "abcdeg"), URI.split("?")[0]):
            self.assertFalse(verify_request(auth, "GET", uri, DESTINATION, self.verify_key))

    def test_other_destination(self) -> None:
        # Signed for another server: replaying it here must fail, whatever
        # the header's own destination says.
        auth = self.sign(destination="other.example")
        self.assertFalse(verify_request(auth, "GET", URI, DESTINATION, self.verify_key))
        forged = attrs.evolve(auth, destination=DESTINATION)
        self.assertFalse(verify_request(forged, "GET", URI, DESTINATION, self.verify_key))

    def test_tampered_origin(self) -> None:
        auth = attrs.evolve(self.sign(), origin="evil.example")
        self.assertFalse(verify_request(auth, "GET", URI, DESTINATION, self.verify_key))

    def test_tampered_signature(self) -> None:
        auth = self.sign()
        flipped = ("B" if auth.signature[0] == "A" else "A") + auth.signature[1:]
        for signature in (flipped, auth.signature[:-4], "AAAA", "!!!"):
            bad = attrs.evolve(auth, signature=signature)
            self.assertFalse(verify_request(bad, "GET", URI, DESTINATION, self.verify_key))

    def test_wrong_key(self) -> None:
        same_name = get_verify_key(generate_signing_key("a_test"))
        other_name = get_verify_key(generate_signing_key("a_other"))
        auth = self.sign()
        self.assertFalse(verify_request(auth, "GET", URI, DESTINATION, same_name))
        self.assertFalse(verify_request(auth, "GET", URI, DESTINATION, other_name))

    def test_key_named_differently(self) -> None:
        # The right key bytes under another name are not the key the header names.
        renamed = decode_verify_key_bytes("ed25519:a_renamed", self.verify_key.encode())
        self.assertFalse(verify_request(self.sign(), "GET", URI, DESTINATION, renamed))

    def test_unsupported_algorithm(self) -> None:
        auth = attrs.evolve(self.sign(), key_id="curve25519:a_test")
        with self.assertRaises(AuthHeaderError):
            verify_request(auth, "GET", URI, DESTINATION, self.verify_key)

    def test_request_json(self) -> None:
        self.assertEqual(
            request_json("GET", URI, ORIGIN, DESTINATION),
            {"method": "GET", "uri": URI, "origin": ORIGIN, "destination": DESTINATION},
        )
        self.assertEqual(request_json("POST", URI, ORIGIN, DESTINATION, {})["content"], {})


class KnownVectorTests(unittest.TestCase):
    def setUp(self) -> None:
        self.key = decode_signing_key_base64("ed25519", "a_fixed", SPEC_SEED)
        self.verify_key = decode_verify_key_bytes("ed25519:a_fixed", decode_base64(SPEC_VERIFY_KEY))

    def test_signedjson_made_header(self) -> None:
        # Signed by signedjson directly, written the way other servers write
        # it (unquoted where a token will do, no destination).
        obj = {"method": "GET", "uri": URI, "origin": ORIGIN, "destination": DESTINATION}
        signature = sign_json(obj, ORIGIN, self.key)["signatures"][ORIGIN]["ed25519:a_fixed"]
        value = f'X-Matrix origin={ORIGIN},key="ed25519:a_fixed",sig="{signature}"'
        auth = parse_x_matrix(value)
        self.assertIsNone(auth.destination)
        self.assertTrue(verify_request(auth, "GET", URI, DESTINATION, self.verify_key))

    def test_fixed_signature(self) -> None:
        (value,) = sign_request(self.key, ORIGIN, DESTINATION, "GET", URI)
        self.assertEqual(parse_x_matrix(value).signature, FIXED_SIGNATURE)
        auth = XMatrixAuth(ORIGIN, "ed25519:a_fixed", FIXED_SIGNATURE, DESTINATION)
        self.assertTrue(verify_request(auth, "GET", URI, DESTINATION, self.verify_key))


class ParseTests(unittest.TestCase):
    def assertMalformed(self, value: str | bytes) -> None:
        with self.assertRaises(AuthHeaderError, msg=repr(value)):
            parse_x_matrix(value)

    def test_minimal(self) -> None:
        auth = parse_x_matrix(minimal())
        self.assertEqual(auth, XMatrixAuth(ORIGIN, "ed25519:a_1", SIG, None))

    def test_unquoted_values(self) -> None:
        # Older servers send values with ":" unquoted; the spec asks us to take them.
        auth = parse_x_matrix(
            header(f"origin=[::1]:8448,key=ed25519:a_1,sig={SIG}==,destination=d.example:443")
        )
        self.assertEqual(
            auth, XMatrixAuth("[::1]:8448", "ed25519:a_1", SIG + "==", "d.example:443")
        )

    def test_spaces_and_tabs(self) -> None:
        auth = parse_x_matrix(
            f'X-Matrix \t origin = "{ORIGIN}" ,\tkey="ed25519:a_1"\t, sig="{SIG}" , '
            f'destination="{DESTINATION}"  '
        )
        self.assertEqual(auth, XMatrixAuth(ORIGIN, "ed25519:a_1", SIG, DESTINATION))

    def test_tab_after_scheme(self) -> None:
        self.assertEqual(parse_x_matrix(minimal().replace(" ", "\t", 1)).origin, ORIGIN)

    def test_quoted_commas_and_equals(self) -> None:
        auth = parse_x_matrix(minimal(note="a, b=c, origin=evil.example"))
        self.assertEqual(auth.origin, ORIGIN)

    def test_escaped_quotes(self) -> None:
        auth = parse_x_matrix(minimal(note='say \\"hi\\", origin=\\"evil\\"'))
        self.assertEqual(auth.origin, ORIGIN)
        escaped = parse_x_matrix(header(f'origin="origin\\.exam\\ple",key="ed25519:a_1",sig={SIG}'))
        self.assertEqual(escaped.origin, ORIGIN)

    def test_param_names_any_case(self) -> None:
        auth = parse_x_matrix(
            header(f'ORIGIN="{ORIGIN}",Key="ed25519:a_1",sIg="{SIG}",DESTINATION="{DESTINATION}"')
        )
        self.assertEqual(auth, XMatrixAuth(ORIGIN, "ed25519:a_1", SIG, DESTINATION))

    def test_scheme_any_case(self) -> None:
        self.assertEqual(parse_x_matrix("x-matrix" + minimal()[8:]).origin, ORIGIN)

    def test_unknown_params_ignored(self) -> None:
        self.assertEqual(parse_x_matrix(minimal(future="x", other="y")).origin, ORIGIN)

    def test_missing_fields(self) -> None:
        self.assertMalformed(header(f'key="ed25519:a_1",sig="{SIG}"'))
        self.assertMalformed(header(f'origin="{ORIGIN}",sig="{SIG}"'))
        self.assertMalformed(header(f'origin="{ORIGIN}",key="ed25519:a_1"'))

    def test_no_params(self) -> None:
        for value in ("X-Matrix", "X-Matrix ", "X-Matrix \t ", "X-Matrix ,"):
            self.assertMalformed(value)

    def test_other_schemes(self) -> None:
        for value in (
            "Bearer abcdef",
            "Basic b3JpZ2luOnNpZw==",
            "X-MatrixOrigin=" + ORIGIN,
            "X-Matrix2 " + minimal()[9:],
            " " + minimal(),
            "",
        ):
            self.assertMalformed(value)

    def test_duplicates(self) -> None:
        self.assertMalformed(minimal() + f',origin="{ORIGIN}"')
        self.assertMalformed(minimal() + f',ORIGIN="{ORIGIN}"')
        self.assertMalformed(minimal() + ',sig="AAAA"')
        self.assertMalformed(minimal(destination=DESTINATION) + f",destination={DESTINATION}")

    def test_empty_values(self) -> None:
        self.assertMalformed(minimal(origin=""))
        self.assertMalformed(minimal(sig=""))
        self.assertMalformed(minimal(destination=""))
        self.assertMalformed(minimal(note=""))
        self.assertMalformed(header(f"origin=,key=ed25519:a_1,sig={SIG}"))

    def test_bad_origin(self) -> None:
        for origin in (
            "exa mple.com",
            "example.com:99999",
            "example.com:",
            "[::1",
            "::1",
            "example.com/path",
            "a" * 300,
        ):
            self.assertMalformed(minimal(origin=origin))

    def test_bad_destination(self) -> None:
        self.assertMalformed(minimal(destination="not a server"))

    def test_bad_key_id(self) -> None:
        for key in ("ed25519", "ed25519:", ":a_1", "ed25519:a 1", "ed 25519:a_1", "ed25519:a,1"):
            self.assertMalformed(minimal(key=key))

    def test_bad_signature(self) -> None:
        for sig in ("not base64!", "abc def", "abc===", '"'):
            self.assertMalformed(header(f'origin="{ORIGIN}",key="ed25519:a_1",sig="{sig}"'))

    def test_structure_errors(self) -> None:
        for value in (
            minimal() + ",",
            minimal().replace(",", ",,", 1),
            minimal() + ",note",
            minimal() + ",note=",
            minimal() + ',note="unterminated',
            minimal() + ',note="ends in backslash\\',
            minimal() + ',note="x"y',
            minimal() + ",note=a b",
            minimal() + ";note=x",
            minimal() + ",=x",
            header(f'origin="{ORIGIN}" key="ed25519:a_1",sig="{SIG}"'),
        ):
            self.assertMalformed(value)

    def test_control_characters(self) -> None:
        for char in ("\x00", "\r", "\n", "\x1b", "\x7f"):
            self.assertMalformed(minimal(note=f"a{char}b"))
        self.assertMalformed(minimal() + "\r\nX-Other: 1")

    def test_non_ascii(self) -> None:
        self.assertMalformed(minimal(note="caf\u00e9"))
        self.assertMalformed(minimal(note="cafe").encode("ascii").replace(b"cafe", b"caf\xc3\xa9"))

    def test_length_limit(self) -> None:
        base = minimal(note="")[:-1]
        fits = base + "x" * (MAX_HEADER_LENGTH - len(base) - 1) + '"'
        self.assertEqual(len(fits), MAX_HEADER_LENGTH)
        self.assertEqual(parse_x_matrix(fits).origin, ORIGIN)
        self.assertMalformed(fits[:-1] + 'x"')
        self.assertMalformed(minimal(note="x" * 100_000).encode("ascii"))

"""Checks the schemathesis run (tests/fuzz/test_schemathesis.py) loads in
place of the two built-in ones the spec's files cannot support.

The spec's media OpenAPI documents no 401 anywhere, no 404 on downloads, and
only ``application/octet-stream`` download bodies (a download answers with
the type it was uploaded with). ``status_code_conformance`` is replaced by
:func:`matrix_errors`, which allows exactly the undocumented statuses listed
below, each for a stated reason and only with the error codes that reason
gives; ``content_type_conformance`` stays on everywhere but the download
operations. Every error answer, documented or not, must be a Matrix error.

Loaded by schemathesis from its file path (its ``hooks`` setting), not imported
by the tests.
"""

from __future__ import annotations

import ipaddress
import json
import re
from typing import Any

import schemathesis
from hypothesis import strategies as st

# The spec types server names as format "mx-server-name", unknown to
# schemathesis, which then sends any string (and most requests stop at the
# name check). Names of the spec's grammar instead: a DNS name, an IPv4
# address or a bracketed IPv6 literal, with an optional port. Negative
# testing still sends names outside it.
_LABEL = st.text("abcdefghijklmnopqrstuvwxyz0123456789-", min_size=1, max_size=12)
schemathesis.openapi.format(
    "mx-server-name",
    st.builds(
        lambda host, port: host + port,
        st.one_of(
            st.lists(_LABEL, min_size=1, max_size=4).map(".".join),
            st.ip_addresses(v=4).map(str),
            st.ip_addresses(v=6).map(lambda a: f"[{ipaddress.IPv6Address(a).compressed}]"),
        ),
        st.one_of(st.just(""), st.integers(1, 65535).map(lambda p: f":{p}")),
    ),
)

# status -> (operations it may come from, error codes it may carry, why the
# spec's files do not list it).
_UNDOCUMENTED: dict[int, tuple[re.Pattern[str], frozenset[str], str]] = {
    400: (
        re.compile(r"."),
        frozenset({"M_INVALID_PARAM", "M_MISSING_PARAM", "M_BAD_JSON", "M_NOT_JSON"}),
        "malformed parameters: the spec's error conventions answer them with 400"
        " (documented only on thumbnails)",
    ),
    401: (
        re.compile(r"."),
        frozenset({"M_MISSING_TOKEN", "M_UNKNOWN_TOKEN"}),
        "a missing or unknown access token: the files document no 401 at all",
    ),
    403: (
        re.compile(r"/(download|thumbnail)/"),
        frozenset({"M_FORBIDDEN"}),
        "media of another server: the test server federates with no one"
        " (federation_domain_whitelist), as tests reach only loopback",
    ),
    404: (
        re.compile(r"/(download|thumbnail|preview_url)"),
        frozenset({"M_NOT_FOUND", "M_UNRECOGNIZED"}),
        "unknown media (undocumented on downloads), and URL previews, which the"
        " test server leaves off (url_preview_enabled: false, the default, as Synapse's)",
    ),
    # The unsupported_method check's requests.
    405: (re.compile(r"."), frozenset({"M_UNRECOGNIZED"}), "a method the path does not take"),
}


def _documented_statuses(case: Any) -> set[str]:
    return set(case.operation.definition.raw.get("responses", {}))


def _matrix_error(body: bytes, content_type: str) -> dict[str, Any]:
    if content_type.split(";", 1)[0].strip().lower() != "application/json":
        raise AssertionError(f"error answer is {content_type or 'untyped'}, not application/json")
    try:
        error = json.loads(body)
    except ValueError as e:
        raise AssertionError(f"error answer is not JSON: {body[:200]!r}") from e
    if not (
        isinstance(error, dict)
        and isinstance(error.get("errcode"), str)
        and error["errcode"].startswith("M_")
        and isinstance(error.get("error"), str)
    ):
        raise AssertionError(f"error answer is not a Matrix error: {body[:200]!r}")
    return error


@schemathesis.check
def matrix_errors(ctx: Any, response: Any, case: Any) -> bool | None:
    """Every 4xx and 5xx is a Matrix error; a status the spec does not list
    is one of the allowed ones above, with an error code its reason allows."""
    status = response.status_code
    if status < 400:
        return None
    content_type = (response.headers.get("content-type") or [""])[0]
    error = _matrix_error(response.content, content_type)
    if str(status) in _documented_statuses(case):
        return None
    allowed = _UNDOCUMENTED.get(status)
    if allowed is None or not allowed[0].search(case.path):
        raise AssertionError(f"undocumented status {status} for {case.method} {case.path}")
    if error["errcode"] not in allowed[1]:
        raise AssertionError(
            f"{status} {error['errcode']} for {case.method} {case.path}: {status} is allowed"
            f" only as {sorted(allowed[1])} ({allowed[2]})"
        )
    return None

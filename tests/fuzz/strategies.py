"""Hypothesis strategies shared by the property tests."""

from __future__ import annotations

import ipaddress

from hypothesis import strategies as st

# Text as it reaches us once decoded from UTF-8 (a query parameter, a
# database column): any code point but the surrogates UTF-8 cannot carry.
decoded_text = st.text(st.characters(exclude_categories=["Cs"]))

# Text an attacker would pick first: the characters that end, split or
# smuggle header lines, quote or escape, or look like digits and are not.
_NASTY = "\r\n\x00\t \"\\;,=%/'*:?#[]()<>@{}²١٣\u2028\u0085\xa0\ufeff"
hostile_text = st.text(st.one_of(st.sampled_from(_NASTY), st.characters(exclude_categories=["Cs"])))

_LABEL = st.text(
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-", min_size=1, max_size=20
)
_HOSTNAME = st.lists(_LABEL, min_size=1, max_size=5).map(".".join)
_IPV4 = st.ip_addresses(v=4).map(str)
_IPV6 = st.ip_addresses(v=6).map(lambda a: f"[{ipaddress.IPv6Address(a).compressed}]")
_PORT = st.integers(1, 65535).map(lambda p: f":{p}")

# Server names as the Matrix spec's grammar makes them: a DNS name, an IPv4
# address or a bracketed IPv6 literal, with an optional port.
server_names = st.builds(
    lambda host, port: host + port,
    st.one_of(_HOSTNAME, _IPV4, _IPV6),
    st.one_of(st.just(""), _PORT),
).filter(lambda name: len(name) <= 255)

# Media IDs as the spec allows them (and ours: 24 letters).
media_ids = st.text(
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-", min_size=1, max_size=255
)

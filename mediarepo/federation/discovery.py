"""Where a server name's federation API is (the spec's server discovery).

1. An IP literal, or a name with an explicit port, is used as it is (port
   8448 by default).
2. Otherwise ``https://<name>/.well-known/matrix/server`` may delegate to
   another name (``m.server``); answers and failures are cached.
3. The (delegated) name, unless it has a port or is an IP literal, is looked
   up as SRV ``_matrix-fed._tcp`` then ``_matrix._tcp``; without records,
   port 8448.

TLS and the ``Host`` header always use the (delegated) server name, never
an SRV target.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import random
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any

import attrs

from mediarepo.config import is_valid_server_name

logger = logging.getLogger(__name__)

DEFAULT_PORT = 8448
WELL_KNOWN_MAX_BYTES = 50 * 1024
WELL_KNOWN_TIMEOUT_SECONDS = 10.0
WELL_KNOWN_DEFAULT_CACHE_SECONDS = 24 * 3600.0
WELL_KNOWN_MIN_CACHE_SECONDS = 5 * 60.0
WELL_KNOWN_MAX_CACHE_SECONDS = 48 * 3600.0
WELL_KNOWN_FAILURE_CACHE_SECONDS = 3600.0
SRV_CACHE_SECONDS = 3600.0

WellKnownFetcher = Callable[[str], Awaitable[tuple[int, dict[str, str], bytes]]]
# (priority, weight, port, target)
SrvLookup = Callable[[str], Awaitable[list[tuple[int, int, int, str]]]]

_MAX_AGE = re.compile(r"max-age\s*=\s*(\d+)", re.IGNORECASE)


@attrs.frozen
class FederationTarget:
    host: str  # where to connect: an IP address or a host name
    port: int
    host_header: str  # the Host header, and the name the certificate must carry


def _split(server_name: str) -> tuple[str, int | None]:
    if server_name.startswith("["):
        end = server_name.index("]")
        host, rest = server_name[1:end], server_name[end + 1 :]
        return host, int(rest[1:]) if rest else None
    if ":" in server_name:
        host, port = server_name.rsplit(":", 1)
        return host, int(port)
    return server_name, None


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _cache_seconds(headers: dict[str, str]) -> float | None:
    """How long a well-known answer may be kept; ``None`` for not at all."""
    control = headers.get("cache-control", "")
    if "no-store" in control.lower():
        return None
    match = _MAX_AGE.search(control)
    if match is None:
        return WELL_KNOWN_DEFAULT_CACHE_SECONDS
    return min(
        max(float(match.group(1)), WELL_KNOWN_MIN_CACHE_SECONDS), WELL_KNOWN_MAX_CACHE_SECONDS
    )


async def _fetch_well_known(host: str) -> tuple[int, dict[str, str], bytes]:
    import treq

    response = await treq.get(
        f"https://{host}/.well-known/matrix/server",
        timeout=WELL_KNOWN_TIMEOUT_SECONDS,
        allow_redirects=True,
    )
    headers = {
        k.decode().lower(): v[0].decode("latin-1") for k, v in response.headers.getAllRawHeaders()
    }
    if isinstance(response.length, int) and response.length > WELL_KNOWN_MAX_BYTES:
        return response.code, headers, b""
    body: bytes = await response.content()
    return response.code, headers, body[:WELL_KNOWN_MAX_BYTES]


async def _lookup_srv(name: str) -> list[tuple[int, int, int, str]]:
    from twisted.names import client, dns, error

    try:
        answers, _, _ = await client.lookupService(name)
    except (error.DNSNameError, error.DNSServerError, error.DNSQueryRefusedError):
        return []
    records = []
    for answer in answers:
        if answer.type == dns.SRV:
            payload = answer.payload
            records.append((payload.priority, payload.weight, payload.port, str(payload.target)))
    return records


class ServerResolver:
    def __init__(
        self,
        reactor: Any = None,
        *,
        http_get_well_known: WellKnownFetcher | None = None,
        srv_lookup: SrvLookup | None = None,
        clock: Any = None,
    ) -> None:
        self._fetch_well_known = http_get_well_known or _fetch_well_known
        self._srv_lookup = srv_lookup or _lookup_srv
        self._clock = clock or reactor
        self._well_known: dict[str, tuple[str | None, float]] = {}
        self._srv: dict[str, tuple[list[tuple[int, int, int, str]], float]] = {}

    def _now(self) -> float:
        return float(self._clock.seconds()) if self._clock is not None else time.time()

    async def resolve(self, server_name: str) -> list[FederationTarget]:
        """The addresses to try for ``server_name``, in order."""
        host, port = _split(server_name)
        if _is_ip(host) or port is not None:
            return [FederationTarget(host, port or DEFAULT_PORT, server_name)]
        delegated = await self._delegation(server_name)
        if delegated is not None:
            server_name = delegated
            host, port = _split(server_name)
            if _is_ip(host) or port is not None:
                return [FederationTarget(host, port or DEFAULT_PORT, server_name)]
        for prefix in ("_matrix-fed._tcp.", "_matrix._tcp."):
            records = await self._srv_records(prefix + host)
            if records:
                return [
                    FederationTarget(target.rstrip("."), target_port, server_name)
                    for _, _, target_port, target in _order(records)
                ]
        return [FederationTarget(host, DEFAULT_PORT, server_name)]

    async def _delegation(self, server_name: str) -> str | None:
        now = self._now()
        cached = self._well_known.get(server_name)
        if cached is not None and cached[1] > now:
            return cached[0]
        try:
            code, headers, body = await self._fetch_well_known(server_name)
            if code != 200:
                raise ValueError(f"HTTP {code}")
            delegated = json.loads(body)["m.server"]
            if not isinstance(delegated, str) or not is_valid_server_name(delegated):
                raise ValueError(f"m.server {delegated!r} is not a server name")
        except Exception as e:
            logger.info("no .well-known delegation for %s: %s", server_name, e)
            self._well_known[server_name] = (None, now + WELL_KNOWN_FAILURE_CACHE_SECONDS)
            return None
        keep = _cache_seconds(headers)
        if keep is not None:
            self._well_known[server_name] = (delegated, now + keep)
        return delegated

    async def _srv_records(self, name: str) -> list[tuple[int, int, int, str]]:
        now = self._now()
        cached = self._srv.get(name)
        if cached is not None and cached[1] > now:
            return cached[0]
        try:
            records = await self._srv_lookup(name)
        except Exception as e:
            logger.info("SRV lookup of %s failed: %s", name, e)
            records = []
        self._srv[name] = (records, now + SRV_CACHE_SECONDS)
        return records


def _order(records: list[tuple[int, int, int, str]]) -> list[tuple[int, int, int, str]]:
    """By priority; within one, a weighted shuffle (RFC 2782)."""
    ordered = []
    for priority in sorted({r[0] for r in records}):
        group = [r for r in records if r[0] == priority]
        while group:
            total = sum(r[1] for r in group)
            pick = random.uniform(0, total) if total else 0
            for record in group:
                pick -= record[1]
                if pick <= 0:
                    break
            ordered.append(record)
            group.remove(record)
    return ordered

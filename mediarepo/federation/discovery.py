"""Where a server name's federation API is: the spec's server discovery.

1. An IP literal, or a name with an explicit port, is used as it is (port
   8448 by default).
2. Otherwise ``https://<name>/.well-known/matrix/server`` may delegate to
   another server name (``m.server``). Answers are cached as their HTTP
   caching headers say, within bounds; failures are cached too, so a server
   without a well-known file is not asked on every request.
3. The (possibly delegated) name, unless it has a port or is an IP literal,
   is looked up as SRV ``_matrix-fed._tcp``, then the deprecated
   ``_matrix._tcp``; with no records, port 8448.

The ``Host`` header, TLS SNI and the certificate check always use the
(possibly delegated) server name, never an SRV target: DNS is not trusted
to say who the peer is, only where to find it.

Nothing here checks addresses against the IP blocklist: the outbound
client does, for every address it connects to, SRV targets included, and
the well-known fetcher goes through the same client.
"""

from __future__ import annotations

import email.utils
import ipaddress
import json
import logging
import random
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import attrs
from twisted.internet import defer
from twisted.names import client as dns_client
from twisted.names import dns
from twisted.names import error as dns_error

from mediarepo.identifiers import is_valid_server_name
from mediarepo.outbound import OutboundClient
from mediarepo.sharing import SharedWork

logger = logging.getLogger(__name__)

DEFAULT_PORT = 8448

WELL_KNOWN_PATH = "/.well-known/matrix/server"
WELL_KNOWN_MAX_BYTES = 50 * 1024
WELL_KNOWN_TIMEOUT_SECONDS = 10.0
WELL_KNOWN_DEFAULT_CACHE_SECONDS = 24 * 3600.0
WELL_KNOWN_MIN_CACHE_SECONDS = 5 * 60.0
WELL_KNOWN_MAX_CACHE_SECONDS = 48 * 3600.0
WELL_KNOWN_FAILURE_CACHE_SECONDS = 3600.0
# After a transient failure, a server that delegated before keeps its old
# delegation, and is asked again this soon.
WELL_KNOWN_RETRY_SECONDS = 2 * 60.0

SRV_DEFAULT_CACHE_SECONDS = 3600.0
SRV_MIN_CACHE_SECONDS = 60.0
SRV_MAX_CACHE_SECONDS = 24 * 3600.0
# Per-attempt timeouts of the default DNS lookup.
SRV_LOOKUP_TIMEOUTS = (2, 5, 10)
SRV_SERVICES = ("_matrix-fed._tcp.", "_matrix._tcp.")

# Above this many entries, a cache drops its expired ones.
_CACHE_PRUNE_SIZE = 10_000

# (status, headers with lowercased names, body)
WellKnownResponse = tuple[int, dict[str, str], bytes]
WellKnownFetcher = Callable[[str], Awaitable[WellKnownResponse]]
# (priority, weight, port, target)
SrvRecord = tuple[int, int, int, str]
SrvLookup = Callable[[str], Awaitable[list[SrvRecord]]]


@attrs.frozen
class FederationTarget:
    """One place to send a request for a server name."""

    # Where to connect: an IP address (IPv6 without brackets) or a host name.
    host: str
    port: int
    # The Host header, TLS SNI and certificate name: the (possibly
    # delegated) server name, exactly as written, port included if it had one.
    host_header: str


def split_server_name(server_name: str) -> tuple[str, int | None]:
    """``host`` (IPv6 without its brackets) and port of a server name;
    :class:`ValueError` if it is not one."""
    if not is_valid_server_name(server_name):
        raise ValueError(f"{server_name!r} is not a server name")
    if server_name.startswith("["):
        end = server_name.index("]")
        rest = server_name[end + 1 :]
        return server_name[1:end], int(rest[1:]) if rest else None
    host, colon, port = server_name.partition(":")
    return host, int(port) if colon else None


def is_ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _cache_directives(value: str) -> dict[str, str]:
    directives: dict[str, str] = {}
    for item in value.split(","):
        name, _, argument = item.strip().partition("=")
        if name:
            directives.setdefault(name.strip().lower(), argument.strip().strip('"'))
    return directives


def _http_date(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return email.utils.parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError, IndexError, OverflowError):
        return None


def well_known_cache_seconds(headers: Mapping[str, str], now: float) -> float:
    """How long a well-known answer is kept: its ``max-age``, else
    ``Expires`` less ``Date`` (or less ``now``), else a day; always within
    [5 min, 48 h]. ``no-store`` gets the minimum, not nothing, so a peer that
    sends it is not asked before every request."""
    directives = _cache_directives(headers.get("cache-control", ""))
    lifetime: float = WELL_KNOWN_DEFAULT_CACHE_SECONDS
    max_age = directives.get("max-age")
    if "no-store" in directives:
        lifetime = 0
    elif max_age is not None and max_age.isdigit():
        lifetime = int(max_age)
    elif "expires" in headers:
        # An Expires that can't be read means "already expired" (RFC 9111 §5.3).
        expires = _http_date(headers["expires"])
        date = _http_date(headers.get("date"))
        lifetime = 0 if expires is None else expires - (date if date is not None else now)
    return min(max(lifetime, WELL_KNOWN_MIN_CACHE_SECONDS), WELL_KNOWN_MAX_CACHE_SECONDS)


class WellKnownError(Exception):
    """No delegation could be read from a well-known answer."""

    def __init__(self, message: str, *, transient: bool) -> None:
        super().__init__(message)
        # A network error or 5xx: the server may still mean its old answer.
        self.transient = transient


def delegated_name(status: int, body: bytes) -> str:
    """The ``m.server`` of a well-known answer, or :class:`WellKnownError`."""
    if status != 200:
        raise WellKnownError(f"HTTP {status}", transient=status >= 500)
    if len(body) > WELL_KNOWN_MAX_BYTES:
        raise WellKnownError("answer too large", transient=False)
    try:
        content = json.loads(body)
    except ValueError as e:
        raise WellKnownError("answer is not JSON", transient=False) from e
    if not isinstance(content, dict):
        raise WellKnownError("answer is not a JSON object", transient=False)
    server = content.get("m.server")
    if not isinstance(server, str) or not is_valid_server_name(server):
        raise WellKnownError(f"m.server {server!r} is not a server name", transient=False)
    return server


def make_well_known_fetcher(reactor: Any, client: OutboundClient) -> WellKnownFetcher:
    """A fetcher of ``https://<host>/.well-known/matrix/server`` through
    ``client`` (federation's: every address checked against
    ``ip_range_blacklist``, the federation TLS settings) that follows
    redirects and gives up after 10 s, or the client's idle timeout without
    a byte of the body, or 50 KiB."""

    async def get(host: str) -> WellKnownResponse:
        response = await client.get(f"https://{host}{WELL_KNOWN_PATH}")
        headers = {
            name.decode("latin-1").lower(): ", ".join(v.decode("latin-1") for v in values)
            for name, values in response.headers.getAllRawHeaders()
        }
        body = await client.read_limited_body(response, WELL_KNOWN_MAX_BYTES)
        return response.code, headers, body

    async def fetch(host: str) -> WellKnownResponse:
        running = defer.Deferred.fromCoroutine(get(host))
        running.addTimeout(WELL_KNOWN_TIMEOUT_SECONDS, reactor)
        return await running

    return fetch


@attrs.frozen
class _WellKnownEntry:
    delegated: str | None
    expires: float
    # The last delegation actually read, kept across failures.
    last_good: str | None


@attrs.frozen
class _SrvEntry:
    records: list[SrvRecord]
    expires: float


def order_srv_records(records: list[SrvRecord], rng: random.Random) -> list[SrvRecord]:
    """Lowest priority first; within a priority, a weighted shuffle as
    RFC 2782 describes (weight 0 is chosen rarely, but can be)."""
    ordered: list[SrvRecord] = []
    for priority in sorted({r[0] for r in records}):
        group = [r for r in records if r[0] == priority]
        # Any order to start with, except that weight 0 comes first.
        rng.shuffle(group)
        group.sort(key=lambda r: r[1] != 0)
        while group:
            pick = rng.randint(0, sum(r[1] for r in group))
            running = 0
            chosen = len(group) - 1
            for index, record in enumerate(group):
                running += record[1]
                if running >= pick:
                    chosen = index
                    break
            ordered.append(group.pop(chosen))
    return ordered


class ServerResolver:
    """Turns a server name into the places to send its requests, in order.

    ``http_get_well_known`` fetches well-known files (see
    :func:`make_well_known_fetcher`); ``srv_lookup`` replaces DNS for
    tests; ``clock`` (an ``IReactorTime``, default ``reactor``) times the
    caches; ``rng`` orders SRV records of equal priority.
    """

    def __init__(
        self,
        reactor: Any,
        *,
        http_get_well_known: WellKnownFetcher,
        srv_lookup: SrvLookup | None = None,
        clock: Any = None,
        rng: random.Random | None = None,
    ) -> None:
        self._reactor = reactor
        self._clock = clock if clock is not None else reactor
        self._fetch_well_known = http_get_well_known
        self._srv_lookup = srv_lookup
        self._rng = rng or random.Random()
        self._well_known: dict[str, _WellKnownEntry] = {}
        self._srv: dict[str, _SrvEntry] = {}
        self._well_known_work: SharedWork[str, str | None] = SharedWork()
        self._srv_work: SharedWork[str, list[SrvRecord]] = SharedWork()

    def _now(self) -> float:
        return float(self._clock.seconds())

    async def resolve(self, server_name: str) -> list[FederationTarget]:
        """The places to try for ``server_name``, in order (never empty).
        :class:`ValueError` if ``server_name`` is not a server name."""
        host, port = split_server_name(server_name)
        if port is not None or is_ip_literal(host):
            return [FederationTarget(host, port or DEFAULT_PORT, server_name)]
        delegated = await self.delegation(host)
        if delegated is not None:
            server_name = delegated
            host, port = split_server_name(delegated)
            if port is not None or is_ip_literal(host):
                return [FederationTarget(host, port or DEFAULT_PORT, server_name)]
        for service in SRV_SERVICES:
            records = await self._srv_records(service + host.lower())
            if records:
                return [
                    FederationTarget(target, target_port, server_name)
                    for _, _, target_port, target in order_srv_records(records, self._rng)
                ]
        return [FederationTarget(host, DEFAULT_PORT, server_name)]

    # ------------------------------------------------------------ well-known

    async def delegation(self, host: str) -> str | None:
        """The server name ``host`` delegates to in its well-known file, if any."""
        key = host.lower()
        entry = self._well_known.get(key)
        if entry is not None and entry.expires > self._now():
            return entry.delegated
        return await self._well_known_work.run(key, lambda: self._refresh_delegation(key))

    async def _refresh_delegation(self, host: str) -> str | None:
        previous = self._well_known.get(host)
        last_good = previous.last_good if previous is not None else None
        try:
            try:
                status, headers, body = await self._fetch_well_known(host)
            except Exception as e:
                raise WellKnownError(f"{type(e).__name__}: {e}", transient=True) from e
            delegated = delegated_name(status, body)
        except WellKnownError as e:
            now = self._now()
            if e.transient and last_good is not None:
                logger.info("well-known of %s failed (%s); still using %s", host, e, last_good)
                self._remember(
                    host, _WellKnownEntry(last_good, now + WELL_KNOWN_RETRY_SECONDS, last_good)
                )
                return last_good
            logger.info("no well-known delegation for %s: %s", host, e)
            self._remember(
                host, _WellKnownEntry(None, now + WELL_KNOWN_FAILURE_CACHE_SECONDS, None)
            )
            return None
        now = self._now()
        lifetime = well_known_cache_seconds(headers, now)
        self._remember(host, _WellKnownEntry(delegated, now + lifetime, delegated))
        return delegated

    def _remember(self, host: str, entry: _WellKnownEntry) -> None:
        if len(self._well_known) > _CACHE_PRUNE_SIZE:
            now = self._now()
            self._well_known = {h: e for h, e in self._well_known.items() if e.expires > now}
        self._well_known[host] = entry

    # ------------------------------------------------------------ SRV

    async def _srv_records(self, name: str) -> list[SrvRecord]:
        entry = self._srv.get(name)
        if entry is not None and entry.expires > self._now():
            return entry.records
        return await self._srv_work.run(name, lambda: self._refresh_srv(name))

    async def _refresh_srv(self, name: str) -> list[SrvRecord]:
        previous = self._srv.get(name)
        try:
            if self._srv_lookup is not None:
                found, ttl = list(await self._srv_lookup(name)), None
            else:
                found, ttl = await self._dns_srv(name)
        except Exception as e:
            # Not cached: the next request asks again.
            if previous is not None:
                logger.info("SRV lookup of %s failed (%s); using the last answer", name, e)
                return previous.records
            logger.info("SRV lookup of %s failed: %s", name, e)
            return []
        # A target of "." says the service is not offered here (RFC 2782).
        records = [
            (priority, weight, port, target.rstrip("."))
            for priority, weight, port, target in found
            if target.rstrip(".") and 0 < port < 65536
        ]
        lifetime = SRV_DEFAULT_CACHE_SECONDS if ttl is None else float(ttl)
        lifetime = min(max(lifetime, SRV_MIN_CACHE_SECONDS), SRV_MAX_CACHE_SECONDS)
        now = self._now()
        if len(self._srv) > _CACHE_PRUNE_SIZE:
            self._srv = {n: e for n, e in self._srv.items() if e.expires > now}
        self._srv[name] = _SrvEntry(records, now + lifetime)
        return records

    async def _dns_srv(self, name: str) -> tuple[list[SrvRecord], int | None]:
        """SRV records from DNS, with the smallest TTL among them; none
        (and no TTL) if the name does not exist."""
        try:
            answers, _, _ = await dns_client.getResolver().lookupService(
                name, timeout=SRV_LOOKUP_TIMEOUTS
            )
        except dns_error.DNSNameError:
            return [], None
        records: list[SrvRecord] = []
        ttls: list[int] = []
        for answer in answers:
            if answer.type != dns.SRV:
                continue
            srv = answer.payload
            records.append((srv.priority, srv.weight, srv.port, str(srv.target)))
            ttls.append(answer.ttl)
        return records, min(ttls) if ttls else None

"""Outbound federation requests: find where a server name's federation API
is, sign the request with our key, and send it over the federation's
:class:`~mediarepo.outbound.OutboundClient`, which checks every address
against ``ip_range_blacklist`` (less ``ip_range_whitelist``) so that a peer
(or its DNS) cannot point us at the operator's own network, and verifies
TLS against the (possibly delegated) server name.
"""

from __future__ import annotations

import logging
from typing import Any

from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent

from mediarepo.config_federation import FederationConfig
from mediarepo.federation.backoff import DestinationAttempt, DestinationBackoff
from mediarepo.federation.discovery import (
    FederationTarget,
    ServerResolver,
    make_well_known_fetcher,
)
from mediarepo.federation.signing import sign_request
from mediarepo.outbound import (
    IPRangeFilter,
    NameResolver,
    OutboundClient,
    OutboundRequestError,
    OutboundResponse,
    OutboundSettings,
    ProxySettings,
    TLSPolicy,
)

logger = logging.getLogger(__name__)

USER_AGENT = b"mediarepo"
# The start of an error answer read for its message.
ERROR_BODY_BYTES = 64 * 1024


class FederationRequestError(Exception):
    """No usable answer from a peer: unreachable, refused or blocked."""


class NotRetryingDestination(FederationRequestError):
    """The server failed lately and is being left alone (its backoff in
    ``destinations`` runs until ``retry_at_ms``)."""

    def __init__(self, destination: str, retry_at_ms: int) -> None:
        super().__init__(f"not retrying {destination} until {retry_at_ms}")
        self.destination = destination
        self.retry_at_ms = retry_at_ms


def outbound_settings(
    config: FederationConfig, proxy: ProxySettings | None = None
) -> OutboundSettings:
    """What federation's outbound client is held to: the federation IP
    ranges and TLS settings, ``federation_idle_timeout``, and the proxy
    (Synapse sends federation through ``https_proxy`` too)."""
    return OutboundSettings(
        ip_filter=IPRangeFilter(config.ip_range_blacklist, config.ip_range_whitelist),
        user_agent=USER_AGENT,
        idle_timeout=config.idle_timeout_ms / 1000,
        tls=TLSPolicy.from_ca_files(config.custom_ca_list, verify=config.verify_certificates),
        proxy=proxy,
    )


def _tls_name(host_header: str) -> str:
    """The name a certificate must carry: the server name without its port."""
    if host_header.startswith("["):
        return host_header[1 : host_header.index("]")]
    return host_header.rsplit(":", 1)[0] if host_header.count(":") == 1 else host_header


class FederationClient:
    def __init__(
        self,
        reactor: Any,
        server_name: str,
        signing_key: Any,
        config: FederationConfig,
        resolver: ServerResolver | None = None,
        backoff: DestinationBackoff | None = None,
        *,
        proxy: ProxySettings | None = None,
        name_resolver: NameResolver | None = None,
        agent: IAgent | None = None,
    ) -> None:
        """``agent``: see :class:`OutboundClient` (tests only)."""
        self.server_name = server_name
        self._signing_key = signing_key
        self._backoff = backoff
        self.outbound = OutboundClient(
            reactor, outbound_settings(config, proxy), name_resolver=name_resolver, agent=agent
        )
        # Well-known lookups go through the same client: the same address
        # filter and TLS settings as every other request to a peer.
        self._resolver = resolver or ServerResolver(
            reactor, http_get_well_known=make_well_known_fetcher(reactor, self.outbound)
        )

    async def get(
        self, destination: str, path: str, *, signed: bool = True, ignore_backoff: bool = False
    ) -> OutboundResponse:
        """``GET`` ``path`` (with its query) from ``destination``; the
        response with its body still to be read."""
        return await self.request(
            b"GET", destination, path, signed=signed, ignore_backoff=ignore_backoff
        )

    async def request(
        self,
        method: bytes,
        destination: str,
        path: str,
        *,
        signed: bool = True,
        json_body: object | None = None,
        ignore_backoff: bool = False,
    ) -> OutboundResponse:
        """The response of ``destination`` (its body still to be read), or
        :class:`FederationRequestError`; :class:`NotRetryingDestination` at
        once while the server is backed off, unless ``ignore_backoff``
        (which also keeps a failure from lengthening the backoff)."""
        attempt: DestinationAttempt | None = None
        if self._backoff is not None:
            attempt = await self._backoff.attempt(destination, ignore_backoff=ignore_backoff)
            retry_at = attempt.retry_at_ms()
            if retry_at is not None and retry_at > self._backoff.now_ms():
                raise NotRetryingDestination(destination, retry_at)
        try:
            response = await self._request_any_target(method, destination, path, signed, json_body)
        except FederationRequestError as e:
            if attempt is not None:
                await attempt.failed(str(e))
            raise
        if attempt is not None:
            await attempt.answered(response.code)
        return response

    async def _request_any_target(
        self,
        method: bytes,
        destination: str,
        path: str,
        signed: bool,
        json_body: object | None,
    ) -> OutboundResponse:
        try:
            targets: list[FederationTarget] = await self._resolver.resolve(destination)
        except ValueError as e:
            raise FederationRequestError(f"{destination!r} is not a server name") from e
        headers = Headers()
        if signed:
            for value in sign_request(
                self._signing_key, self.server_name, destination, method.decode(), path, json_body
            ):
                headers.addRawHeader(b"Authorization", value.encode())
        last_error: Exception | None = None
        for target in targets:
            headers.setRawHeaders(b"Host", [target.host_header.encode()])
            try:
                return await self.outbound.request(
                    method,
                    f"https://{target.host_header}{path}",
                    headers=headers,
                    json_body=json_body,
                    connect_to=(target.host, target.port),
                    tls_name=_tls_name(target.host_header),
                )
            except OutboundRequestError as e:
                logger.info("request to %s (%s) failed: %s", destination, target.host, e)
                last_error = e
        raise FederationRequestError(f"cannot reach {destination}: {last_error}")

    async def get_url(self, url: str) -> OutboundResponse:
        """An unsigned ``GET`` of a URL a peer sent us to (a media CDN),
        following redirects; every hop's address is checked like a peer's."""
        try:
            return await self.outbound.get(url)
        except OutboundRequestError as e:
            raise FederationRequestError(f"cannot fetch {url}: {e}") from e

    async def read_error_body(self, response: OutboundResponse) -> bytes:
        """The start of an error answer's body, for its message. (Other
        bodies are read through :attr:`outbound`.)"""
        return await self.outbound.read_body_prefix(response, ERROR_BODY_BYTES)

    async def close(self) -> None:
        await self.outbound.close()

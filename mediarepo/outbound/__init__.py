"""The one HTTP client for everything we fetch from other hosts: peers,
their keys and ``.well-known`` files, URL previews. Nothing here knows
about Matrix; :mod:`mediarepo.federation` signs and locates on top of it."""

from mediarepo.outbound.addresses import IPRangeFilter, NameResolver
from mediarepo.outbound.client import (
    OutboundClient,
    OutboundResponse,
    OutboundSettings,
    TLSPolicy,
)
from mediarepo.outbound.errors import (
    BlockedAddressError,
    BodyReadError,
    BodyTooLargeError,
    OutboundRequestError,
    PeerStalledError,
)
from mediarepo.outbound.proxy import ProxySettings

__all__ = [
    "BlockedAddressError",
    "BodyReadError",
    "BodyTooLargeError",
    "IPRangeFilter",
    "NameResolver",
    "OutboundClient",
    "OutboundRequestError",
    "OutboundResponse",
    "OutboundSettings",
    "PeerStalledError",
    "ProxySettings",
    "TLSPolicy",
]

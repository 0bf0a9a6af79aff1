"""Configuration of federation: certificates, the IP ranges and servers
we may reach, key servers and old keys, backoff and rate limits."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import attrs

from mediarepo.config_reader import ConfigReader, RateLimit, positive_duration
from mediarepo.errors import ConfigError
from mediarepo.identifiers import is_valid_server_name

DEFAULT_IP_RANGE_BLACKLIST = (
    "127.0.0.0/8", "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10",
    "192.0.0.0/24", "169.254.0.0/16", "192.88.99.0/24", "198.18.0.0/15", "192.0.2.0/24",
    "198.51.100.0/24", "203.0.113.0/24", "224.0.0.0/4", "::1/128", "fe80::/10", "fc00::/7",
    "2001:db8::/32", "ff00::/8", "fec0::/10",
)  # fmt: skip


@attrs.frozen
class OldVerifyKey:
    """An entry of ``old_signing_keys``: a key we no longer sign with."""

    key: str  # unpadded base64
    expired_ts: int


@attrs.frozen
class FederationRateLimit:
    """``rc_federation``: per origin server, requests past ``sleep_limit``
    within ``window_size`` wait ``sleep_delay`` first; at most ``concurrent``
    run at once; past ``reject_limit`` in flight, 429."""

    window_size_ms: int = 1000
    sleep_limit: int = 10
    sleep_delay_ms: int = 500
    reject_limit: int = 50
    concurrent: int = 3


@attrs.frozen
class TrustedKeyServer:
    """An entry of ``trusted_key_servers``: a notary asked for other servers' keys."""

    server_name: str
    # key ID -> unpadded base64 key; when given, answers must carry its signature.
    verify_keys: Mapping[str, str]


@attrs.frozen
class FederationConfig:
    """What outbound and inbound federation need."""

    verify_certificates: bool
    custom_ca_list: tuple[str, ...]
    domain_whitelist: frozenset[str] | None
    ip_range_blacklist: tuple[str, ...]
    ip_range_whitelist: tuple[str, ...]
    trusted_key_servers: tuple[TrustedKeyServer, ...]
    key_refresh_interval_ms: int
    old_signing_keys: Mapping[str, OldVerifyKey]
    prevent_media_downloads_from: frozenset[str]
    remote_download_rate: RateLimit  # bytes: burst and per second
    inbound_rate: FederationRateLimit
    # Ours: give up on a peer's answer after this long without a byte.
    idle_timeout_ms: int = 20_000
    # Synapse's federation.destination_*: backoff from failing servers.
    destination_min_retry_interval_ms: int = 10 * 60 * 1000
    destination_retry_multiplier: float = 2.0
    destination_max_retry_interval_ms: int = 7 * 24 * 60 * 60 * 1000


def parse_federation(root: ConfigReader) -> FederationConfig:
    whitelist = root.raw("federation_domain_whitelist")
    if whitelist is not None:
        whitelist = frozenset(root.strings("federation_domain_whitelist"))
    notaries = []
    for entry in root.entries("trusted_key_servers", [{"server_name": "matrix.org"}]):
        name = entry.string("server_name")
        if name is None or not is_valid_server_name(name):
            raise ConfigError(entry.key("server_name"), f"{name!r} is not a server name")
        keys = entry.mapping("verify_keys")._data
        if not all(isinstance(v, str) for v in keys.values()):
            raise ConfigError(entry.key("verify_keys"), "expected key IDs mapped to keys")
        notaries.append(TrustedKeyServer(name, dict(keys)))
    old_keys = {}
    for name, raw in root.mapping("old_signing_keys")._data.items():
        if not isinstance(raw, Mapping):
            raise ConfigError(f"old_signing_keys.{name}", "expected a mapping")
        entry = ConfigReader(raw, f"old_signing_keys.{name}.")
        old_key = entry.string("key")
        if not old_key:
            raise ConfigError(entry.key("key"), "is required")
        old_keys[str(name)] = OldVerifyKey(old_key, entry.integer("expired_ts", 0))
    return FederationConfig(
        verify_certificates=root.boolean("federation_verify_certificates", True),
        custom_ca_list=tuple(os.path.abspath(p) for p in root.strings("federation_custom_ca_list")),
        domain_whitelist=whitelist,
        ip_range_blacklist=root.ip_ranges("ip_range_blacklist", DEFAULT_IP_RANGE_BLACKLIST),
        ip_range_whitelist=root.ip_ranges("ip_range_whitelist"),
        trusted_key_servers=tuple(notaries),
        key_refresh_interval_ms=root.duration_ms("key_refresh_interval", "1d"),
        old_signing_keys=old_keys,
        prevent_media_downloads_from=frozenset(root.strings("prevent_media_downloads_from")),
        inbound_rate=_parse_federation_rate_limit(root),
        remote_download_rate=RateLimit(
            float(root.size("remote_media_download_per_second", "87K")),
            root.size("remote_media_download_burst_count", "500M"),
        ),
        idle_timeout_ms=positive_duration(root, "federation_idle_timeout", "20s"),
        **_parse_destination_backoff(root.mapping("federation")),
    )


def _parse_destination_backoff(section: ConfigReader) -> dict[str, Any]:
    """Synapse's ``federation.destination_*`` keys, with Synapse's defaults."""
    multiplier = section.raw("destination_retry_multiplier", 2)
    if isinstance(multiplier, bool) or not isinstance(multiplier, int | float) or multiplier < 1:
        raise ConfigError(
            section.key("destination_retry_multiplier"),
            f"expected a number of at least 1, got {multiplier!r}",
        )
    minimum = positive_duration(section, "destination_min_retry_interval", "10m")
    maximum = positive_duration(section, "destination_max_retry_interval", "7d")
    if maximum < minimum:
        raise ConfigError(
            section.key("destination_max_retry_interval"),
            "must not be shorter than destination_min_retry_interval",
        )
    return {
        "destination_min_retry_interval_ms": minimum,
        "destination_retry_multiplier": float(multiplier),
        "destination_max_retry_interval_ms": maximum,
    }


def _parse_federation_rate_limit(root: ConfigReader) -> FederationRateLimit:
    section = root.mapping("rc_federation")
    default = FederationRateLimit()
    return FederationRateLimit(
        window_size_ms=section.integer("window_size", default.window_size_ms, minimum=1),
        sleep_limit=section.integer("sleep_limit", default.sleep_limit, minimum=1),
        sleep_delay_ms=section.integer("sleep_delay", default.sleep_delay_ms),
        reject_limit=section.integer("reject_limit", default.reject_limit, minimum=1),
        concurrent=section.integer("concurrent", default.concurrent, minimum=1),
    )

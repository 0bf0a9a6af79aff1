"""Configuration of URL previews, with Synapse's keys and defaults:
``url_preview_enabled``, ``url_preview_ip_range_blacklist`` (required when
previews are on, unless a proxy is), ``url_preview_ip_range_whitelist``,
``url_preview_url_blacklist``, ``max_spider_size``,
``url_preview_accept_language``, the ``oembed`` section, and the forward
proxy (``http_proxy``, ``https_proxy``, ``no_proxy_hosts``, else the
environment's ``http_proxy``, ``https_proxy`` and ``no_proxy``)."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping
from importlib import resources
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

import attrs

from mediarepo.errors import ConfigError
from mediarepo.outbound.proxy import ProxySettings

if TYPE_CHECKING:
    from mediarepo.config_reader import ConfigReader

logger = logging.getLogger(__name__)

# The parts of a URL (``urllib.parse.urlsplit``'s attributes) that a
# ``url_preview_url_blacklist`` entry may match.
URL_PARTS = frozenset(
    {"scheme", "netloc", "path", "query", "fragment", "username", "password", "hostname", "port"}
)

# The oEmbed providers Synapse ships (the public oembed.com list, cut down).
DEFAULT_PROVIDERS_RESOURCE = ("mediarepo.res", "oembed_providers.json")


@attrs.frozen
class UrlPattern:
    """An entry of ``url_preview_url_blacklist``: a URL is refused when every
    named part matches its pattern (``^...``: a regular expression matched at
    the start; otherwise a shell glob)."""

    parts: tuple[tuple[str, str], ...]


@attrs.frozen
class OEmbedEndpoint:
    """An oEmbed API endpoint and the page URLs it describes."""

    api_endpoint: str
    url_patterns: tuple[re.Pattern[str], ...]
    # The formats the endpoint declares; None: not said (JSON assumed).
    formats: tuple[str, ...] | None


@attrs.frozen
class UrlPreviewConfig:
    enabled: bool = False
    # Where previews never fetch from (0.0.0.0 and :: are always added by
    # the address filter), and exceptions to it.
    ip_range_blacklist: tuple[str, ...] = ()
    ip_range_whitelist: tuple[str, ...] = ()
    url_blacklist: tuple[UrlPattern, ...] = ()
    max_spider_size: int = 10 * 1024 * 1024
    accept_language: tuple[str, ...] = ("en",)
    oembed_endpoints: tuple[OEmbedEndpoint, ...] = ()
    # The forward proxy previews go through, if any.
    proxy: ProxySettings | None = None


def _url_pattern(entry: ConfigReader, raw: Mapping[str, Any]) -> UrlPattern:
    parts = []
    for name, pattern in raw.items():
        if name not in URL_PARTS:
            raise ConfigError(
                entry.key(str(name)), f"not a part of a URL; expected one of {sorted(URL_PARTS)}"
            )
        if not isinstance(pattern, str):
            raise ConfigError(entry.key(name), f"expected a pattern string, got {pattern!r}")
        if pattern.startswith("^"):
            try:
                re.compile(pattern)
            except re.error as e:
                raise ConfigError(entry.key(name), f"bad regular expression: {e}") from e
        parts.append((name, pattern))
    return UrlPattern(tuple(parts))


def _glob_to_regex(glob: str, where: str) -> re.Pattern[str]:
    """A provider's URL scheme (``https://*.example.com/video/*``) as a
    regular expression: a ``*`` in the host stands for one host label's
    characters, elsewhere for anything non-empty."""
    url = urlsplit(glob)
    if url.scheme not in ("http", "https"):
        raise ConfigError(where, f"unsupported oEmbed scheme ({url.scheme}) for pattern {glob}")
    host = re.escape(url.netloc).replace(r"\*", "[a-zA-Z0-9_-]+")
    rest = [re.escape(part).replace(r"\*", ".+") for part in (url.path, url.query, url.fragment)]
    return re.compile(urlunsplit((url.scheme, host, *rest)))


def _string_field(value: object, where: str) -> str:
    if not isinstance(value, str):
        raise ConfigError(where, f"expected a string, got {value!r}")
    return value


def parse_providers(providers: object, where: str) -> list[OEmbedEndpoint]:
    """The endpoints of a providers file (oembed.com's ``providers.json`` format)."""
    if not isinstance(providers, list):
        raise ConfigError(where, "expected a list of oEmbed providers")
    endpoints = []
    for index, provider in enumerate(providers):
        endpoints += _parse_provider(provider, f"{where}[{index}]")
    return endpoints


def _parse_provider(provider: object, place: str) -> list[OEmbedEndpoint]:
    if not isinstance(provider, Mapping):
        raise ConfigError(place, "expected a mapping")
    for field in ("provider_name", "provider_url"):
        _string_field(provider.get(field), f"{place}.{field}")
    entries = provider.get("endpoints")
    if not isinstance(entries, list):
        raise ConfigError(f"{place}.endpoints", "expected a list")
    return [
        _parse_endpoint(endpoint, f"{place}.endpoints[{number}]")
        for number, endpoint in enumerate(entries)
    ]


def _parse_endpoint(endpoint: object, spot: str) -> OEmbedEndpoint:
    if not isinstance(endpoint, Mapping):
        raise ConfigError(spot, "expected a mapping")
    api = _string_field(endpoint.get("url"), f"{spot}.url")
    if urlsplit(api).scheme not in ("http", "https"):
        raise ConfigError(f"{spot}.url", f"unsupported oEmbed scheme for endpoint {api}")
    schemes = endpoint.get("schemes")
    if not isinstance(schemes, list):
        raise ConfigError(f"{spot}.schemes", "expected a list of URL patterns")
    formats = endpoint.get("formats")
    if formats is not None and not (
        isinstance(formats, list) and all(isinstance(f, str) for f in formats)
    ):
        raise ConfigError(f"{spot}.formats", "expected a list of strings")
    return OEmbedEndpoint(
        api,
        tuple(
            _glob_to_regex(_string_field(glob, f"{spot}.schemes"), f"{spot}.schemes")
            for glob in schemes
        ),
        None if formats is None else tuple(formats),
    )


def _parse_oembed(root: ConfigReader) -> tuple[OEmbedEndpoint, ...]:
    section = root.mapping("oembed")
    endpoints: list[OEmbedEndpoint] = []
    if not section.boolean("disable_default_providers", False):
        package, name = DEFAULT_PROVIDERS_RESOURCE
        text = resources.files(package).joinpath(name).read_text(encoding="utf-8")
        endpoints += parse_providers(json.loads(text), "oembed (default providers)")
    for index, path in enumerate(section.strings("additional_providers")):
        where = f"{section.key('additional_providers')}[{index}]"
        try:
            with open(path, encoding="utf-8") as f:
                providers = json.load(f)
        except OSError as e:
            raise ConfigError(where, f"cannot read {path}: {e.strerror}") from e
        except ValueError as e:
            raise ConfigError(where, f"{path} is not JSON: {e}") from e
        endpoints += parse_providers(providers, f"{where} ({path})")
    return tuple(endpoints)


def parse_url_preview(root: ConfigReader, proxy: ProxySettings | None) -> UrlPreviewConfig:
    """The URL preview keys; ``proxy`` is the server's forward proxy (``Config.proxy``)."""
    max_spider_size = root.size("max_spider_size", "10M")
    if not root.boolean("url_preview_enabled", False):
        return UrlPreviewConfig(max_spider_size=max_spider_size)
    if root.raw("url_preview_ip_range_blacklist") is None:
        if proxy is None:
            raise ConfigError(
                "url_preview_ip_range_blacklist",
                "is required when url_preview_enabled is true: for security, list the IP"
                " ranges previews must never fetch from",
            )
    elif proxy is not None:
        logger.warning(
            "url_preview_ip_range_blacklist does not apply to URL previews fetched through"
            " the proxy (http_proxy/https_proxy); the proxy must refuse internal addresses"
        )
    accept_language = root.strings("url_preview_accept_language") or ("en",)
    return UrlPreviewConfig(
        enabled=True,
        ip_range_blacklist=root.ip_ranges("url_preview_ip_range_blacklist"),
        ip_range_whitelist=root.ip_ranges("url_preview_ip_range_whitelist"),
        url_blacklist=tuple(
            _url_pattern(entry, entry.as_mapping())
            for entry in root.entries("url_preview_url_blacklist")
        ),
        max_spider_size=max_spider_size,
        accept_language=accept_language,
        oembed_endpoints=_parse_oembed(root),
        proxy=proxy,
    )

"""The URL preview keys of homeserver.yaml."""

from __future__ import annotations

import json
import os
from typing import Any

from twisted.trial import unittest

from mediarepo.config import parse_config
from mediarepo.config_preview import UrlPattern
from mediarepo.errors import ConfigError
from mediarepo.media.preview_fetch import matches_url_pattern


def parse(environ: dict[str, str] | None = None, **keys: Any) -> Any:
    data = {"server_name": "example.org", **keys}
    return parse_config(data, "/tmp", environ=environ or {}).url_preview


class UrlPreviewConfigTests(unittest.TestCase):
    def test_off_by_default(self) -> None:
        previews = parse()
        self.assertFalse(previews.enabled)
        self.assertEqual(previews.max_spider_size, 10 * 1024 * 1024)

    def test_blacklist_required_when_enabled(self) -> None:
        with self.assertRaises(ConfigError) as raised:
            parse(url_preview_enabled=True)
        self.assertEqual(raised.exception.key, "url_preview_ip_range_blacklist")
        # Unless a proxy picks the addresses, as in Synapse.
        previews = parse({"https_proxy": "http://proxy.example:3128"}, url_preview_enabled=True)
        assert previews.proxy is not None
        self.assertEqual(previews.proxy.https_proxy, "http://proxy.example:3128")
        previews = parse(url_preview_enabled=True, http_proxy="proxy.example:8080")
        self.assertEqual(previews.proxy.http_proxy, "proxy.example:8080")

    def test_enabled(self) -> None:
        previews = parse(
            url_preview_enabled=True,
            url_preview_ip_range_blacklist=["10.0.0.0/8"],
            url_preview_ip_range_whitelist=["10.1.2.3"],
            url_preview_accept_language=["de", "en;q=0.5"],
            max_spider_size="1M",
            url_preview_url_blacklist=[{"netloc": "*.example.com", "scheme": "http"}],
        )
        self.assertEqual(previews.ip_range_blacklist, ("10.0.0.0/8",))
        self.assertEqual(previews.ip_range_whitelist, ("10.1.2.3",))
        self.assertEqual(previews.accept_language, ("de", "en;q=0.5"))
        self.assertEqual(previews.max_spider_size, 1024 * 1024)
        self.assertEqual(
            previews.url_blacklist, (UrlPattern((("netloc", "*.example.com"), ("scheme", "http"))),)
        )
        # The providers Synapse ships.
        self.assertEqual(len(previews.oembed_endpoints), 2)
        self.assertIsNone(previews.proxy)

    def test_bad_values(self) -> None:
        base: dict[str, Any] = {
            "url_preview_enabled": True,
            "url_preview_ip_range_blacklist": ["10.0.0.0/8"],
        }
        for key, value in (
            ("url_preview_ip_range_blacklist", ["not-a-range"]),
            ("url_preview_ip_range_whitelist", "10.0.0.1"),
            ("url_preview_url_blacklist", [{"hostnme": "x"}]),
            ("url_preview_url_blacklist", [{"path": "^(unclosed"}]),
            ("url_preview_url_blacklist", [{"port": 80}]),
            ("oembed", {"additional_providers": ["/nonexistent/providers.json"]}),
            ("https_proxy", "ftp://proxy"),
        ):
            with self.assertRaises(ConfigError, msg=f"{key}: {value!r}"):
                parse(**{**base, key: value})

    def test_additional_providers(self) -> None:
        directory = self.mktemp()
        os.makedirs(directory)
        path = os.path.join(directory, "providers.json")
        with open(path, "w") as f:
            json.dump(
                [{"provider_name": "P", "provider_url": "https://p.example", "endpoints": [
                    {"schemes": ["https://p.example/*"], "url": "https://p.example/oembed"}]}],
                f,
            )  # fmt: skip
        previews = parse(
            url_preview_enabled=True,
            url_preview_ip_range_blacklist=[],
            oembed={"disable_default_providers": True, "additional_providers": [path]},
        )
        self.assertEqual(
            [e.api_endpoint for e in previews.oembed_endpoints], ["https://p.example/oembed"]
        )
        endpoint = {"schemes": ["ftp://p.example/*"], "url": "https://p.example/oembed"}
        with open(path, "w") as f:
            json.dump([{"provider_name": "P", "provider_url": "u", "endpoints": [endpoint]}], f)
        with self.assertRaises(ConfigError):
            parse(url_preview_enabled=True, url_preview_ip_range_blacklist=[],
                  oembed={"additional_providers": [path]})  # fmt: skip


class UrlBlacklistTests(unittest.TestCase):
    def test_patterns(self) -> None:
        patterns = (
            UrlPattern((("username", "*"),)),
            UrlPattern((("netloc", "*.google.com"),)),
            UrlPattern((("netloc", "www.acme.com"), ("path", "/foo"))),
            UrlPattern((("netloc", r"^[0-9]+\.[0-9]+\.[0-9]+\.[0-9]+$"),)),
            UrlPattern((("port", "8448"),)),
        )
        for url, blocked in (
            ("https://user@example.com/", True),
            ("https://example.com/", False),
            ("https://maps.google.com/x", True),
            ("https://www.acme.com/foo", True),
            ("https://www.acme.com/bar", False),
            ("http://192.168.1.1/", True),
            ("https://example.com:8448/", True),
            ("https://example.com:notaport/", False),
        ):
            self.assertEqual(matches_url_pattern(url, patterns), blocked, url)

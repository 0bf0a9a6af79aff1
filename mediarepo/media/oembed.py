"""oEmbed: which page URLs are previewed through a provider's API, the
autodiscovery link of a page, and a provider's answer as Open Graph data
(Synapse's mapping). Pure functions; the previewer fetches."""

from __future__ import annotations

import html
import json
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode

import attrs

from mediarepo.config_preview import OEmbedEndpoint
from mediarepo.media.preview_html import describe

if TYPE_CHECKING:
    from mediarepo.media.preview_html import Element

logger = logging.getLogger(__name__)

OEMBED_LINK_TYPE = "application/json+oembed"


@attrs.frozen
class OEmbedResult:
    open_graph: dict[str, Any]
    author_name: str | None
    # How long the answer may be cached (ms), if the provider said.
    cache_age_ms: int | None


_NOTHING = OEmbedResult({}, None, None)


class OEmbedProviders:
    def __init__(self, endpoints: Sequence[OEmbedEndpoint]) -> None:
        self._patterns = []
        for endpoint in endpoints:
            # Only JSON is read: endpoints that cannot answer in it are left out.
            json_capable = endpoint.formats is None or "json" in endpoint.formats
            if not json_capable or endpoint.api_endpoint.endswith(".xml"):
                logger.info("ignoring oEmbed endpoint %s: no JSON", endpoint.api_endpoint)
                continue
            self._patterns += [(p, endpoint.api_endpoint) for p in endpoint.url_patterns]

    def api_url(self, url: str) -> str | None:
        """Where to ask for ``url``'s preview instead, if a provider covers it."""
        for pattern, api_endpoint in self._patterns:
            if pattern.fullmatch(url):
                query = urlencode({"url": url, "format": "json"})
                return f"{api_endpoint.replace('{format}', 'json')}?{query}"
        return None


def discovered_api_url(tree: Element) -> str | None:
    """A page's oEmbed autodiscovery link (``rel="alternate"``, or the
    ``"alternative"`` Flickr uses), JSON only."""
    for rel in ("alternate", "alternative"):
        for link in tree.iter("link"):
            if link.get("rel") == rel and link.get("type") == OEMBED_LINK_TYPE:
                href = link.get("href")
                if href is not None:
                    return href
    return None


def _cache_age_ms(value: object) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        return None
    try:
        seconds = int(value)
    except (ValueError, OverflowError):
        return None
    return seconds * 1000


def _first_source(tree: Element, tag: str) -> str | None:
    for element in tree.iter(tag):
        source = element.get("src")
        if element.getparent() is not None and source is not None:
            return source
    return None


def _describe_embedded_html(og: dict[str, Any], markup: str) -> None:
    """Picture, video and description from a provider's embed HTML."""
    if not markup:
        return
    # Imported here, as in preview_html.
    from lxml import etree

    parser = etree.HTMLParser(recover=True, encoding="utf-8", no_network=True)
    try:
        tree = etree.fromstring(markup.encode("utf-8", "surrogatepass"), parser)
    except (etree.LxmlError, ValueError, UnicodeError):
        return
    if tree is None:
        return
    if "og:image" not in og:
        image = _first_source(tree, "img")
        if image is not None:
            og["og:image"] = image
    video = _first_source(tree, "video") or _first_source(tree, "embed")
    if video is not None:
        og["og:video"] = video
    description = describe(tree)
    if description:
        og["og:description"] = description


def parse_oembed(url: str, body: bytes) -> OEmbedResult:
    """A provider's JSON answer about ``url`` (the page previewed, not the
    API's URL) as Open Graph data; nothing for an answer that is not oEmbed 1.0."""
    try:
        answer = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return _NOTHING
    if not isinstance(answer, dict):
        return _NOTHING
    version = answer.get("version", "1.0")
    if version != "1.0" and (version != 1 or isinstance(version, bool)):
        return _NOTHING
    og: dict[str, Any] = {"og:url": url}
    title = answer.get("title")
    if title and isinstance(title, str):
        og["og:title"] = html.unescape(title)
    author = answer.get("author_name")
    provider = answer.get("provider_name")
    if provider and isinstance(provider, str):
        og["og:site_name"] = provider
    thumbnail = answer.get("thumbnail_url")
    if thumbnail and isinstance(thumbnail, str):
        og["og:image"] = thumbnail
    kind = answer.get("type")
    markup = answer.get("html")
    if kind == "rich":
        if isinstance(markup, str):
            _describe_embedded_html(og, markup)
    elif kind == "photo":
        photo = answer.get("url")
        if photo and isinstance(photo, str):
            og["og:image"] = photo
    elif kind == "video":
        og["og:type"] = "video.other"
        if markup and isinstance(markup, str):
            _describe_embedded_html(og, markup)
        for side in ("width", "height"):
            size = answer.get(side)
            if type(size) is int:
                og[f"og:video:{side}"] = size
    elif kind == "link":
        og["og:type"] = "website"
    else:
        logger.info("unknown oEmbed type %r for %s", kind, url)
    return OEmbedResult(
        og, author if isinstance(author, str) else None, _cache_age_ms(answer.get("cache_age"))
    )

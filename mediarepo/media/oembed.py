"""oEmbed: which page URLs are previewed through a provider's API, the
autodiscovery link of a page, and a provider's answer as Open Graph data
(Synapse's mapping). Pure functions; the previewer fetches."""

from __future__ import annotations

import html
import json
import logging
from collections.abc import Callable, Sequence
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
    answer = _oembed_answer(body)
    if answer is None:
        return _NOTHING
    og: dict[str, Any] = {"og:url": url}
    for field, key, convert in _STRING_FIELDS:
        value = answer.get(field)
        if value and isinstance(value, str):
            og[key] = convert(value)
    kind = answer.get("type")
    add_by_type = _BY_TYPE.get(kind) if isinstance(kind, str) else None
    if add_by_type is not None:
        add_by_type(og, answer)
    else:
        logger.info("unknown oEmbed type %r for %s", kind, url)
    author = answer.get("author_name")
    return OEmbedResult(
        og, author if isinstance(author, str) else None, _cache_age_ms(answer.get("cache_age"))
    )


def _oembed_answer(body: bytes) -> dict[str, Any] | None:
    """The JSON object of an oEmbed 1.0 answer, or ``None``."""
    try:
        answer = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None
    if not isinstance(answer, dict):
        return None
    version = answer.get("version", "1.0")
    if version != "1.0" and (version != 1 or isinstance(version, bool)):
        return None
    return answer


# Fields of any answer: the Open Graph key each gives, and how its text is read.
_STRING_FIELDS: tuple[tuple[str, str, Callable[[str], str]], ...] = (
    ("title", "og:title", html.unescape),
    ("provider_name", "og:site_name", str),
    ("thumbnail_url", "og:image", str),
)


def _add_rich(og: dict[str, Any], answer: dict[str, Any]) -> None:
    markup = answer.get("html")
    if isinstance(markup, str):
        _describe_embedded_html(og, markup)


def _add_photo(og: dict[str, Any], answer: dict[str, Any]) -> None:
    photo = answer.get("url")
    if photo and isinstance(photo, str):
        og["og:image"] = photo


def _add_video(og: dict[str, Any], answer: dict[str, Any]) -> None:
    og["og:type"] = "video.other"
    _add_rich(og, answer)
    for side in ("width", "height"):
        size = answer.get(side)
        if type(size) is int:
            og[f"og:video:{side}"] = size


def _add_link(og: dict[str, Any], answer: dict[str, Any]) -> None:
    og["og:type"] = "website"


# What each oEmbed type adds to the Open Graph data.
_BY_TYPE: dict[str, Callable[[dict[str, Any], dict[str, Any]], None]] = {
    "rich": _add_rich,
    "photo": _add_photo,
    "video": _add_video,
    "link": _add_link,
}

"""URL previews: the Open Graph data of a page, as Synapse's previewer makes it.

A preview is looked for, in order, in memory (an hour, keyed by URL alone,
failures included, as Synapse keeps them), then in Synapse's
``local_media_repository_url_cache`` table (so previews Synapse made are
served here and the other way round); otherwise it is made: concurrent
requests for one URL share one fetch. Pages, oEmbed answers and images are
stored as URL-cache media (see :mod:`mediarepo.media.preview_fetch`);
images get thumbnails and their ``mxc://`` URI in ``og:image``.
"""

from __future__ import annotations

import json
import logging
from typing import Any, cast
from urllib.parse import urljoin, urlsplit

import attrs
from prometheus_client import Counter, Histogram
from twisted.internet.interfaces import IReactorFromThreads, IReactorTime
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool

from mediarepo.errors import Codes, MatrixError
from mediarepo.media.cache import ExpiringCache
from mediarepo.media.events import MediaEvent, emit
from mediarepo.media.oembed import OEmbedProviders, OEmbedResult, discovered_api_url, parse_oembed
from mediarepo.media.preview_fetch import (
    DEFAULT_EXPIRY_MS,
    Downloaded,
    PreviewDownloader,
    is_html,
    is_image,
    is_json,
)
from mediarepo.media.preview_html import parse_html, parse_open_graph
from mediarepo.media.thumbnail_sources import LocalThumbnailSource
from mediarepo.media.thumbnails import ThumbnailMaker
from mediarepo.sharing import SharedWork
from mediarepo.storage.media_rows import MediaRows
from mediarepo.storage.url_cache import CachedPreview, UrlCacheStore
from mediarepo.values import Requester

logger = logging.getLogger(__name__)

# How long a preview (or its failure) is answered from memory.
MEMORY_CACHE_SECONDS = 3600.0
MEMORY_CACHE_ENTRIES = 10_000
# The longest a preview is valid, whatever oEmbed says.
MAX_EXPIRY_MS = 24 * 60 * 60 * 1000
# Keys and values past these lengths are dropped from a preview.
MAX_KEY_LENGTH = 50
MAX_VALUE_LENGTH = 1000

# outcome: "memory" or "database" (answered from a cache), "fetched" (made
# now), or the status class of the error answered ("4xx", "5xx").
previews_total = Counter(
    "mediarepo_url_previews_total", "URL preview requests by outcome", ["outcome"]
)
for _outcome in ("memory", "database", "fetched", "4xx", "5xx"):
    previews_total.labels(_outcome)
preview_seconds = Histogram(
    "mediarepo_url_preview_seconds",
    "Time to make a URL preview that was not cached (fetches, parsing, thumbnails)",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
)


@attrs.frozen
class _Outcome:
    """A preview made (its JSON) or the error it failed with."""

    og: bytes | None
    error: MatrixError | None

    def result(self) -> bytes:
        if self.error is not None:
            raise self.error
        assert self.og is not None
        return self.og


def encode_open_graph(og: dict[str, Any]) -> str:
    """Compact JSON, without overlong keys or values."""
    kept = {
        key: value
        for key, value in og.items()
        if len(key) <= MAX_KEY_LENGTH and len(str(value)) <= MAX_VALUE_LENGTH
    }
    return json.dumps(kept, separators=(",", ":"), allow_nan=False)


def check_preview_url(url: str) -> None:
    """400 unless ``url`` is an absolute http(s) URL."""
    try:
        split = urlsplit(url)
        split.port  # noqa: B018 (raises for a port that is not a number)
    except ValueError as e:
        raise MatrixError(400, Codes.INVALID_PARAM, f"Invalid URL: {e}") from e
    if split.scheme.lower() not in ("http", "https") or not split.hostname:
        raise MatrixError(400, Codes.INVALID_PARAM, "The URL must be an absolute http(s) URL")


class UrlPreviewer:
    def __init__(
        self,
        server_name: str,
        downloader: PreviewDownloader,
        oembed: OEmbedProviders,
        url_cache: UrlCacheStore,
        media_store: MediaRows,
        thumbnails: ThumbnailMaker,
        parse_pool: ThreadPool,
        reactor: IReactorFromThreads,
    ) -> None:
        self._server_name = server_name
        self._downloader = downloader
        self._oembed = oembed
        self._url_cache = url_cache
        self._media_store = media_store
        self._thumbnails = thumbnails
        # Pages are parsed off the reactor thread.
        self._parse_pool = parse_pool
        self._reactor = reactor
        # The reactor is a clock too (the two interfaces are two views of it).
        clock = cast(IReactorTime, reactor)
        self._clock = clock
        self._recent: ExpiringCache[str, _Outcome] = ExpiringCache(
            clock, MEMORY_CACHE_SECONDS, max_entries=MEMORY_CACHE_ENTRIES
        )
        self._making: SharedWork[str, _Outcome] = SharedWork()

    def _now_ms(self) -> int:
        return int(self._clock.seconds() * 1000)

    async def preview(self, url: str, requester: Requester, ts: int | None = None) -> bytes:
        """The preview of ``url`` (as of ``ts``, ms) as JSON bytes."""
        check_preview_url(url)
        recent = self._recent.get(url)
        if recent is not None:
            previews_total.labels("memory").inc()
            return recent.result()
        when = self._now_ms() if ts is None else ts
        outcome = await self._making.run(url, lambda: self._make(url, requester, when))
        return outcome.result()

    async def _make(self, url: str, requester: Requester, ts: int) -> _Outcome:
        try:
            og = await self._cached_or_new(url, requester, ts)
            outcome = _Outcome(og, None)
        except MatrixError as e:
            previews_total.labels(f"{e.code // 100}xx").inc()
            outcome = _Outcome(None, e)
        except Exception as e:
            logger.exception("URL preview of %s failed", url)
            previews_total.labels("5xx").inc()
            outcome = _Outcome(None, MatrixError(500, Codes.UNKNOWN, f"Failed to preview: {e}"))
        self._recent.put(url, outcome)
        return outcome

    async def _cached_or_new(self, url: str, requester: Requester, ts: int) -> bytes:
        cached = await self._url_cache.get_preview(url, ts)
        if cached is not None and cached.expires_ts > ts and cached.response_code // 100 == 2:
            previews_total.labels("database").inc()
            return cached.og.encode("utf-8")
        with preview_seconds.time():
            og = await self._make_new(url, requester.user_id)
        previews_total.labels("fetched").inc()
        return og

    async def _make_new(self, url: str, user_id: str) -> bytes:
        api_url = self._oembed.api_url(url)
        page = await self._downloader.download(api_url or url, user_id)
        expiry_ms = DEFAULT_EXPIRY_MS
        author: str | None = None
        og: dict[str, Any]
        if is_image(page.media_type):
            og = {
                "og:description": page.media.upload_name,
                **await self._image_fields(page),
            }
        elif is_html(page.media_type):
            og, author, expiry_ms = await self._from_html(url, page, user_id, expiry_ms)
        elif api_url is not None:
            og, author, expiry_ms = self._from_oembed(url, page, expiry_ms)
            await self._precache_image(og, page, user_id)
        else:
            og = {}
        if not og.get("og:title") and author:
            og["og:title"] = author
        encoded = encode_open_graph(og)
        await self._url_cache.store_preview(
            CachedPreview(
                url=url,
                response_code=page.response_code,
                etag=page.etag,
                expires_ts=page.media.created_ts + min(expiry_ms, MAX_EXPIRY_MS),
                og=encoded,
                media_id=page.media_id,
                download_ts=page.media.created_ts,
            )
        )
        emit(
            MediaEvent.URL_PREVIEWED,
            media_id=page.media_id,
            host=urlsplit(url).hostname,
            media_type=page.media_type,
            user_id=user_id,
            oembed=api_url is not None,
        )
        return encoded.encode("utf-8")

    async def _from_html(
        self, url: str, page: Downloaded, user_id: str, expiry_ms: int
    ) -> tuple[dict[str, Any], str | None, int]:
        parsed = await deferToThreadPool(
            self._reactor, self._parse_pool, _parse_page, page.body, page.media_type
        )
        if parsed is None:
            return {}, None, expiry_ms
        og_from_page, discovered = parsed
        og: dict[str, Any] = {}
        author = None
        if discovered is not None:
            # Resolved against the page (Synapse fetches the link as written,
            # so a relative one fails there).
            if urlsplit(discovered).scheme.lower() != "data":
                discovered = urljoin(page.final_url, discovered)
            try:
                answer = await self._downloader.download(discovered, user_id, allow_data=True)
            except Exception as e:
                logger.info("oEmbed discovery for %s failed: %s", url, e)
            else:
                og, author, expiry_ms = self._from_oembed(url, answer, expiry_ms)
        # What the page itself says wins over oEmbed.
        og = og | og_from_page
        await self._precache_image(og, page, user_id)
        return og, author, expiry_ms

    def _from_oembed(
        self, url: str, answer: Downloaded, expiry_ms: int
    ) -> tuple[dict[str, Any], str | None, int]:
        if not is_json(answer.media_type):
            return {}, None, expiry_ms
        result: OEmbedResult = parse_oembed(url, answer.body)
        if result.open_graph and result.cache_age_ms is not None:
            expiry_ms = result.cache_age_ms
        return result.open_graph, result.author_name, expiry_ms

    async def _precache_image(self, og: dict[str, Any], page: Downloaded, user_id: str) -> None:
        """Replace ``og:image`` by the image itself, stored here; a failure
        only drops it."""
        image_url = og.pop("og:image", None)
        if not image_url or not isinstance(image_url, str):
            return
        if urlsplit(image_url).scheme.lower() != "data":
            image_url = urljoin(page.final_url, image_url)
        if urlsplit(image_url).scheme.lower() not in ("http", "https", "data"):
            return
        try:
            image = await self._downloader.download(image_url, user_id, allow_data=True)
        except Exception as e:
            logger.info("image of a URL preview (%s) not fetched: %s", image_url, e)
            return
        if is_image(image.media_type):
            og.update(await self._image_fields(image))

    async def _image_fields(self, image: Downloaded) -> dict[str, Any]:
        """``og:image`` and what is known of it; thumbnails made on the way
        (not of bytes quarantined elsewhere, which are never served)."""
        size = None
        try:
            if image.media.quarantined_by is None:
                size = await self._thumbnails.thumbnail_now(
                    LocalThumbnailSource(
                        image.media, self._media_store, self._thumbnails.local_rows
                    )
                )
        except Exception as e:
            # The image is stored: a preview without its size beats none.
            logger.warning("thumbnailing the image %s of a URL preview failed: %s",
                           image.media_id, e)  # fmt: skip
        fields: dict[str, Any] = {
            "og:image": f"mxc://{self._server_name}/{image.media_id}",
            "og:image:type": image.media_type,
            "matrix:image:size": image.media.media_length,
        }
        if size is not None:
            fields["og:image:width"] = size.width
            fields["og:image:height"] = size.height
        return fields


def _parse_page(body: bytes, media_type: str) -> tuple[dict[str, Any], str | None] | None:
    """A page's Open Graph data and oEmbed link (on a pool thread)."""
    tree = parse_html(body, media_type)
    if tree is None:
        return None
    return dict(parse_open_graph(tree)), discovered_api_url(tree)

"""Open Graph from HTML pages, charsets and oEmbed answers (no network)."""

from __future__ import annotations

from twisted.trial import unittest

from mediarepo.config_preview import parse_providers
from mediarepo.media.oembed import OEmbedProviders, discovered_api_url, parse_oembed
from mediarepo.media.preview_html import (
    candidate_encodings,
    parse_html,
    parse_open_graph,
    summarize,
)


def og_of(page: bytes, content_type: str | None = "text/html") -> dict[str, str | None]:
    tree = parse_html(page, content_type)
    assert tree is not None
    return parse_open_graph(tree)


class OpenGraphTests(unittest.TestCase):
    def test_open_graph_tags_win(self) -> None:
        og = og_of(
            b"<html><head><title>Page title</title>"
            b'<meta property="og:title" content="OG title">'
            b'<meta property="og:description" content="About it">'
            b'<meta property="og:image" content="/pic.png">'
            b'<meta property="article:author" content="Ann">'
            b'<meta name="twitter:site" content="@site">'
            b'<meta name="twitter:card" content="summary">'
            b'<meta name="twitter:title" content="Twitter title">'
            b"</head><body><p>text</p></body></html>"
        )
        self.assertEqual(
            og,
            {
                "og:title": "OG title",
                "og:description": "About it",
                "og:image": "/pic.png",
                "article:author": "Ann",
                "og:site_name": "@site",
            },
        )

    def test_fallbacks_without_open_graph(self) -> None:
        og = og_of(
            b"<html><head><title> The title </title>"
            b'<meta name="Description" content="Meta description">'
            b'<link rel="icon" href="/favicon.ico"></head>'
            b'<body><img src="/small.png" width="5" height="5">'
            b'<img src="/large.png" width="300" height="200">'
            b'<img src="/medium.png" width="100" height="100"></body></html>'
        )
        self.assertEqual(og["og:title"], "The title")
        self.assertEqual(og["og:description"], "Meta description")
        self.assertEqual(og["og:image"], "/large.png")

    def test_first_image_then_icon(self) -> None:
        og = og_of(b'<html><body><h1>Head</h1><img src="a.png"><img src="b.png"></body></html>')
        self.assertEqual((og["og:title"], og["og:image"]), ("Head", "a.png"))
        og = og_of(
            b'<html><head><link rel="shortcut icon" href="i.ico"></head><body>x</body></html>'
        )
        self.assertEqual(og["og:image"], "i.ico")
        self.assertIsNone(og["og:title"])

    def test_description_from_body_text(self) -> None:
        og = og_of(
            b"<html><body><nav>Menu</nav><header>Header</header><script>var x;</script>"
            b'<div role="menu">Items</div><p>First   paragraph.</p><!-- hidden -->'
            b"<p>Second\nparagraph.</p><footer>Foot</footer></body></html>"
        )
        self.assertEqual(og["og:description"], "First paragraph.\n\nSecond paragraph.")

    def test_long_description_cut_on_a_word(self) -> None:
        summary = summarize(["word " * 200])
        assert summary is not None
        self.assertTrue(summary.endswith("…"))
        self.assertLessEqual(len(summary), 501)
        self.assertNotIn("wor…", summary)

    def test_too_many_tags_ignored(self) -> None:
        tags = b"".join(b'<meta property="og:k%d" content="v">' % i for i in range(60))
        og = og_of(b"<html><head>" + tags + b"<title>T</title></head><body>b</body></html>")
        self.assertNotIn("og:k1", og)
        self.assertEqual(og["og:title"], "T")

    def test_empty_pages(self) -> None:
        self.assertIsNone(parse_html(b"", "text/html"))
        self.assertIsNone(parse_html(b"<html><body></body></html>", "text/html"))

    def test_hostile_markup_is_parsed(self) -> None:
        page = b"<html><body>" + b"<div>" * 5000 + b"deep" + b"\x00\xff<<>>" * 100
        og = og_of(page)
        self.assertIn("og:description", og)


class CharsetTests(unittest.TestCase):
    def test_order_of_candidates(self) -> None:
        page = b'<?xml version="1.0" encoding="ISO-8859-2"?><meta charset="koi8-r">'
        self.assertEqual(
            list(candidate_encodings(page, "text/html; charset=Shift_JIS")),
            ["koi8-r", "iso8859-2", "shift_jis", "utf-8", "cp1252"],
        )

    def test_meta_charset(self) -> None:
        page = '<html><head><meta charset="windows-1251"><title>Привет</title></head></html>'
        self.assertEqual(og_of(page.encode("cp1251"))["og:title"], "Привет")

    def test_header_charset(self) -> None:
        page = "<html><head><title>日本語</title></head></html>".encode("shift_jis")
        self.assertEqual(og_of(page, 'text/html; charset="Shift_JIS"')["og:title"], "日本語")

    def test_cp1252_fallback(self) -> None:
        page = "<html><head><title>Café “quoted”</title></head></html>".encode("cp1252")
        self.assertEqual(og_of(page, "text/html")["og:title"], "Café “quoted”")

    def test_byte_order_mark(self) -> None:
        page = "<html><head><title>Ünïcode</title></head></html>".encode("utf-16")
        self.assertEqual(og_of(page, "text/html; charset=iso-8859-1")["og:title"], "Ünïcode")
        page = "\ufeff<html><head><title>Ünïcode</title></head></html>".encode()
        self.assertEqual(og_of(page, "text/html")["og:title"], "Ünïcode")


PROVIDERS = [
    {
        "provider_name": "Example",
        "provider_url": "https://example.com",
        "endpoints": [
            {"schemes": ["https://*.example.com/video/*"], "url": "https://example.com/oembed"},
            {"schemes": ["https://xml.example/*"], "url": "https://xml.example/oembed.xml"},
            {
                "schemes": ["https://formats.example/*"],
                "url": "https://formats.example/oembed.{format}",
                "formats": ["json"],
            },
        ],
    }
]


class OEmbedTests(unittest.TestCase):
    def setUp(self) -> None:
        self.providers = OEmbedProviders(parse_providers(PROVIDERS, "test"))

    def test_provider_patterns(self) -> None:
        self.assertEqual(
            self.providers.api_url("https://www.example.com/video/1"),
            "https://example.com/oembed?url=https%3A%2F%2Fwww.example.com%2Fvideo%2F1&format=json",
        )
        # A host wildcard is one label; other parts need at least a character.
        self.assertIsNone(self.providers.api_url("https://a.b.example.com/video/1"))
        self.assertIsNone(self.providers.api_url("https://www.example.com/video/"))
        self.assertIsNone(self.providers.api_url("https://xml.example/page"))
        self.assertEqual(
            self.providers.api_url("https://formats.example/p"),
            "https://formats.example/oembed.json?url=https%3A%2F%2Fformats.example%2Fp&format=json",
        )

    def test_autodiscovery(self) -> None:
        tree = parse_html(
            b'<html><head><link rel="alternative" type="application/json+oembed" href="/b">'
            b'<link rel="alternate" type="application/json+oembed" href="/a"></head></html>',
            "text/html",
        )
        assert tree is not None
        self.assertEqual(discovered_api_url(tree), "/a")

    def test_video_answer(self) -> None:
        result = parse_oembed(
            "https://page",
            b'{"version": "1.0", "type": "video", "title": "A &amp; B", "author_name": "Ann",'
            b' "provider_name": "Site", "thumbnail_url": "https://t/img.jpg", "cache_age": "7200",'
            b' "width": 640, "height": 480.5,'
            b' "html": "<iframe src=x></iframe><video src=\\"https://v/1.mp4\\"></video><p>Words</p>"}',
        )
        self.assertEqual(
            result.open_graph,
            {
                "og:url": "https://page",
                "og:title": "A & B",
                "og:site_name": "Site",
                "og:image": "https://t/img.jpg",
                "og:type": "video.other",
                "og:video": "https://v/1.mp4",
                "og:description": "Words",
                "og:video:width": 640,
            },
        )
        self.assertEqual((result.author_name, result.cache_age_ms), ("Ann", 7_200_000))

    def test_photo_and_bad_answers(self) -> None:
        photo = parse_oembed("u", b'{"type": "photo", "url": "https://p/1.png", "version": 1}')
        self.assertEqual(photo.open_graph["og:image"], "https://p/1.png")
        for bad in (b"not json", b"[]", b'{"version": "2.0"}', b"\xff", b'{"cache_age": 1e999}'):
            result = parse_oembed("u", bad)
            self.assertIsNone(result.cache_age_ms)

"""Open Graph data from an HTML page, as Synapse's previewer finds it.

Pure functions of the page's bytes: the previewer runs them on a thread
pool (a 10 MiB page takes lxml a while). Every page is hostile: lxml's
HTML parser recovers from any markup, never reaches the network, and the
text walk is bounded.
"""

from __future__ import annotations

import codecs
import logging
import re
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lxml import etree

# lxml is imported where a page is parsed, not here: loaded, it costs a
# process some 8 MiB, which a server with previews off does not pay.

logger = logging.getLogger(__name__)

# Synapse's summary bounds (characters): paragraphs are taken until the
# summary reaches the first, it is cut on a word boundary near the second.
SUMMARY_MIN_CHARS = 200
SUMMARY_MAX_CHARS = 500
# A page declaring more meta tags than this of one prefix gets none of them read.
MAX_META_TAGS_PER_PREFIX = 50
# Pending nodes kept while walking the text of a page, bounding memory.
TEXT_WALK_STACK_LIMIT = 1024

_META_CHARSET = re.compile(rb'<\s*meta[^>]*charset\s*=\s*"?([a-z0-9_-]+)"?', re.IGNORECASE)
_XML_DECLARED_ENCODING = re.compile(rb'\s*<\s*\?\s*xml[^>]*encoding="([a-z0-9_-]+)"', re.IGNORECASE)
_HEADER_CHARSET = re.compile(r'.*; *charset="?(.*?)"?(;|$)', re.IGNORECASE)
# Where the charset of a page is looked for.
_SNIFF_BYTES = 1024

# Elements whose text is not the page's prose, and ARIA roles of the same.
_NOT_PROSE = frozenset(
    {"header", "nav", "aside", "footer", "script", "noscript", "style", "svg", "iframe",
     "video", "canvas", "img", "picture"}
)  # fmt: skip
_NOT_PROSE_ROLES = frozenset({"directory", "menu", "menubar", "toolbar"})

OpenGraph = dict[str, str | None]
if TYPE_CHECKING:
    Element = etree._Element


def _codec_name(label: str) -> str | None:
    try:
        return codecs.lookup(label).name
    except LookupError:
        return None


# Byte order marks, and the codec each says (one that drops the mark).
_BYTE_ORDER_MARKS = (
    (codecs.BOM_UTF32_LE, "utf-32"),
    (codecs.BOM_UTF32_BE, "utf-32"),
    (codecs.BOM_UTF8, "utf-8-sig"),
    (codecs.BOM_UTF16_LE, "utf-16"),
    (codecs.BOM_UTF16_BE, "utf-16"),
)


def candidate_encodings(body: bytes, content_type: str | None) -> Iterator[str]:
    """The encodings to try, best first, each once: a byte order mark (which
    browsers follow over anything else; Synapse ignores it), a ``<meta
    charset>`` in the first KiB, the XML declaration, the Content-Type
    header's charset, then UTF-8 and Windows-1252."""
    seen: set[str] = set()
    for label in [*_declared_labels(body, content_type), "utf-8", "cp1252"]:
        name = _codec_name(label)
        if name is not None and name not in seen:
            seen.add(name)
            yield name


def _declared_labels(body: bytes, content_type: str | None) -> Iterator[str]:
    """The encodings the page and its header name, in the order they count."""
    for mark, codec in _BYTE_ORDER_MARKS:
        if body.startswith(mark):
            yield codec
            break
    head = body[:_SNIFF_BYTES]
    for found in (_META_CHARSET.search(head), _XML_DECLARED_ENCODING.match(head)):
        if found:
            yield found.group(1).decode("ascii")
    header = _HEADER_CHARSET.match(content_type) if content_type else None
    if header:
        yield header.group(1)


def parse_html(body: bytes, content_type: str | None) -> Element | None:
    """The page's tree, decoded with the first encoding that fits all of it;
    ``None`` for an empty page (or an empty ``<body>``) or one nothing decodes."""
    if not body:
        return None
    text = None
    for candidate in candidate_encodings(body, content_type):
        try:
            text = body.decode(candidate)
        except (UnicodeDecodeError, LookupError):
            continue
        break
    if text is None:
        return None
    from lxml import etree

    # Given to lxml as UTF-8: Python's codecs decided, not libxml2's names for them.
    parser = etree.HTMLParser(recover=True, encoding="utf-8", no_network=True)
    try:
        tree = etree.fromstring(text.encode("utf-8", "surrogatepass"), parser)
    except (etree.LxmlError, ValueError) as e:
        logger.info("unparseable HTML page: %s", e)
        return None
    if tree is None:
        return None
    if tree.tag == "html" and len(tree) == 1:
        body_element = tree.find("body")
        if body_element is not None and len(body_element) == 0:
            text = "".join(body_element.itertext()).strip("\ufffd").strip()
            if not text:
                return None
    return tree


def _meta_tags(
    tree: Element,
    attribute: str,
    prefix: str,
    rename: Callable[[str], str | None] = lambda key: key,
) -> OpenGraph:
    """``<meta {attribute}="{prefix}:..." content="...">`` (content not
    empty), by (renamed) key; none at all on a page with too many."""
    found: OpenGraph = {}
    for meta in tree.iter("meta"):
        key = meta.get(attribute)
        content = meta.get("content")
        if meta.getparent() is None or key is None or not content:
            continue
        if not key.startswith(f"{prefix}:"):
            continue
        if len(found) >= MAX_META_TAGS_PER_PREFIX:
            logger.info("ignoring the %r meta tags of a page with too many", prefix)
            return {}
        renamed = rename(key)
        if renamed is not None:
            found[renamed] = content
    return found


def _twitter_as_open_graph(key: str) -> str | None:
    if key in ("twitter:card", "twitter:creator"):
        return None
    if key == "twitter:site":
        return "og:site_name"
    return "og:" + key[len("twitter:") :]


def _own_texts(element: Element) -> list[str]:
    """The element's own text nodes (not its children's), in order."""
    texts = [element.text] if element.text is not None else []
    texts += [child.tail for child in element if child.tail is not None]
    return texts


def _in_document_order(tree: Element, elements: list[Element]) -> list[Element]:
    wanted = set(elements)
    return [element for element in tree.iter() if element in wanted]


def _title(tree: Element) -> str | None:
    """The first text of the page's first title, h1, h2 or h3 (whichever of
    them comes first and has text of its own)."""
    firsts = [next(tree.iter(tag), None) for tag in ("title", "h1", "h2", "h3")]
    found = [element for element in firsts if element is not None]
    for element in _in_document_order(tree, found):
        texts = _own_texts(element)
        if texts:
            return texts[0].strip()
    return None


def _meta_named(tree: Element, attribute: str, value: str) -> str | None:
    """The first non-empty content of a ``<meta>`` whose ``attribute`` is
    ``value`` (in any case)."""
    for meta in tree.iter("meta"):
        name = meta.get(attribute)
        content = meta.get("content")
        if meta.getparent() is not None and name is not None and name.lower() == value:
            if content:
                return content
    return None


_XPATH_NUMBER = re.compile(r"\s*(-?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+))\s*\Z")


def _dimension(value: str | None) -> float | None:
    """An attribute read as a number the way XPath's ``number()`` reads it."""
    if value is None:
        return None
    match = _XPATH_NUMBER.match(value)
    return float(match.group(1)) if match else None


def _image(tree: Element) -> str | None:
    """The page's picture: an ``itemprop="image"`` meta tag, the largest
    ``<img>`` (both sides above 10), the first ``<img>``, or an icon."""
    meta = _meta_named(tree, "itemprop", "image")
    if meta is not None:
        return meta
    images = [img for img in tree.iter("img") if img.get("src") is not None]
    sized = []
    for img in images:
        width, height = _dimension(img.get("width")), _dimension(img.get("height"))
        if width is not None and height is not None and width > 10 and height > 10:
            sized.append((-width * height, img))
    if sized:
        # Stable: of equal areas, the first on the page.
        return str(sorted(sized, key=lambda pair: pair[0])[0][1].get("src"))
    if images:
        return str(images[0].get("src"))
    for link in tree.iter("link"):
        href = link.get("href")
        if href is not None and "icon" in (link.get("rel") or ""):
            return href
    return None


def parse_open_graph(tree: Element) -> OpenGraph:
    """The page's Open Graph data, with Synapse's fallbacks for what it lacks."""
    og = (
        _meta_tags(tree, "property", "og")
        | _meta_tags(tree, "property", "article")
        | _meta_tags(tree, "property", "profile")
    )
    for key, value in _meta_tags(tree, "name", "twitter", _twitter_as_open_graph).items():
        og.setdefault(key, value)
    if "og:title" not in og:
        og["og:title"] = _title(tree)
    if "og:image" not in og:
        image = _image(tree)
        if image is not None:
            og["og:image"] = image
    if "og:description" not in og:
        og["og:description"] = _meta_named(tree, "name", "description") or describe(tree)
    elif og["og:description"]:
        og["og:description"] = summarize([og["og:description"]])
    return og


def _prose(root: Element | None) -> Iterator[str]:
    """The text of ``root``, depth first, outside elements that are not
    prose (their tails are still the parent's prose)."""
    from lxml import etree

    if root is None:
        return
    pending: list[str | Element] = [root]
    while pending:
        node = pending.pop()
        if isinstance(node, str):
            yield node
            continue
        if isinstance(node, etree._Comment) or node.tag in _NOT_PROSE:
            continue
        if node.get("role") in _NOT_PROSE_ROLES:
            continue
        if node.text:
            yield node.text
        for child in reversed(node):
            if len(pending) > TEXT_WALK_STACK_LIMIT:
                break
            if child.tail:
                pending.append(child.tail)
            pending.append(child)


def describe(tree: Element) -> str | None:
    """A summary of the text of the page's ``<body>``."""
    return summarize(re.sub(r"\s+", "\n", text).strip() for text in _prose(tree.find("body")))


def summarize(paragraphs: Iterable[str]) -> str | None:
    """Whole paragraphs until there are ``SUMMARY_MIN_CHARS``; past
    ``SUMMARY_MAX_CHARS`` cut after the last word that fits (or the first
    one that reaches the minimum) and marked with an ellipsis."""
    summary = ""
    for paragraph in paragraphs:
        if len(summary) >= SUMMARY_MIN_CHARS:
            break
        summary += re.sub(r"[\t \r\n]+", " ", paragraph) + "\n\n"
    summary = re.sub(r"[\t ]+", " ", summary.strip())
    summary = re.sub(r"[\t \r\n]*[\r\n]+", "\n\n", summary)
    if len(summary) > SUMMARY_MAX_CHARS:
        cut = ""
        for word in re.finditer(r"\s*\S+", summary):
            if len(cut) + len(word.group()) < SUMMARY_MAX_CHARS:
                cut += word.group()
                continue
            if len(cut) < SUMMARY_MIN_CHARS:
                cut += word.group()
            break
        summary = cut[:SUMMARY_MAX_CHARS].strip() + "…"
    return summary or None

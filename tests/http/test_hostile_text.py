"""Text that cannot reach the database (a NUL character, bytes that are not
UTF-8) is refused at the edge on every route: 400 ``M_INVALID_PARAM``, or an
unknown token for a token; never a 500 from the database driver.

The table below names every route the server serves; a route added without
an entry fails ``test_table_covers_every_route``.
"""

from __future__ import annotations

import re
from typing import Any

import attrs
from twisted.internet.threads import deferToThread
from twisted.web.resource import Resource

from mediarepo.http.server import Router
from tests.utils import SERVER_NAME, Response, ServerTestCase, port_number, raw_exchange

# Values that are fine, substituted for the parameters not under test.
VALID = {
    "server_name": SERVER_NAME,
    "media_id": "abcdefghijkl",
    "file_name": "name.txt",
    "user_id": f"@alice:{SERVER_NAME}",
    "room_id": f"!room:{SERVER_NAME}",
}
# Each way a parameter's text can be unfit for the database.
HOSTILE = {"nul": "a%00b", "lone_nul": "%00", "not_utf8": "a%ffb", "truncated_utf8": "%c3"}


@attrs.frozen
class Entry:
    method: str
    # The path after the router's prefix; {name} marks a path parameter.
    path: str
    # Query parameters the handler reads, each read through the one helper.
    query: tuple[str, ...] = ()
    # Query parameters that must be present for the handler to get that far.
    base_query: str = ""
    # Whether the route authenticates with an access token.
    token: bool = True


# A URL previews refuse without fetching it (its address is blacklisted below).
_PREVIEWED = "url=http%3A%2F%2F10.0.0.1%2F"
_LEGACY = {
    "upload": Entry("POST", "upload", ("filename",)),
    "download": Entry(
        "GET", "download/{server_name}/{media_id}/{file_name}",
        ("timeout_ms", "allow_remote"), token=False,
    ),
    "thumbnail": Entry(
        "GET", "thumbnail/{server_name}/{media_id}",
        ("width", "height", "method", "animated", "timeout_ms", "allow_remote"),
        "width=32&height=32", token=False,
    ),
    "config": Entry("GET", "config"),
    "preview_url": Entry("GET", "preview_url", ("url", "ts"), _PREVIEWED),
}  # fmt: skip
_ADMIN_PAGING = ("from", "limit", "order_by", "dir")

TABLE: dict[str, Entry] = {
    **{
        f"/_matrix/media/{version}:{name}": entry
        for version in ("r0", "v3", "v1")
        for name, entry in _LEGACY.items()
    },
    "/_matrix/media/v1:create": Entry("POST", "create"),
    "/_matrix/media/v3:upload_reserved": Entry(
        "PUT", "upload/{server_name}/{media_id}", ("filename",)
    ),
    "/_matrix/client/v1/media:client_download": Entry(
        "GET", "download/{server_name}/{media_id}/{file_name}",
        ("timeout_ms", "admin_unsafely_bypass_quarantine"),
    ),
    "/_matrix/client/v1/media:client_thumbnail": Entry(
        "GET", "thumbnail/{server_name}/{media_id}",
        ("width", "height", "method", "animated", "timeout_ms"), "width=32&height=32",
    ),
    "/_matrix/client/v1/media:client_config": Entry("GET", "config"),
    "/_matrix/client/v1/media:client_preview_url": Entry(
        "GET", "preview_url", ("url", "ts"), _PREVIEWED
    ),
    # Signed with X-Matrix; the path is read before the signature is checked.
    "/_matrix/federation/v1/media:federation_download": Entry(
        "GET", "download/{media_id}", token=False
    ),
    "/_matrix/federation/v1/media:federation_thumbnail": Entry(
        "GET", "thumbnail/{media_id}", token=False
    ),
    "/_matrix/key/v2:keys": Entry("GET", "server", token=False),
    "/_synapse/admin/v1:admin_delete_old": Entry(
        "POST", "media/delete", ("before_ts", "size_gt", "keep_profiles"), "before_ts=1600000000000"
    ),
    "/_synapse/admin/v1:admin_delete_old_legacy": Entry(
        "POST", "media/{server_name}/delete", ("before_ts", "size_gt", "keep_profiles"),
        "before_ts=1600000000000",
    ),
    "/_synapse/admin/v1:admin_quarantine_changes": Entry(
        "GET", "media/quarantine_changes", ("from",)
    ),
    "/_synapse/admin/v1:admin_quarantine": Entry(
        "POST", "media/quarantine/{server_name}/{media_id}"
    ),
    "/_synapse/admin/v1:admin_unquarantine": Entry(
        "POST", "media/unquarantine/{server_name}/{media_id}"
    ),
    "/_synapse/admin/v1:admin_protect": Entry("POST", "media/protect/{media_id}"),
    "/_synapse/admin/v1:admin_unprotect": Entry("POST", "media/unprotect/{media_id}"),
    "/_synapse/admin/v1:admin_media": Entry("GET", "media/{server_name}/{media_id}"),
    "/_synapse/admin/v1:admin_media_delete": Entry("DELETE", "media/{server_name}/{media_id}"),
    "/_synapse/admin/v1:admin_purge_cache": Entry(
        "POST", "purge_media_cache", ("before_ts",), "before_ts=1600000000000"
    ),
    "/_synapse/admin/v1:admin_user_media": Entry("GET", "users/{user_id}/media", _ADMIN_PAGING),
    "/_synapse/admin/v1:admin_user_media_delete": Entry(
        "DELETE", "users/{user_id}/media", _ADMIN_PAGING
    ),
    "/_synapse/admin/v1:admin_user_quarantine": Entry(
        "POST", "user/{user_id}/media/quarantine"
    ),
    "/_synapse/admin/v1:admin_media_statistics": Entry(
        "GET", "statistics/users/media",
        (*_ADMIN_PAGING, "from_ts", "until_ts", "search_term"),
    ),
    "/_synapse/admin/v1:admin_room_media": Entry("GET", "room/{room_id}/media"),
    "/_synapse/admin/v1:admin_room_quarantine": Entry(
        "POST", "room/{room_id}/media/quarantine"
    ),
    "/_synapse/admin/v1:admin_room_quarantine_legacy": Entry(
        "POST", "quarantine_media/{room_id}"
    ),
}  # fmt: skip


def served_routes(resource: Resource, prefix: str = "") -> set[str]:
    """``prefix:name`` of every route under ``resource``."""
    if isinstance(resource, Router):
        return {f"{prefix}:{r.name}" for r in resource.routes}
    found: set[str] = set()
    for name, child in resource.children.items():
        if isinstance(child, Resource):
            found |= served_routes(child, f"{prefix}/{name.decode()}")
    return found


class HostileTextTests(ServerTestCase):
    # Many reservations are made, one per request into one.
    extra_config = {
        "max_pending_media_uploads": 10_000,
        "rc_media_create": {"per_second": 10_000, "burst_count": 10_000},
        "url_preview_enabled": True,
        "url_preview_ip_range_blacklist": ["10.0.0.0/8"],
    }

    async def set_up(self) -> None:
        await super().set_up()
        self.admin = await self.register("root", admin=True)

    async def reservation(self) -> str:
        r = await self.request("POST", "/_matrix/media/v1/create", token=self.admin)
        return str(r.json()["content_uri"].rsplit("/", 1)[1])

    async def call(
        self, key: str, values: dict[str, str], query: str, token: str | None
    ) -> Response:
        entry = TABLE[key]
        prefix = key.split(":", 1)[0]
        path = f"{prefix}/{entry.path.format(**values)}"
        # The parameter under test replaces the base one of the same name.
        params = {k: v for k, _, v in (p.partition("=") for p in entry.base_query.split("&") if p)}
        params.update((k, v) for k, _, v in (p.partition("=") for p in query.split("&") if p))
        if params:
            path += "?" + "&".join(f"{k}={v}" for k, v in params.items())
        body = b"x" if entry.method in ("POST", "PUT") else None
        r = await self.request(entry.method, path, token=token, body=body)
        self.assertLess(r.code, 500, f"{entry.method} {path}: {r.body!r}")
        return r

    async def valid_values(self, key: str) -> dict[str, str]:
        values = dict(VALID)
        if key.endswith(":upload_reserved"):
            values["media_id"] = await self.reservation()
        return values

    def test_table_covers_every_route(self) -> None:
        served: set[str] = set()
        for site in self.server.parts.sites:
            served |= served_routes(site.resource)
        self.assertEqual(served, set(TABLE))

    async def test_path_parameters(self) -> None:
        checked = 0
        for key, entry in TABLE.items():
            for param in re.findall(r"\{(\w+)\}", entry.path):
                for kind, bad in HOSTILE.items():
                    values = await self.valid_values(key)
                    values[param] = bad
                    r = await self.call(key, values, "", self.admin)
                    self.assertEqual(
                        (r.code, r.json()["errcode"]), (400, "M_INVALID_PARAM"),
                        f"{key} {param} {kind}",
                    )  # fmt: skip
                    checked += 1
        self.assertGreater(checked, 100)

    async def test_query_parameters(self) -> None:
        checked = 0
        for key, entry in TABLE.items():
            for param in entry.query:
                for kind, bad in HOSTILE.items():
                    values = await self.valid_values(key)
                    r = await self.call(key, values, f"{param}={bad}", self.admin)
                    # Synapse answers a filename that is not UTF-8 with M_UNKNOWN.
                    expected = (
                        "M_UNKNOWN"
                        if param == "filename" and kind.endswith("utf8")
                        else "M_INVALID_PARAM"
                    )
                    self.assertEqual(
                        (r.code, r.json()["errcode"]), (400, expected), f"{key} {param} {kind}"
                    )
                    checked += 1
        self.assertGreater(checked, 100)

    async def test_token_in_query(self) -> None:
        for key, entry in TABLE.items():
            if not entry.token:
                continue
            for bad in ("abc%00def", "%00", "abc%ffdef"):
                values = await self.valid_values(key)
                r = await self.call(key, values, f"access_token={bad}", None)
                self.assertEqual((r.code, r.json()["errcode"]), (401, "M_UNKNOWN_TOKEN"), key)

    async def test_valid_text_is_served(self) -> None:
        """The same requests with fit text get past the checks (no 400 for
        the text, no 500)."""
        for key in TABLE:
            r = await self.call(key, await self.valid_values(key), "", self.admin)
            if r.code == 400:
                self.assertNotEqual(r.json()["errcode"], "M_INVALID_PARAM", key)
        # Text that is fine but unusual reaches the database and comes back.
        media_id = await self.reservation()
        r = await self.request(
            "PUT", f"/_matrix/media/v3/upload/{SERVER_NAME}/{media_id}?filename=%E2%9C%93%01.txt",
            token=self.admin, body=b"checked",
        )  # fmt: skip
        self.assertEqual(r.code, 200, r.body)
        r = await self.request(
            "GET", f"/_synapse/admin/v1/media/{SERVER_NAME}/{media_id}", token=self.admin
        )
        self.assertEqual(r.json()["media_info"]["upload_name"], "\u2713\x01.txt")

    async def raw(self, head: bytes, body: bytes = b"") -> tuple[int, Any]:
        import json

        port = port_number(self.server.ports[0])
        answer = await deferToThread(raw_exchange, port, head, [body] if body else [])
        status_line, _, rest = answer.partition(b"\r\n")
        code = int(status_line.split(b" ")[1])
        payload = rest.partition(b"\r\n\r\n")[2]
        self.assertLess(code, 500, answer)
        try:
            return code, json.loads(payload)
        except ValueError:
            return code, None

    async def test_headers(self) -> None:
        def head(method: str, path: str, *headers: bytes) -> bytes:
            lines = [f"{method} {path} HTTP/1.1".encode(), b"Host: x", b"Connection: close"]
            return b"\r\n".join([*lines, *headers]) + b"\r\n\r\n"

        def refused(answer: tuple[int, Any], code: int, errcode: str, what: object) -> None:
            # Twisted itself refuses a header holding a NUL (a bare 400);
            # what gets through is refused by us.
            if answer[1] is None and answer[0] == 400:
                return
            self.assertEqual((answer[0], answer[1]["errcode"]), (code, errcode), what)

        # The access token in the Authorization header.
        for token in (b"abc\x00def", b"\x00", b"abc\xffdef"):
            answer = await self.raw(
                head("GET", "/_matrix/client/v1/media/config", b"Authorization: Bearer " + token)
            )
            refused(answer, 401, "M_UNKNOWN_TOKEN", token)
        bearer = b"Authorization: Bearer " + self.admin.encode()
        # The Content-Type of an upload (new media, and content for a reservation).
        for content_type in (b"text/plain\x00", b"text/\x00plain"):
            for path in ("/_matrix/media/v3/upload", None):
                if path is None:
                    path = f"/_matrix/media/v3/upload/{SERVER_NAME}/{await self.reservation()}"
                    method = "PUT"
                else:
                    method = "POST"
                answer = await self.raw(
                    head(
                        method, path, bearer, b"Content-Type: " + content_type,
                        b"Content-Length: 1",
                    ),
                    b"x",
                )  # fmt: skip
                refused(answer, 400, "M_INVALID_PARAM", path)
        # A Content-Disposition on an upload is not read (Synapse reads none
        # either): the name stays the filename parameter's.
        media_id = await self.reservation()
        code, _ = await self.raw(
            head(
                "PUT", f"/_matrix/media/v3/upload/{SERVER_NAME}/{media_id}?filename=kept",
                bearer, b'Content-Disposition: attachment; filename="a\xffb\x01"',
                b"Content-Length: 1",
            ),
            b"x",
        )  # fmt: skip
        self.assertEqual(code, 200)
        r = await self.request(
            "GET", f"/_synapse/admin/v1/media/{SERVER_NAME}/{media_id}", token=self.admin
        )
        self.assertEqual(r.json()["media_info"]["upload_name"], "kept")
        # The origin (and the other fields) of an X-Matrix header.
        for auth in (
            b'X-Matrix origin="evil\x00.example",key="ed25519:a",sig="c2ln"',
            b'X-Matrix origin=evil.example,key="ed25519:a\x00",sig="c2ln"',
            b'X-Matrix origin="ev\xffil.example",key="ed25519:a",sig="c2ln"',
            b'X-Matrix origin="evil\x01.example",key="ed25519:a",sig="c2ln"',
        ):
            answer = await self.raw(
                head(
                    "GET",
                    "/_matrix/federation/v1/media/download/abcdefgh",
                    b"Authorization: " + auth,
                )
            )
            refused(answer, 400, "M_UNAUTHORIZED", auth)


class HostileTextPostgresTests(HostileTextTests):
    engine = "psycopg2"

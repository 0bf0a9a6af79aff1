"""Synapse's media admin API: quarantine (by hash, protection, 404s on every
path), deletion, listing, statistics, and the admin-only rule."""

from __future__ import annotations

import hashlib
import json
import os
import time
from typing import Any

from mediarepo.media.paths import local_media_path, remote_media_path
from mediarepo.storage import quarantine_rows as quarantine_module
from tests import images
from tests.utils import SERVER_NAME, ServerTestCase

ADMIN = "/_synapse/admin/v1"
DOWNLOAD = f"/_matrix/client/v1/media/download/{SERVER_NAME}"
LEGACY_DOWNLOAD = f"/_matrix/media/v3/download/{SERVER_NAME}"
THUMBNAIL = f"/_matrix/client/v1/media/thumbnail/{SERVER_NAME}"
REMOTE = "remote.example"
DAY_MS = 24 * 3600 * 1000


class AdminTestCase(ServerTestCase):
    async def set_up(self) -> None:
        await super().set_up()
        self.admin = await self.register("root", admin=True)
        self.alice = await self.register("alice")

    async def sql(self, statement: str, *args: object) -> list[tuple[Any, ...]]:
        assert self.server.database is not None
        return await self.server.database.run_query("test", statement, args)

    async def cache_remote(self, media_id: str, data: bytes, accessed: int | None = None) -> str:
        """Put ``data`` in the remote cache as if fetched from REMOTE."""
        filesystem_id = media_id + "fs"
        path = os.path.join(self.media_store, remote_media_path(REMOTE, filesystem_id))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(data)
        now = int(time.time() * 1000)
        await self.sql(
            "INSERT INTO remote_media_cache (media_origin, media_id, media_type, created_ts,"
            " media_length, filesystem_id, last_access_ts, sha256)"
            " VALUES (?, ?, 'text/plain', ?, ?, ?, ?, ?)",
            REMOTE, media_id, now, len(data), filesystem_id,
            now if accessed is None else accessed, hashlib.sha256(data).hexdigest(),
        )  # fmt: skip
        return path

    async def admin_call(
        self, method: str, path: str, token: str | None = None, code: int = 200
    ) -> Any:
        r = await self.request(method, ADMIN + path, token=token or self.admin)
        self.assertEqual(r.code, code, r.body)
        return r.json()

    async def status(self, path: str, token: str | None = None) -> int:
        r = await self.request("GET", path, token=token or self.alice)
        return r.code


class QuarantineTests(AdminTestCase):
    async def test_quarantine_by_hash_and_the_404s(self) -> None:
        photo = images.png(64, 48)
        first = await self.upload(self.alice, photo, "image/png")
        copy = await self.upload(self.alice, photo, "image/png")
        protected = await self.upload(self.alice, photo, "image/png")
        other = await self.upload(self.alice, b"something else")
        await self.cache_remote("remotecopy", photo)
        await self.admin_call("POST", f"/media/protect/{protected}")

        await self.admin_call("POST", f"/media/quarantine/{SERVER_NAME}/{first}")
        rows = dict(await self.sql("SELECT media_id, quarantined_by FROM local_media_repository"))
        self.assertEqual(rows[first], f"@root:{SERVER_NAME}")
        self.assertEqual(rows[copy], f"@root:{SERVER_NAME}")
        self.assertIsNone(rows[protected])
        self.assertIsNone(rows[other])
        remote = await self.sql("SELECT quarantined_by FROM remote_media_cache")
        self.assertEqual(remote, [(f"@root:{SERVER_NAME}",)])

        for media_id in (first, copy):
            self.assertEqual(await self.status(f"{DOWNLOAD}/{media_id}"), 404)
            self.assertEqual(await self.status(f"{LEGACY_DOWNLOAD}/{media_id}"), 404)
            self.assertEqual(await self.status(f"{THUMBNAIL}/{media_id}?width=32&height=32"), 404)
        self.assertEqual(
            await self.status(f"/_matrix/client/v1/media/download/{REMOTE}/remotecopy"), 404
        )
        self.assertEqual(await self.status(f"{DOWNLOAD}/{protected}"), 200)
        self.assertEqual(await self.status(f"{DOWNLOAD}/{other}"), 200)
        # A server admin may still look, with the unsafe bypass; nobody else.
        bypass = "?admin_unsafely_bypass_quarantine=true"
        r = await self.request("GET", f"{DOWNLOAD}/{first}{bypass}", token=self.admin)
        self.assertEqual((r.code, r.body), (200, photo))
        r = await self.request(
            "GET", f"/_matrix/client/v1/media/download/{REMOTE}/remotecopy{bypass}",
            token=self.admin,
        )  # fmt: skip
        self.assertEqual((r.code, r.body), (200, photo))
        r = await self.request("GET", f"{DOWNLOAD}/{first}{bypass}", token=self.alice)
        self.assertEqual(
            (r.code, r.json()),
            (400, {"errcode": "M_UNKNOWN", "error": "Must be a server admin to bypass quarantine"}),
        )
        self.assertEqual(await self.status(f"{DOWNLOAD}/{first}", token=self.admin), 404)
        # Files stay: quarantine hides, it does not delete.
        self.assertTrue(os.path.exists(os.path.join(self.media_store, local_media_path(first))))

        # The same bytes uploaded again arrive quarantined by "system".
        again = await self.upload(self.alice, photo, "image/png")
        info = await self.admin_call("GET", f"/media/{SERVER_NAME}/{again}")
        self.assertEqual(info["media_info"]["quarantined_by"], "system")
        self.assertEqual(await self.status(f"{DOWNLOAD}/{again}"), 404)

        # Releasing one releases every media with the bytes, the remote copy too.
        await self.admin_call("POST", f"/media/unquarantine/{SERVER_NAME}/{copy}")
        for media_id in (first, copy, again):
            self.assertEqual(await self.status(f"{DOWNLOAD}/{media_id}"), 200)
        remote = await self.sql("SELECT quarantined_by FROM remote_media_cache")
        self.assertEqual(remote, [(None,)])

    async def test_quarantine_changes_are_recorded(self) -> None:
        data = os.urandom(1000)
        first = await self.upload(self.alice, data)
        second = await self.upload(self.alice, data)
        await self.cache_remote("remotecopy", data)
        await self.admin_call("POST", f"/media/quarantine/{REMOTE}/remotecopy")
        page = await self.admin_call("GET", "/media/quarantine_changes")
        changes = {(c["origin"], c["media_id"], c["quarantined"]) for c in page["changes"]}
        self.assertEqual(
            changes,
            {(SERVER_NAME, first, True), (SERVER_NAME, second, True), (REMOTE, "remotecopy", True)},
        )
        position = page["next_batch"]
        await self.admin_call("POST", f"/media/unquarantine/{SERVER_NAME}/{first}")
        page = await self.admin_call("GET", f"/media/quarantine_changes?from={position}")
        self.assertEqual(len(page["changes"]), 3)
        self.assertFalse(any(c["quarantined"] for c in page["changes"]))
        page = await self.admin_call("GET", f"/media/quarantine_changes?from={page['next_batch']}")
        self.assertEqual(page["changes"], [])
        body = await self.admin_call(
            "GET", f"/media/quarantine_changes?from={page['next_batch'] + 1000}", code=400
        )
        self.assertEqual(body["errcode"], "M_INVALID_PARAM")

    async def test_quarantine_a_users_media(self) -> None:
        bob = await self.register("bob")
        mine = [await self.upload(self.alice, os.urandom(100)) for _ in range(3)]
        bobs = await self.upload(bob, os.urandom(100))
        body = await self.admin_call("POST", f"/user/@alice:{SERVER_NAME}/media/quarantine")
        self.assertEqual(body, {"num_quarantined": 3})
        for media_id in mine:
            self.assertEqual(await self.status(f"{DOWNLOAD}/{media_id}"), 404)
        self.assertEqual(await self.status(f"{DOWNLOAD}/{bobs}"), 200)

    async def test_protection_of_unknown_media(self) -> None:
        body = await self.admin_call("POST", "/media/protect/nosuchmediaatall", code=404)
        self.assertEqual(body["errcode"], "M_UNKNOWN")

    async def test_rooms_need_synapses_events(self) -> None:
        body = await self.admin_call("GET", "/room/!room:x/media", code=404)
        self.assertEqual(body["errcode"], "M_UNRECOGNIZED")

    async def test_room_media_from_synapses_events(self) -> None:
        local = await self.upload(self.alice, os.urandom(100))
        await self.cache_remote("inroom", b"remote bytes")
        await self.sql(
            "CREATE TABLE events (event_id TEXT, room_id TEXT, stream_ordering BIGINT,"
            " contains_url BOOLEAN, outlier BOOLEAN)"
        )
        await self.sql("CREATE TABLE event_json (event_id TEXT, room_id TEXT, json TEXT)")
        contents = [
            {"url": f"mxc://{SERVER_NAME}/{local}"},
            {"url": "mxc://elsewhere/x", "info": {"thumbnail_url": f"mxc://{REMOTE}/inroom"}},
            {"url": "https://not.mxc/x"},
        ]
        for i, content in enumerate(contents):
            await self.sql(
                "INSERT INTO events VALUES (?, '!room:x', ?, ?, ?)", f"$e{i}", i, True, False
            )
            await self.sql(
                "INSERT INTO event_json VALUES (?, '!room:x', ?)",
                f"$e{i}", json.dumps({"content": content}),
            )  # fmt: skip
        # Tables are looked for at start-up: a server started now sees them.
        await self.start_server()
        admin = await self.register("root2", admin=True)
        body = await self.admin_call("GET", "/room/!room:x/media", token=admin)
        self.assertEqual(body["local"], [f"mxc://{SERVER_NAME}/{local}"])
        self.assertEqual(sorted(body["remote"]), ["mxc://elsewhere/x", f"mxc://{REMOTE}/inroom"])
        body = await self.admin_call("POST", "/room/!room:x/media/quarantine", token=admin)
        self.assertEqual(body, {"num_quarantined": 2})
        self.assertEqual(await self.status(f"{DOWNLOAD}/{local}"), 404)


class QuarantinePostgresTests(QuarantineTests):
    engine = "psycopg2"


class AdminMediaTests(AdminTestCase):
    async def test_only_admins(self) -> None:
        calls = [
            ("GET", f"/media/{SERVER_NAME}/abcdefghij"),
            ("DELETE", f"/media/{SERVER_NAME}/abcdefghij"),
            ("POST", "/media/delete?before_ts=40000000000"),
            ("POST", f"/media/{SERVER_NAME}/delete?before_ts=40000000000"),
            ("POST", "/purge_media_cache?before_ts=40000000000"),
            ("POST", f"/media/quarantine/{SERVER_NAME}/abcdefghij"),
            ("POST", f"/media/unquarantine/{SERVER_NAME}/abcdefghij"),
            ("POST", "/media/protect/abcdefghij"),
            ("POST", "/media/unprotect/abcdefghij"),
            ("GET", "/media/quarantine_changes"),
            ("GET", f"/users/@alice:{SERVER_NAME}/media"),
            ("DELETE", f"/users/@alice:{SERVER_NAME}/media"),
            ("POST", f"/user/@alice:{SERVER_NAME}/media/quarantine"),
            ("GET", "/statistics/users/media"),
            ("GET", "/room/!r:x/media"),
            ("POST", "/room/!r:x/media/quarantine"),
            ("POST", "/quarantine_media/!r:x"),
        ]
        for method, path in calls:
            r = await self.request(method, ADMIN + path, token=self.alice)
            self.assertEqual((r.code, r.json()["errcode"]), (403, "M_FORBIDDEN"), path)
            self.assertEqual(r.json()["error"], "You are not a server admin")
            r = await self.request(method, ADMIN + path)
            self.assertEqual((r.code, r.json()["errcode"]), (401, "M_MISSING_TOKEN"), path)

    async def test_empty_path_segments(self) -> None:
        for method, path, code in [
            ("GET", f"{ADMIN}/media//abcdefghij", 404),
            ("DELETE", f"{ADMIN}/media/{SERVER_NAME}/", 404),
            ("GET", f"{ADMIN}/users//media", 400),
            ("GET", f"{DOWNLOAD}/", 404),
            ("GET", "/_matrix/client/v1/media/download//abcdefghij", 400),
        ]:
            r = await self.request(method, path, token=self.admin)
            self.assertEqual(r.code, code, (path, r.body))
            self.assertIn("errcode", r.json())

    async def test_media_info(self) -> None:
        media_id = await self.upload(self.alice, b"hello", "text/plain", "hi.txt")
        info = (await self.admin_call("GET", f"/media/{SERVER_NAME}/{media_id}"))["media_info"]
        self.assertEqual(info["media_id"], media_id)
        self.assertEqual(info["user_id"], f"@alice:{SERVER_NAME}")
        self.assertEqual((info["media_length"], info["upload_name"]), (5, "hi.txt"))
        self.assertEqual(info["sha256"], hashlib.sha256(b"hello").hexdigest())
        self.assertIsNone(info["media_origin"])
        self.assertIs(info["safe_from_quarantine"], False)
        await self.cache_remote("remoteinfo", b"far away")
        info = (await self.admin_call("GET", f"/media/{REMOTE}/remoteinfo"))["media_info"]
        self.assertEqual((info["media_origin"], info["filesystem_id"]), (REMOTE, "remoteinfofs"))
        self.assertIsNone(info["user_id"])
        body = await self.admin_call("GET", f"/media/{SERVER_NAME}/unknownmedia", code=404)
        self.assertEqual(body, {"errcode": "M_NOT_FOUND", "error": "Unknown media"})

    async def test_delete_one_media(self) -> None:
        data = os.urandom(5000)
        doomed = await self.upload(self.alice, images.png(40, 40), "image/png")
        kept = await self.upload(self.alice, data)
        twin = await self.upload(self.alice, data)
        body = await self.admin_call("DELETE", f"/media/{SERVER_NAME}/{doomed}")
        self.assertEqual(body, {"deleted_media": [doomed], "total": 1})
        self.assertEqual(await self.status(f"{DOWNLOAD}/{doomed}"), 404)
        self.assertFalse(os.path.exists(os.path.join(self.media_store, local_media_path(doomed))))
        thumbs = await self.sql(
            "SELECT COUNT(*) FROM local_media_repository_thumbnails WHERE media_id = ?", doomed
        )
        self.assertEqual(thumbs[0][0], 0)
        # Deleting one of two media sharing bytes keeps the other's.
        await self.admin_call("DELETE", f"/media/{SERVER_NAME}/{kept}")
        r = await self.request("GET", f"{DOWNLOAD}/{twin}", token=self.alice)
        self.assertEqual((r.code, r.body), (200, data))
        body = await self.admin_call("DELETE", f"/media/{REMOTE}/whatever", code=400)
        self.assertEqual(body["error"], "Can only delete local media")
        await self.admin_call("DELETE", f"/media/{SERVER_NAME}/{doomed}", code=404)

    async def test_media_deleted_while_its_thumbnails_are_made(self) -> None:
        """Thumbnails finished after their media was deleted leave no row and
        no file behind."""
        assert self.server.repository is not None
        thumbnails = self.server.repository.thumbnails
        budget = thumbnails.pixel_budget
        # Holding every pixel keeps the pre-generation waiting while the
        # media is deleted: a purge deletes the rows first, then the files;
        # the thumbnail is made between the two, from the file still there.
        await budget.acquire(budget.limit)
        try:
            doomed = await self.upload(self.alice, images.png(40, 40), "image/png")
            await self.sql("DELETE FROM local_media_repository WHERE media_id = ?", doomed)
        finally:
            budget.release(budget.limit)
        await thumbnails.settle()
        thumbs = await self.sql(
            "SELECT COUNT(*) FROM local_media_repository_thumbnails WHERE media_id = ?", doomed
        )
        self.assertEqual(thumbs[0][0], 0)
        left = [
            name
            for _root, _dirs, names in os.walk(os.path.join(self.media_store, "local_thumbnails"))
            for name in names
        ]
        self.assertEqual(left, [])

    async def test_delete_by_date_and_size(self) -> None:
        now = int(time.time() * 1000)
        old_big = await self.upload(self.alice, os.urandom(2000))
        old_small = await self.upload(self.alice, os.urandom(10))
        old_quarantined = await self.upload(self.alice, os.urandom(2000))
        old_protected = await self.upload(self.alice, os.urandom(2000))
        old_but_read = await self.upload(self.alice, os.urandom(2000))
        new = await self.upload(self.alice, os.urandom(2000))
        for media_id in (old_big, old_small, old_quarantined, old_protected, old_but_read):
            await self.sql(
                "UPDATE local_media_repository SET created_ts = ? WHERE media_id = ?",
                now - 10 * DAY_MS, media_id,
            )  # fmt: skip
        await self.sql(
            "UPDATE local_media_repository SET last_access_ts = ? WHERE media_id = ?",
            now, old_but_read,
        )  # fmt: skip
        await self.admin_call("POST", f"/media/quarantine/{SERVER_NAME}/{old_quarantined}")
        await self.admin_call("POST", f"/media/protect/{old_protected}")
        body = await self.admin_call("POST", "/media/delete?before_ts=1600000000", code=400)
        self.assertEqual(body["errcode"], "M_INVALID_PARAM")
        body = await self.admin_call("POST", "/media/delete", code=400)
        self.assertEqual(body["errcode"], "M_MISSING_PARAM")
        before = now - DAY_MS
        body = await self.admin_call("POST", f"/media/delete?before_ts={before}&size_gt=100")
        self.assertEqual(body, {"deleted_media": [old_big], "total": 1})
        body = await self.admin_call("POST", f"/media/{SERVER_NAME}/delete?before_ts={before}")
        self.assertEqual(body, {"deleted_media": [old_small], "total": 1})
        body = await self.admin_call("POST", f"/media/{REMOTE}/delete?before_ts={before}", code=400)
        left = {r[0] for r in await self.sql("SELECT media_id FROM local_media_repository")}
        self.assertEqual(left, {old_quarantined, old_protected, old_but_read, new})

    async def test_keep_profiles(self) -> None:
        avatar = await self.upload(self.alice, os.urandom(100))
        plain = await self.upload(self.alice, os.urandom(100))
        await self.sql("CREATE TABLE profiles (user_id TEXT, displayname TEXT, avatar_url TEXT)")
        await self.sql(
            "INSERT INTO profiles VALUES ('alice', 'Alice', ?)", f"mxc://{SERVER_NAME}/{avatar}"
        )
        await self.start_server()
        admin = await self.register("root2", admin=True)
        later = int(time.time() * 1000) + DAY_MS
        body = await self.admin_call("POST", f"/media/delete?before_ts={later}", token=admin)
        self.assertEqual(body["deleted_media"], [plain])
        body = await self.admin_call(
            "POST", f"/media/delete?before_ts={later}&keep_profiles=false", token=admin
        )
        self.assertEqual(body["deleted_media"], [avatar])

    async def test_purge_remote_cache(self) -> None:
        now = int(time.time() * 1000)
        stale = await self.cache_remote("stale", b"old", accessed=now - 10 * DAY_MS)
        await self.cache_remote("fresh", b"new", accessed=now)
        await self.cache_remote("quarantined", b"bad", accessed=now - 10 * DAY_MS)
        await self.admin_call("POST", f"/media/quarantine/{REMOTE}/quarantined")
        body = await self.admin_call("POST", f"/purge_media_cache?before_ts={now - DAY_MS}")
        self.assertEqual(body, {"deleted": 1})
        self.assertFalse(os.path.exists(stale))
        left = {r[0] for r in await self.sql("SELECT media_id FROM remote_media_cache")}
        self.assertEqual(left, {"fresh", "quarantined"})
        await self.admin_call("POST", "/purge_media_cache?before_ts=-5", code=400)
        await self.admin_call("POST", "/purge_media_cache?before_ts=1000", code=400)

    async def test_list_and_delete_a_users_media(self) -> None:
        ids = []
        for i in range(5):
            media_id = await self.upload(self.alice, os.urandom(10 + i), filename=f"f{i}")
            await self.sql(
                "UPDATE local_media_repository SET created_ts = ? WHERE media_id = ?",
                1_700_000_000_000 + i, media_id,
            )  # fmt: skip
            ids.append(media_id)
        user = f"@alice:{SERVER_NAME}"
        body = await self.admin_call("GET", f"/users/{user}/media?limit=2")
        # Newest first by default.
        self.assertEqual([m["media_id"] for m in body["media"]], [ids[4], ids[3]])
        self.assertEqual((body["total"], body["next_token"]), (5, 2))
        self.assertEqual(
            set(body["media"][0]),
            {"media_id", "media_type", "media_length", "upload_name", "created_ts", "url_cache",
             "last_access_ts", "quarantined_by", "safe_from_quarantine", "user_id",
             "authenticated", "sha256"},
        )  # fmt: skip
        body = await self.admin_call(
            "GET", f"/users/{user}/media?from=2&limit=10&order_by=media_length"
        )
        self.assertEqual([m["media_id"] for m in body["media"]], ids[2:])
        self.assertNotIn("next_token", body)
        body = await self.admin_call(
            "GET", f"/users/{user}/media?order_by=upload_name&dir=b&limit=1"
        )
        self.assertEqual(body["media"][0]["upload_name"], "f4")
        for bad in ("order_by=nope", "dir=x", "limit=-1"):
            r = await self.admin_call("GET", f"/users/{user}/media?{bad}", code=400)
            self.assertEqual(r["errcode"], "M_INVALID_PARAM")
        r = await self.admin_call("GET", "/users/@alice:elsewhere/media", code=400)
        self.assertEqual(r["error"], "Can only look up local users")
        r = await self.admin_call("GET", f"/users/@nobody:{SERVER_NAME}/media", code=404)
        self.assertEqual(r["error"], "Unknown user")

        body = await self.admin_call("DELETE", f"/users/{user}/media?limit=2&order_by=created_ts")
        self.assertEqual(body, {"deleted_media": ids[:2], "total": 2})
        body = await self.admin_call("GET", f"/users/{user}/media")
        self.assertEqual(body["total"], 3)
        self.assertEqual(await self.status(f"{DOWNLOAD}/{ids[0]}"), 404)

    async def test_users_media_by_creation_time_in_pages(self) -> None:
        # Three made at the same millisecond: ties go by media ID ascending,
        # whichever the direction, as in Synapse.
        created = [1_700_000_000_000 + t for t in (5, 3, 3, 3, 1)]
        ids = []
        for ts in created:
            media_id = await self.upload(self.alice, os.urandom(10))
            await self.sql(
                "UPDATE local_media_repository SET created_ts = ? WHERE media_id = ?",
                ts, media_id,
            )  # fmt: skip
            ids.append(media_id)
        await self.upload(self.admin, b"not alice's")
        ties = sorted(ids[1:4])
        newest = [ids[0], *ties, ids[4]]
        oldest = [ids[4], *ties, ids[0]]
        user = f"@alice:{SERVER_NAME}"
        for query, expected in (
            ("", newest),
            ("&order_by=created_ts&dir=b", newest),
            ("&order_by=created_ts", oldest),
            ("&dir=f", oldest),
        ):
            listed: list[str] = []
            start: int | None = 0
            while start is not None:
                body = await self.admin_call(
                    "GET", f"/users/{user}/media?limit=2&from={start}{query}"
                )
                self.assertEqual(body["total"], 5)
                listed += [m["media_id"] for m in body["media"]]
                start = body.get("next_token")
            self.assertEqual(listed, expected, query)

    async def test_usage_statistics(self) -> None:
        bob = await self.register("bob")
        for size in (100, 200):
            await self.upload(self.alice, os.urandom(size))
        await self.upload(bob, os.urandom(1000))
        body = await self.admin_call("GET", "/statistics/users/media")
        self.assertEqual(
            body,
            {
                "users": [
                    {"user_id": f"@alice:{SERVER_NAME}", "displayname": None,
                     "media_count": 2, "media_length": 300},
                    {"user_id": f"@bob:{SERVER_NAME}", "displayname": None,
                     "media_count": 1, "media_length": 1000},
                ],
                "total": 2,
            },
        )  # fmt: skip
        body = await self.admin_call(
            "GET", "/statistics/users/media?order_by=media_length&dir=b&limit=1"
        )
        self.assertEqual([u["user_id"] for u in body["users"]], [f"@bob:{SERVER_NAME}"])
        self.assertEqual(body["next_token"], 1)
        body = await self.admin_call("GET", "/statistics/users/media?search_term=ali")
        self.assertEqual([u["user_id"] for u in body["users"]], [f"@alice:{SERVER_NAME}"])
        # LIKE wildcards in the term are literal.
        body = await self.admin_call("GET", "/statistics/users/media?search_term=%25")
        self.assertEqual(body["users"], [])
        await self.admin_call("GET", "/statistics/users/media?search_term=", code=400)
        await self.admin_call("GET", "/statistics/users/media?from_ts=10&until_ts=5", code=400)
        body = await self.admin_call(
            "GET", f"/statistics/users/media?from_ts={int(time.time() * 1000) + DAY_MS}"
        )
        self.assertEqual(body, {"users": [], "total": 0})


class AdminMediaPostgresTests(AdminMediaTests):
    engine = "psycopg2"


class SynapseDatabaseTests(AdminTestCase):
    """The server on a database that looks like Synapse's (it has
    ``schema_version`` and ``background_updates``)."""

    async def become_synapses(self, pending_updates: list[str]) -> None:
        await self.sql("CREATE TABLE schema_version (version INTEGER)")
        await self.sql(
            "CREATE TABLE background_updates (update_name TEXT, progress_json TEXT,"
            " depends_on TEXT, ordering INTEGER)"
        )
        for name in pending_updates:
            await self.sql("INSERT INTO background_updates VALUES (?, '{}', NULL, 0)", name)
        self.patch(quarantine_module, "_HASH_INDEX_RECHECK_SECONDS", 0.0)
        await self.start_server()
        self.admin = await self.register("root2", admin=True)
        self.alice = await self.register("alice2")

    async def test_hash_lookups_wait_for_synapses_indexes(self) -> None:
        await self.become_synapses(["remote_media_cache_sha256_idx"])
        data = os.urandom(500)
        first = await self.upload(self.alice, data)
        await self.sql(
            "UPDATE local_media_repository SET quarantined_by = 'x' WHERE media_id = ?", first
        )
        # Synapse is still indexing hashes: no lookup, as in Synapse.
        second = await self.upload(self.alice, data)
        self.assertEqual(await self.status(f"{DOWNLOAD}/{second}"), 200)
        await self.sql("DELETE FROM background_updates")
        third = await self.upload(self.alice, data)
        self.assertEqual(await self.status(f"{DOWNLOAD}/{third}"), 404)

    async def test_synapse_database_before_the_changes_table(self) -> None:
        await self.sql("DROP TABLE quarantined_media_changes")
        await self.become_synapses([])
        media_id = await self.upload(self.alice, os.urandom(100))
        await self.admin_call("POST", f"/media/quarantine/{SERVER_NAME}/{media_id}")
        self.assertEqual(await self.status(f"{DOWNLOAD}/{media_id}"), 404)
        body = await self.admin_call("GET", "/media/quarantine_changes")
        self.assertEqual(body, {"next_batch": 0, "changes": []})

    async def test_quarantine_records_on_synapses_database(self) -> None:
        await self.become_synapses([])
        media_id = await self.upload(self.alice, os.urandom(100))
        path = f"/media/quarantine/{SERVER_NAME}/{media_id}"
        if self.engine == "sqlite3":
            # Synapse on SQLite counts stream IDs in memory: only it may write.
            body = await self.admin_call("POST", path, code=400)
            self.assertIn("through Synapse", body["error"])
            self.assertEqual(await self.status(f"{DOWNLOAD}/{media_id}"), 200)
            return
        await self.admin_call("POST", path)
        rows = await self.sql(
            "SELECT instance_name, origin, media_id, quarantined FROM quarantined_media_changes"
        )
        self.assertEqual(rows, [("mediarepo", None, media_id, True)])
        sequence = await self.sql("SELECT last_value FROM quarantined_media_id_seq")
        stream_id = await self.sql("SELECT stream_id FROM quarantined_media_changes")
        self.assertEqual(sequence[0][0], stream_id[0][0])


class SynapseDatabasePostgresTests(SynapseDatabaseTests):
    engine = "psycopg2"

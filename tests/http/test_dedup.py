"""Identical uploads share their bytes on disk, each media keeping its own
Synapse path and row."""

from __future__ import annotations

import os
import time

from twisted.internet import defer

from mediarepo.media.paths import local_media_path
from tests.utils import SERVER_NAME, ServerTestCase

DOWNLOAD = f"/_matrix/client/v1/media/download/{SERVER_NAME}"


class DeduplicationTests(ServerTestCase):
    def path_of(self, media_id: str) -> str:
        return os.path.join(self.media_store, local_media_path(media_id))

    async def test_identical_uploads_share_bytes(self) -> None:
        token = await self.register()
        data = os.urandom(300_000)
        first = await self.upload(token, data)
        second = await self.upload(token, data, "text/plain", "again.txt")
        different = await self.upload(token, os.urandom(300_000))
        self.assertNotEqual(first, second)
        self.assertEqual(os.stat(self.path_of(first)).st_ino, os.stat(self.path_of(second)).st_ino)
        self.assertNotEqual(
            os.stat(self.path_of(first)).st_ino, os.stat(self.path_of(different)).st_ino
        )
        # Each has its own row, type and name.
        r = await self.request("GET", f"{DOWNLOAD}/{second}", token=token)
        self.assertEqual((r.body, r.header("Content-Type")), (data, "text/plain; charset=UTF-8"))
        # Removing one media's file leaves the other's bytes.
        os.unlink(self.path_of(first))
        r = await self.request("GET", f"{DOWNLOAD}/{second}", token=token)
        self.assertEqual((r.code, r.body), (200, data))
        # A third copy links to the one still there.
        third = await self.upload(token, data)
        self.assertEqual(os.stat(self.path_of(third)).st_ino, os.stat(self.path_of(second)).st_ino)

    async def test_concurrent_identical_uploads(self) -> None:
        token = await self.register()
        data = os.urandom(1_000_000)
        ids = await defer.gatherResults(
            [defer.ensureDeferred(self.upload(token, data)) for _ in range(8)]
        )
        self.assertEqual(len(set(ids)), 8)
        for media_id in ids:
            r = await self.request("GET", f"{DOWNLOAD}/{media_id}", token=token)
            self.assertEqual(r.body, data)
        self.assertEqual(os.listdir(os.path.join(self.media_store, ".mediarepo_tmp")), [])

    def stage_crashed_upload(self, media_id: str, data: bytes, link_to: str | None) -> None:
        """Leave what an upload killed between publishing and recording its
        row leaves: an old staging file and the published final file."""
        staged = self.stale_staging_file(media_id, data)
        final = self.path_of(media_id)
        os.makedirs(os.path.dirname(final), exist_ok=True)
        os.link(self.path_of(link_to) if link_to else staged, final)

    def stale_staging_file(self, media_id: str, data: bytes) -> str:
        staged = os.path.join(self.media_store, ".mediarepo_tmp", f"{media_id}.deadbeef")
        with open(staged, "wb") as f:
            f.write(data)
        old = time.time() - 2 * 3600
        os.utime(staged, (old, old))
        return staged

    async def test_sweep_removes_links_of_crashed_uploads(self) -> None:
        token = await self.register()
        data = os.urandom(50_000)
        kept = await self.upload(token, data)
        # A crashed upload of the same bytes, deduplicated into a link to kept's.
        self.stage_crashed_upload("crashedduplicateuploadxx", data, link_to=kept)
        # A crashed PUT into a reservation, which must stay fillable.
        r = await self.request("POST", "/_matrix/media/v1/create", token=token)
        reserved = r.json()["content_uri"].rsplit("/", 1)[1]
        self.stage_crashed_upload(reserved, b"half a put", link_to=None)

        self.assertEqual(await self.server.uploads.sweep_staging(), 2)
        self.assertFalse(os.path.exists(self.path_of("crashedduplicateuploadxx")))
        self.assertFalse(os.path.exists(self.path_of(reserved)))
        self.assertEqual(os.listdir(os.path.join(self.media_store, ".mediarepo_tmp")), [])
        r = await self.request("GET", f"{DOWNLOAD}/{kept}", token=token)
        self.assertEqual((r.code, r.body), (200, data))
        r = await self.request(
            "PUT", f"/_matrix/media/v3/upload/{SERVER_NAME}/{reserved}", token=token, body=b"whole"
        )
        self.assertEqual(r.code, 200, r.body)
        r = await self.request("GET", f"{DOWNLOAD}/{reserved}", token=token)
        self.assertEqual(r.body, b"whole")
        # A stale staging file of media that has its row leaves the media alone.
        self.stale_staging_file(kept, data)
        self.assertEqual(await self.server.uploads.sweep_staging(), 1)
        self.assertTrue(os.path.exists(self.path_of(kept)))


class DeduplicationPostgresTests(DeduplicationTests):
    engine = "psycopg2"

"""Identical uploads share their bytes on disk, each media keeping its own
Synapse path and row."""

from __future__ import annotations

import os

from twisted.internet import defer

from mediarepo.media.paths import local_media_path
from tests.utils import SERVER_NAME, ServerTestMixin, on_both_databases

DOWNLOAD = f"/_matrix/client/v1/media/download/{SERVER_NAME}"


@on_both_databases
class DeduplicationTests(ServerTestMixin):
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

"""last_access_ts: noted in memory on each read, written in batches."""

from __future__ import annotations

import time

from mediarepo.app import MediaServer
from mediarepo.storage.media_rows import MediaRows
from tests.utils import SERVER_NAME, ServerTestCase

DOWNLOAD = f"/_matrix/client/v1/media/download/{SERVER_NAME}"


class AccessTimeTests(ServerTestCase):
    async def last_access(self, server: MediaServer, media_id: str) -> object:
        assert server.database is not None
        rows = await server.database.run_query(
            "t", "SELECT last_access_ts FROM local_media_repository WHERE media_id = ?", (media_id,)
        )
        return rows[0][0]

    async def test_reads_are_written_by_the_flush(self) -> None:
        token = await self.register()
        media_id = await self.upload(token, b"read me")
        self.assertIsNone(await self.last_access(self.server, media_id))
        before = int(time.time() * 1000)
        for _ in range(3):
            r = await self.request("GET", f"{DOWNLOAD}/{media_id}", token=token)
            self.assertEqual(r.code, 200)
        # Reads wrote nothing yet.
        self.assertIsNone(await self.last_access(self.server, media_id))
        assert self.server.repository is not None
        self.assertEqual(self.server.repository.access.pending, 1)
        await self.server.repository.access.flush()
        written = await self.last_access(self.server, media_id)
        assert isinstance(written, int)
        self.assertTrue(before <= written <= int(time.time() * 1000))
        self.assertEqual(self.server.repository.access.pending, 0)

    async def test_an_older_batch_never_undoes_a_newer_read(self) -> None:
        """Processes flush in any order: the latest read stays."""
        token = await self.register()
        media_id = await self.upload(token, b"read me")
        assert self.server.database is not None
        store = MediaRows(self.server.database)
        await store.update_access_times({media_id: 2_000}, {})
        await store.update_access_times({media_id: 1_000}, {})
        self.assertEqual(await self.last_access(self.server, media_id), 2_000)
        await store.update_access_times({media_id: 3_000}, {})
        self.assertEqual(await self.last_access(self.server, media_id), 3_000)

    async def test_shutdown_flushes(self) -> None:
        token = await self.register()
        media_id = await self.upload(token, b"read me")
        r = await self.request(
            "GET",
            f"/_matrix/client/v1/media/thumbnail/{SERVER_NAME}/{media_id}?width=1&height=1",
            token=token,
        )
        self.assertEqual(r.code, 400)  # not an image; still a read of the media
        await self.server.stop()
        await self.start_server()
        self.assertIsNotNone(await self.last_access(self.server, media_id))


class AccessTimePostgresTests(AccessTimeTests):
    engine = "psycopg2"

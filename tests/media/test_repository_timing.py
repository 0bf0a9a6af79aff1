"""MediaRepository's rules in time, on a test clock: a download of a
reservation waits for its content up to ``timeout_ms``, looking again at
each poll; a row read is served from memory for ``METADATA_CACHE_SECONDS``,
so that a change another process made and did not announce is obeyed
within that bound, and one it announced at once."""

from __future__ import annotations

from twisted.internet import defer

from mediarepo.errors import MatrixError, NotFoundError
from mediarepo.media.pending import POLL_SECONDS
from mediarepo.media.repository import MediaDownload
from mediarepo.media.thumbnails import METADATA_CACHE_SECONDS
from tests.media.media_layer import MediaLayerTestCase


class PendingUploadTests(MediaLayerTestCase):
    def download(self, media_id: str, timeout_ms: int) -> defer.Deferred[MediaDownload]:
        return defer.ensureDeferred(
            self.repository.get_local_media(
                media_id, allow_authenticated=True, timeout_ms=timeout_ms
            )
        )

    async def test_times_out_at_timeout_ms(self) -> None:
        media_id = await self.reserve()
        downloading = self.download(media_id, 600)
        # Looked at again after a poll, then for what is left of the timeout.
        await self.clock.waiting(POLL_SECONDS)
        self.clock.advance(POLL_SECONDS)
        await self.clock.waiting(0.6 - POLL_SECONDS)
        self.clock.advance(0.6 - POLL_SECONDS - 0.001)
        self.assertNoResult(downloading)
        self.clock.advance(0.001)
        with self.assertRaises(MatrixError) as raised:
            await downloading
        self.assertEqual(
            (raised.exception.code, raised.exception.errcode), (504, "M_NOT_YET_UPLOADED")
        )

    async def test_content_wakes_the_download_at_once(self) -> None:
        media_id = await self.reserve()
        downloading = self.download(media_id, 20_000)
        await self.clock.waiting(POLL_SECONDS)
        self.assertEqual(self.arrivals.waiting(media_id), 1)
        waited_from = self.clock.seconds()
        await self.fill(media_id, b"arrived")
        download = await downloading
        self.assertEqual(download.file.length, len(b"arrived"))
        self.assertEqual(self.clock.seconds(), waited_from)
        self.assertEqual(self.arrivals.waiting(media_id), 0)

    async def test_content_landing_unannounced_is_seen_at_the_next_poll(self) -> None:
        """As when a Synapse media worker, or a process on SQLite, fills it."""
        media_id = await self.reserve()
        downloading = self.download(media_id, 20_000)
        await self.clock.waiting(POLL_SECONDS)
        self.patch(self.arrivals, "announce", lambda media_id: None)
        await self.fill(media_id, b"arrived elsewhere")
        self.assertNoResult(downloading)
        self.clock.advance(POLL_SECONDS)
        download = await downloading
        self.assertEqual(download.file.length, len(b"arrived elsewhere"))

    async def test_expired_reservation_is_not_waited_for(self) -> None:
        media_id = await self.reserve()
        self.clock.advance(self.config.unused_expiration_time_ms / 1000 + 1)
        await self.assertFailure(self.download(media_id, 20_000), NotFoundError)
        self.assertEqual(self.clock.getDelayedCalls(), [])


class PendingUploadPostgresTests(PendingUploadTests):
    engine = "psycopg2"


class CachedRowTests(MediaLayerTestCase):
    async def served(self, media_id: str) -> bool:
        try:
            await self.repository.get_local_media(media_id, allow_authenticated=True, timeout_ms=0)
        except NotFoundError:
            return False
        return True

    async def quarantine_elsewhere(self, media_id: str) -> None:
        """Another process (Synapse's admin API, another host) quarantines it."""
        await self.database.run_query(
            "t",
            "UPDATE local_media_repository SET quarantined_by = ? WHERE media_id = ?",
            ("@admin:elsewhere", media_id),
        )

    async def test_unannounced_change_obeyed_within_the_bound(self) -> None:
        media_id = await self.upload(b"cached")
        self.assertTrue(await self.served(media_id))
        await self.quarantine_elsewhere(media_id)
        # The row read a moment ago is served until it is that old...
        self.clock.advance(METADATA_CACHE_SECONDS - 0.001)
        self.assertTrue(await self.served(media_id))
        # ... not a moment longer.
        self.clock.advance(0.001)
        self.assertFalse(await self.served(media_id))

    async def test_reading_does_not_prolong_the_row(self) -> None:
        media_id = await self.upload(b"read all the time")
        for _ in range(10):
            self.assertTrue(await self.served(media_id))
            self.clock.advance(METADATA_CACHE_SECONDS / 10)
        await self.quarantine_elsewhere(media_id)
        self.assertFalse(await self.served(media_id))

    async def test_announced_change_obeyed_at_once(self) -> None:
        media_id = await self.upload(b"cached")
        self.assertTrue(await self.served(media_id))
        await self.quarantine_elsewhere(media_id)
        self.repository.media_changed_elsewhere(f"/{media_id}")
        self.assertFalse(await self.served(media_id))

    async def test_everything_announced_obeyed_at_once(self) -> None:
        media_ids = [await self.upload(b"one"), await self.upload(b"two")]
        for media_id in media_ids:
            self.assertTrue(await self.served(media_id))
            await self.quarantine_elsewhere(media_id)
        self.repository.media_changed_elsewhere("*")
        for media_id in media_ids:
            self.assertFalse(await self.served(media_id))


class CachedRowPostgresTests(CachedRowTests):
    engine = "psycopg2"

"""What a crash leaves is finished or undone after the restart, on SQLite
and PostgreSQL.

* Thumbnails of acknowledged uploads (POST, and create then PUT) are
  recorded as owed with the upload, before the answer; what a dead process
  owed is taken over once, by one process, and made; a note about media
  that never got its row, and work that failed too often, are dropped.
* A PUT that died between linking its file and recording it (the
  reservation still pending, a file in place, the upload lock held by the
  dead process) does not block the client's retry: the retry gets 200 and
  the download its bytes.

The fault suite (tests/faults/test_crash.py) kills real processes; these
tests build the same states directly, so that each case is certain to occur.
"""

from __future__ import annotations

import os
from typing import Any

from mediarepo.media.locks import instance_name
from mediarepo.media.paths import local_media_path
from mediarepo.media.thumbnail_sources import ThumbnailSource
from mediarepo.storage.pending_thumbnail_rows import LOCAL_ORIGIN
from tests import images
from tests.http.test_async_upload import DOWNLOAD, AsyncUploadTestCase
from tests.utils import SERVER_NAME, dead_instance_name

THUMBNAIL = f"/_matrix/client/v1/media/thumbnail/{SERVER_NAME}"


class PendingThumbnailTests(AsyncUploadTestCase):
    def crash_after_answers(self) -> None:
        """From now, nothing is made after an upload's answer, as when the
        process dies right after sending it."""
        thumbnails = self.thumbnails

        def never(source: ThumbnailSource) -> None:
            pass

        thumbnails.schedule_pregeneration = never
        self.addCleanup(delattr, thumbnails, "schedule_pregeneration")

    @property
    def thumbnails(self) -> Any:
        assert self.server.repository is not None
        return self.server.repository.thumbnails

    async def pending(self) -> list[tuple[Any, ...]]:
        return await self.sql(
            "SELECT media_origin, media_id, instance_name, attempts"
            " FROM mediarepo_pending_thumbnails ORDER BY media_id"
        )

    async def thumbnail_count(self, media_id: str) -> int:
        rows = await self.sql(
            "SELECT COUNT(*) FROM local_media_repository_thumbnails WHERE media_id = ?", media_id
        )
        return int(rows[0][0])

    async def test_recorded_with_the_upload_and_cleared_when_made(self) -> None:
        media_id = await self.upload(self.token, images.png(200, 150), "image/png")
        await self.thumbnails.settle()
        self.assertGreater(await self.thumbnail_count(media_id), 0)
        self.assertEqual(await self.pending(), [])
        # Media that gets no thumbnails is not recorded at all.
        await self.upload(self.token, b"plain text", "text/plain")
        self.assertEqual(await self.pending(), [])

    async def test_crashed_work_is_resumed_once(self) -> None:
        self.crash_after_answers()
        posted = await self.upload(self.token, images.jpeg(320, 200), "image/jpeg")
        reserved = await self.reserve()
        r = await self.put(reserved, images.png(100, 80), headers={"Content-Type": "image/png"})
        self.assertEqual(r.code, 200, r.body)
        await self.upload(self.token, b"no thumbnails", "text/plain")
        owner = self.thumbnails.pending.instance_name
        self.assertEqual(
            await self.pending(),
            sorted([(LOCAL_ORIGIN, posted, owner, 0), (LOCAL_ORIGIN, reserved, owner, 0)],
                   key=lambda row: row[1]),
        )  # fmt: skip
        # (Asked for now, one would be made on demand; the rows show the loss.)
        self.assertEqual(
            await self.thumbnail_count(posted), 0, "the work was lost with the process"
        )

        # A live owner's work, its lease running, is nobody else's.
        self.assertEqual(await self.thumbnails.pending.resume(self.thumbnails._resume), 0)
        self.assertEqual(len(await self.pending()), 2)

        # The owner dies; a note about media whose row never came is left too.
        dead = dead_instance_name()
        await self.sql("UPDATE mediarepo_pending_thumbnails SET instance_name = ?", dead)
        await self.sql(
            "INSERT INTO mediarepo_pending_thumbnails (media_origin, media_id, instance_name,"
            " lease_until_ts, attempts) VALUES ('', 'neverstoredmediaid', ?, 0, 0)",
            dead,
        )
        # Two processes resume at once: each item is done by one of them.
        other = type(self.thumbnails.pending)(
            self.thumbnails.pending.store, instance_name(), self.server.reactor
        )
        first, second = await _both(
            self.thumbnails.pending.resume(self.thumbnails._resume),
            other.resume(self.thumbnails._resume),
        )
        self.assertEqual(first + second, 3)
        self.assertEqual(await self.pending(), [])
        self.assertGreater(await self.thumbnail_count(posted), 0)
        self.assertGreater(await self.thumbnail_count(reserved), 0)
        for media_id in (posted, reserved):
            r = await self.request(
                "GET", f"{THUMBNAIL}/{media_id}?width=32&height=32&method=crop", token=self.token
            )
            self.assertEqual(r.code, 200, r.body)

    async def test_resumed_at_start(self) -> None:
        self.crash_after_answers()
        media_id = await self.upload(self.token, images.png(64, 64), "image/png")
        await self.sql(
            "UPDATE mediarepo_pending_thumbnails SET instance_name = ?", dead_instance_name()
        )
        await self.server.stop()
        await self.start_server()
        await self.thumbnails.pending.wait_idle()  # the run begun at start
        self.assertEqual(await self.pending(), [])
        self.assertGreater(await self.thumbnail_count(media_id), 0)

    async def test_work_failing_again_and_again_is_given_up(self) -> None:
        self.crash_after_answers()
        media_id = await self.upload(self.token, images.png(64, 64), "image/png")
        await self.sql(
            "UPDATE mediarepo_pending_thumbnails SET instance_name = ?, attempts = 3",
            dead_instance_name(),
        )
        self.assertEqual(await self.thumbnails.pending.resume(self.thumbnails._resume), 0)
        self.assertEqual(await self.pending(), [])
        self.assertEqual(await self.thumbnail_count(media_id), 0)

    async def test_lapsed_lease_is_taken_over(self) -> None:
        self.crash_after_answers()
        media_id = await self.upload(self.token, images.png(64, 64), "image/png")
        # Owned by a process this one cannot judge (another host), lease over.
        await self.sql(
            "UPDATE mediarepo_pending_thumbnails SET instance_name = ?, lease_until_ts = 1",
            "mediarepo-elsewhere-1-abcdef",
        )
        self.assertEqual(await self.thumbnails.pending.resume(self.thumbnails._resume), 1)
        self.assertGreater(await self.thumbnail_count(media_id), 0)
        self.assertEqual(await self.pending(), [])


class PendingThumbnailPostgresTests(PendingThumbnailTests):
    engine = "psycopg2"


class InterruptedPutTests(AsyncUploadTestCase):
    async def leave_interrupted_put(self, holder: str) -> str:
        """A reservation as a PUT that died after linking its file leaves it."""
        media_id = await self.reserve()
        final = os.path.join(self.media_store, local_media_path(media_id))
        os.makedirs(os.path.dirname(final), exist_ok=True)
        with open(final, "wb") as f:
            f.write(b"the bytes of the upload that died")
        staging = os.path.join(self.media_store, ".mediarepo_tmp", f"{media_id}.abcdefgh")
        os.link(final, staging)
        now_ms = int(self.server.reactor.seconds() * 1000)
        await self.sql(
            "INSERT INTO worker_locks (lock_name, lock_key, instance_name, token,"
            " last_renewed_ts) VALUES ('upload_media', ?, ?, 'deadtoken', ?)",
            media_id, holder, now_ms,
        )  # fmt: skip
        return media_id

    async def test_retried_put_completes(self) -> None:
        media_id = await self.leave_interrupted_put(dead_instance_name())
        data = os.urandom(5000)
        r = await self.put(media_id, data)
        self.assertEqual((r.code, r.json()), (200, {}))
        r = await self.request("GET", f"{DOWNLOAD}/{media_id}", token=self.token)
        self.assertEqual((r.code, r.body), (200, data))
        # Now it has content: a further PUT is refused as the spec says.
        r = await self.put(media_id, b"again")
        self.assertEqual((r.code, r.json()["errcode"]), (409, "M_CANNOT_OVERWRITE_MEDIA"))
        # The dead upload's staging name goes with the sweep, the file stays.
        old = self.server.reactor.seconds() - 7200
        staging = os.path.join(self.media_store, ".mediarepo_tmp")
        for name in os.listdir(staging):
            os.utime(os.path.join(staging, name), (old, old))
        assert self.server.repository is not None
        await self.server.uploads.sweep_staging()
        self.assertEqual(os.listdir(staging), [])
        r = await self.request("GET", f"{DOWNLOAD}/{media_id}", token=self.token)
        self.assertEqual((r.code, r.body), (200, data))

    async def test_upload_under_way_elsewhere_still_excludes(self) -> None:
        # The lock's holder is alive (here: this very process, as another
        # instance): its upload is under way, not interrupted.
        media_id = await self.leave_interrupted_put(instance_name())
        r = await self.put(media_id, b"second writer")
        self.assertEqual((r.code, r.json()["errcode"]), (409, "M_CANNOT_OVERWRITE_MEDIA"))


class InterruptedPutPostgresTests(InterruptedPutTests):
    engine = "psycopg2"


async def _both(first: Any, second: Any) -> tuple[int, int]:
    from twisted.internet import defer

    results = await defer.gatherResults([defer.ensureDeferred(first), defer.ensureDeferred(second)])
    return int(results[0]), int(results[1])

"""The storage provider chain against a real S3-compatible server (moto in
server mode) and a directory provider."""

from __future__ import annotations

import hashlib
import os
import socket
import sys
import tempfile
import time
import tracemalloc
from typing import Any

from twisted.internet import reactor, task
from twisted.internet.threads import deferToThread

from mediarepo.media import local_cache, provider_tasks
from mediarepo.media.paths import local_media_path, local_thumbnail_dir
from mediarepo.media.providers import s3 as s3_provider
from tests import images
from tests.s3 import BUCKET, MotoServer
from tests.utils import SERVER_NAME, ServerTestCase, next_return, port_number

DOWNLOAD = f"/_matrix/client/v1/media/download/{SERVER_NAME}"
THUMBNAIL = f"/_matrix/client/v1/media/thumbnail/{SERVER_NAME}"
ADMIN = "/_synapse/admin/v1"


def _download_discarding(port: int, path: str, token: str) -> tuple[int, str]:
    """GET ``path`` over a plain socket, keeping only the body's length and
    SHA-256 (blocking: run it in a thread)."""
    digest = hashlib.sha256()
    length = 0
    head = b""
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        sock.sendall(
            f"GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"
            "Connection: close\r\n\r\n".encode()
        )
        in_body = False
        while data := sock.recv(65536):
            if not in_body:
                head += data
                if b"\r\n\r\n" not in head:
                    continue
                head, _, data = head.partition(b"\r\n\r\n")
                in_body = True
            digest.update(data)
            length += len(data)
    assert head.startswith(b"HTTP/1.1 200"), head
    return length, digest.hexdigest()


class S3TestCase(ServerTestCase):
    # Extra entries of the provider's config, per test class.
    provider_flags: dict[str, Any] = {}
    # Extra options of the provider's own ``config``, per test class.
    provider_options: dict[str, Any] = {}
    start_moto = True

    async def set_up(self) -> None:
        # A store that is down answers at once: botocore's own retries (with
        # up to seconds of backoff) are not what these tests are about.
        self.patch(s3_provider, "MAX_ATTEMPTS", 1)
        log_dir = tempfile.mkdtemp(prefix="mediarepo-moto-")
        self.moto = MotoServer(log_dir)
        self.addCleanup(self.moto.release)
        if self.start_moto:
            self.moto.start()
        entry = self.moto.provider_config(**self.provider_flags)
        entry["config"].update(self.provider_options)
        self.extra_config = {"media_storage_providers": [entry], **self.more_config()}
        await super().set_up()
        self.token = await self.register()

    def more_config(self) -> dict[str, Any]:
        return {}

    def local_file(self, relative_path: str) -> str:
        return os.path.join(self.media_store, relative_path)

    async def download(self, media_id: str, headers: dict[str, str] | None = None) -> Any:
        return await self.request("GET", f"{DOWNLOAD}/{media_id}", token=self.token,
                                  headers=headers)  # fmt: skip

    async def rows(self, sql: str, *args: object) -> list[tuple[Any, ...]]:
        assert self.server.database is not None
        return await self.server.database.run_query("t", sql, args)

    async def run_tasks_until_done(self) -> None:
        """Run the queued provider tasks until none is left: the runs under
        way, then what is due. A task that fails again is due again at once
        only if the retry delay was patched to 0 before it failed."""
        tasks = self.server.repository.storage.tasks
        for _ in range(100):
            await tasks.wait_idle()
            if not await self.rows("SELECT * FROM mediarepo_provider_tasks"):
                return
            await tasks.run_due()
        self.fail("provider tasks did not finish")


class SynchronousS3Tests(S3TestCase):
    async def test_stored_in_s3_and_served_back(self) -> None:
        data = os.urandom(3_000_000)
        media_id = await self.upload(self.token, data)
        key = local_media_path(media_id)
        # Synchronous: in the bucket, under the local layout, before the answer.
        self.assertEqual(self.moto.read(key), data)

        # The local disk loses the file: served from S3, and brought back.
        os.unlink(self.local_file(key))
        kept = next_return(self, self.server.parts.local_store, "keep_incoming")
        r = await self.download(media_id)
        self.assertEqual((r.code, r.body), (200, data))
        await kept
        with open(self.local_file(key), "rb") as f:
            self.assertEqual(f.read(), data)

        # A range of a file only S3 has is served from S3 (and not kept).
        os.unlink(self.local_file(key))
        r = await self.download(media_id, {"Range": "bytes=1000-1999"})
        self.assertEqual((r.code, r.body), (206, data[1000:2000]))
        self.assertFalse(os.path.exists(self.local_file(key)))

    async def test_thumbnails_from_an_original_only_in_s3(self) -> None:
        photo = images.jpeg(800, 600)
        media_id = await self.upload(self.token, photo, "image/jpeg")
        r = await self.request(
            "GET", f"{THUMBNAIL}/{media_id}?width=96&height=96", token=self.token
        )
        self.assertEqual(r.code, 200)
        thumbnail_keys = {
            k for k in self.moto.keys() if k.startswith(local_thumbnail_dir(media_id))
        }
        self.assertEqual(len(thumbnail_keys), 5)  # Synapse's default sizes, all in S3
        # Lose the whole local store: thumbnails and originals come back from S3.
        for root, _dirs, names in os.walk(self.media_store):
            for name in names:
                if ".mediarepo_tmp" not in root:
                    os.unlink(os.path.join(root, name))
        # A new process: nothing of the old one's memory helps.
        await self.server.stop()
        await self.start_server()
        r = await self.request(
            "GET", f"{THUMBNAIL}/{media_id}?width=96&height=96", token=self.token
        )
        self.assertEqual(r.code, 200)
        r = await self.download(media_id)
        self.assertEqual(r.body, photo)

    async def test_deletion_reaches_s3(self) -> None:
        admin = await self.register("root", admin=True)
        media_id = await self.upload(self.token, images.png(64, 64), "image/png")
        await self.request("GET", f"{THUMBNAIL}/{media_id}?width=32&height=32", token=self.token)
        self.assertTrue(any(media_id[4:] in key for key in self.moto.keys()))
        r = await self.request("DELETE", f"{ADMIN}/media/{SERVER_NAME}/{media_id}", token=admin)
        self.assertEqual(r.code, 200)
        # Provider deletions go through the task queue, at once.
        await self.run_tasks_until_done()
        self.assertEqual({k for k in self.moto.keys() if media_id[4:] in k}, set())
        # A provider that cannot delete now is asked again later.
        other = await self.upload(self.token, b"to be deleted while S3 is down")
        # Failed tasks are due again at once (patched before they fail: the
        # time they are due is written when they fail).
        self.patch(provider_tasks, "RETRY_BASE_SECONDS", 0.0)
        self.moto.stop()
        r = await self.request("DELETE", f"{ADMIN}/media/{SERVER_NAME}/{other}", token=admin)
        self.assertEqual(r.code, 200)
        tasks = self.server.repository.storage.tasks
        assert tasks is not None
        await tasks.wait_idle()
        queued = await self.rows("SELECT operation, attempts FROM mediarepo_provider_tasks")
        self.assertEqual(sorted(op for op, _ in queued), ["delete", "delete_directory"])
        self.assertTrue(all(attempts >= 1 for _, attempts in queued))
        self.moto.start(create_bucket=True)
        self.moto.client().put_object(Bucket=BUCKET, Key=local_media_path(other), Body=b"x")
        await self.run_tasks_until_done()
        self.assertEqual(self.moto.keys(), set())

    async def test_purge_by_age_reaches_s3(self) -> None:
        admin = await self.register("root", admin=True)
        media_ids = [
            await self.upload(self.token, images.png(40 + i, 40), "image/png") for i in range(3)
        ]
        for media_id in media_ids:
            await self.request(
                "GET", f"{THUMBNAIL}/{media_id}?width=32&height=32", token=self.token
            )
        self.assertTrue(self.moto.keys())
        before_ts = int(time.time() * 1000) + 60_000
        r = await self.request("POST", f"{ADMIN}/media/delete?before_ts={before_ts}", token=admin)
        self.assertEqual(r.json()["total"], 3)
        # The batch's deletions were queued together and run at once.
        await self.run_tasks_until_done()
        self.assertEqual(self.moto.keys(), set())

    async def test_old_deletion_never_removes_a_newer_copy(self) -> None:
        # A PUT whose synchronous store fails leaves nothing queued against
        # the provider that failed; the PUT retried later is kept.
        r = await self.request("POST", "/_matrix/media/v1/create", token=self.token)
        media_id = r.json()["content_uri"].rsplit("/", 1)[1]
        put = f"/_matrix/media/v3/upload/{SERVER_NAME}/{media_id}"
        self.moto.stop()
        r = await self.request("PUT", put, token=self.token, body=b"first try")
        self.assertEqual(r.code, 503)
        self.moto.start()
        r = await self.request("PUT", put, token=self.token, body=b"second try")
        self.assertEqual(r.code, 200, r.body)
        self.patch(provider_tasks, "RETRY_BASE_SECONDS", 0.0)
        await self.run_tasks_until_done()
        self.assertEqual(self.moto.read(local_media_path(media_id)), b"second try")

    async def test_large_file_streams_from_s3(self) -> None:
        size = 24 * 1024 * 1024
        data = os.urandom(size)
        media_id = await self.upload(self.token, data)
        key = local_media_path(media_id)
        # Above boto3's multipart threshold the object went up in parts.
        head = self.moto.client().head_object(Bucket=BUCKET, Key=key)
        self.assertIn("-", head["ETag"])
        os.unlink(self.local_file(key))
        port = port_number(self.server.ports[0])
        tracemalloc.start()
        try:
            length, digest = await deferToThread(
                _download_discarding, port, f"{DOWNLOAD}/{media_id}", self.token
            )
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        self.assertEqual((length, digest), (size, hashlib.sha256(data).hexdigest()))
        # Python memory allocated while 24 MiB went from S3 through the server
        # (and to disk): chunks at a time, never the object.
        self.assertLess(peak, 6 * 1024 * 1024, f"peak traced memory {peak}")


class SynchronousS3PostgresTests(SynchronousS3Tests):
    engine = "psycopg2"


class UnavailableS3Tests(S3TestCase):
    start_moto = False

    async def test_synchronous_store_fails_cleanly(self) -> None:
        r = await self.request(
            "POST", "/_matrix/media/v3/upload", token=self.token, body=os.urandom(5000)
        )
        self.assertEqual((r.code, r.json()["errcode"]), (503, "M_UNKNOWN"))
        self.assertEqual(await self.rows("SELECT * FROM local_media_repository"), [])
        stored = [n for _, _, names in os.walk(self.local_file("local_content")) for n in names]
        self.assertEqual(stored, [])
        self.assertEqual(os.listdir(self.local_file(".mediarepo_tmp")), [])


class UnavailableS3PostgresTests(UnavailableS3Tests):
    engine = "psycopg2"


class AsynchronousS3Tests(S3TestCase):
    provider_flags = {"store_synchronous": False}
    start_moto = False

    async def test_copies_wait_for_the_provider(self) -> None:
        self.patch(provider_tasks, "RETRY_BASE_SECONDS", 0.0)
        data = os.urandom(100_000)
        media_id = await self.upload(self.token, data)
        r = await self.download(media_id)
        self.assertEqual((r.code, r.body), (200, data))
        tasks = self.server.repository.storage.tasks
        assert tasks is not None
        await tasks.wait_idle()
        queued = await self.rows(
            "SELECT relative_path, operation, attempts FROM mediarepo_provider_tasks"
        )
        self.assertEqual(len(queued), 1)
        self.assertEqual(queued[0][:2], (local_media_path(media_id), "store"))
        self.assertGreaterEqual(queued[0][2], 1)
        # The provider comes back: the copy is made, and the queue empties.
        self.moto.start()
        await self.run_tasks_until_done()
        self.assertEqual(self.moto.read(local_media_path(media_id)), data)

    async def test_queue_survives_a_restart(self) -> None:
        self.patch(provider_tasks, "RETRY_BASE_SECONDS", 0.0)
        media_id = await self.upload(self.token, b"queued across a restart")
        await self.server.stop()
        self.moto.start()
        # The queue is in the database: a new server picks it up.
        await self.start_server()
        await self.run_tasks_until_done()
        self.assertEqual(self.moto.read(local_media_path(media_id)), b"queued across a restart")


class AsynchronousS3PostgresTests(AsynchronousS3Tests):
    engine = "psycopg2"


class BoundedLocalStoreTests(S3TestCase):
    def more_config(self) -> dict[str, Any]:
        return {"media_store_max_size": 200_000}

    async def test_evicts_least_recently_read(self) -> None:
        # The order is the test's: no run started by the uploads below.
        self.server.parts.local_store.on_written = None
        blobs = {}
        for _ in range(6):
            data = os.urandom(60_000)
            blobs[await self.upload(self.token, data)] = data
        now = time.time()
        for age, media_id in enumerate(blobs):
            path = self.local_file(local_media_path(media_id))
            os.utime(path, (now - 10_000 + age, os.stat(path).st_mtime))
        # One file S3 does not have is never evicted, however old.
        unsafe = next(iter(blobs))
        self.moto.client().delete_object(Bucket=BUCKET, Key=local_media_path(unsafe))
        assert self.server.parts.local_cache is not None
        evicted = await self.server.parts.local_cache.run()
        self.assertEqual(evicted, 3)
        kept = {m for m in blobs if os.path.exists(self.local_file(local_media_path(m)))}
        self.assertEqual(kept, {unsafe, *list(blobs)[4:]})
        # Evicted files are still served, from S3.
        for media_id, data in blobs.items():
            r = await self.download(media_id)
            self.assertEqual(r.body, data)

    async def test_eviction_follows_writes(self) -> None:
        await evicted_after_writes(self, 200_000)


class BoundedLocalStorePostgresTests(BoundedLocalStoreTests):
    engine = "psycopg2"


async def evicted_after_writes(test: S3TestCase, max_size: int) -> None:
    """Uploads taking the store past ``max_size`` are followed, without the
    housekeeping timer, by eviction back under it (within seconds)."""
    local = test.server.parts.local_store
    assert local is not None
    for _ in range(5):
        await test.upload(test.token, os.urandom(60_000))
    written = time.monotonic()
    deadline = written + 10
    while time.monotonic() < deadline:
        size = local_cache._store_size(local.paths.base)
        if size <= max_size:
            break
        await task.deferLater(reactor, 0.02, lambda: None)
    took = time.monotonic() - written
    test.assertLessEqual(size, max_size, f"still {size} bytes after {took:.1f} s")
    print(f"\nunder media_store_max_size {took:.2f} s after the last upload", file=sys.stderr)


class BoundedLocalStoreAsyncProviderTests(S3TestCase):
    # Files become evictable only once the provider's copy, made after the
    # upload's answer, is done.
    provider_flags = {"store_synchronous": False}

    def more_config(self) -> dict[str, Any]:
        return {"media_store_max_size": 200_000}

    async def test_eviction_follows_copies(self) -> None:
        await evicted_after_writes(self, 200_000)


class BoundedLocalStoreAsyncProviderPostgresTests(BoundedLocalStoreAsyncProviderTests):
    engine = "psycopg2"


class DirectoryProviderTests(ServerTestCase):
    async def set_up(self) -> None:
        self.backup = tempfile.mkdtemp(prefix="mediarepo-backup-")
        # Synapse's legacy keys: a synchronous directory provider.
        self.extra_config = {
            "backup_media_store_path": self.backup,
            "synchronous_backup_media_store": True,
        }
        await super().set_up()

    async def test_copy_kept_and_served(self) -> None:
        token = await self.register()
        data = os.urandom(10_000)
        media_id = await self.upload(token, data)
        backup = os.path.join(self.backup, local_media_path(media_id))
        with open(backup, "rb") as f:
            self.assertEqual(f.read(), data)
        os.unlink(os.path.join(self.media_store, local_media_path(media_id)))
        kept = next_return(self, self.server.parts.local_store, "keep_incoming")
        r = await self.request("GET", f"{DOWNLOAD}/{media_id}", token=token)
        self.assertEqual((r.code, r.body), (200, data))
        await kept
        self.assertTrue(os.path.exists(os.path.join(self.media_store, local_media_path(media_id))))


class DirectoryProviderPostgresTests(DirectoryProviderTests):
    engine = "psycopg2"

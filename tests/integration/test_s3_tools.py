"""The operator tools, run as an operator runs them: ``scripts/copy_media_to_s3``
(killed midway, then resumed) and ``scripts/prune_local_media``."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any

import yaml
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThread
from twisted.trial import unittest

from mediarepo.media.paths import local_media_path, local_thumbnail_dir
from tests import images
from tests.s3 import BUCKET, MotoServer
from tests.utils import SERVER_NAME, ServerTestCase

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DAY_MS = 24 * 3600 * 1000


def _script(name: str, *args: str) -> list[str]:
    return [sys.executable, os.path.join(ROOT, "scripts", name), *args]


def _environment() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env


class CopyToS3Test(unittest.TestCase):
    def setUp(self) -> None:
        self.workdir = tempfile.mkdtemp(prefix="mediarepo-s3copy-")
        self.moto = MotoServer(self.workdir)
        self.moto.start()
        self.addCleanup(self.moto.release)
        self.store = os.path.join(self.workdir, "media_store")
        self.config_path = os.path.join(self.workdir, "homeserver.yaml")
        config = {
            "server_name": "copy.test",
            "media_store_path": self.store,
            "database": {"name": "sqlite3", "args": {"database": ":memory:"}},
            "media_storage_providers": [self.moto.provider_config()],
        }
        with open(self.config_path, "w") as f:
            yaml.safe_dump(config, f)
        # A store of a few hundred files: media, thumbnails, remote media.
        self.files: dict[str, int] = {}
        for i in range(300):
            media_id = f"media{i:05d}abcdefghijklmnop"
            self._write(local_media_path(media_id), 100 + i)
            if i % 10 == 0:
                self._write(os.path.join(local_thumbnail_dir(media_id), "32-32-image-png-crop"), 50)
        for i in range(20):
            self._write(f"remote_content/other.example/ab/cd/remote{i:04d}", 200)

    def _write(self, relative: str, size: int) -> None:
        path = os.path.join(self.store, relative)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(os.urandom(size))
        self.files[relative] = size

    def _sizes_in_bucket(self) -> dict[str, int]:
        pages = self.moto.client().get_paginator("list_objects_v2").paginate(Bucket=BUCKET)
        return {item["Key"]: item["Size"] for page in pages for item in page.get("Contents", [])}

    def test_interrupted_and_resumed(self) -> Deferred[None]:
        def run() -> None:
            argv = _script("copy_media_to_s3", "-c", self.config_path, "--concurrency", "1")
            log_path = os.path.join(self.workdir, "first-run.log")
            with open(log_path, "wb") as log:
                first = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                         env=_environment())  # fmt: skip
                deadline = time.monotonic() + 60
                while len(self._sizes_in_bucket()) < 60 and first.poll() is None:
                    self.assertLess(time.monotonic(), deadline, "the copy did not start")
                    time.sleep(0.02)
                first.send_signal(signal.SIGKILL)
                first.wait()
            self.assertEqual(first.returncode, -signal.SIGKILL, "the first run was not cut off")
            time.sleep(0.3)  # a request that reached moto whole may still be landing
            copied_before = len(self._sizes_in_bucket())
            self.assertLess(copied_before, len(self.files))

            second = subprocess.run(argv, capture_output=True, text=True, env=_environment(),
                                    timeout=300, check=False)  # fmt: skip
            self.assertEqual(second.returncode, 0, second.stderr)
            self.assertEqual(self._sizes_in_bucket(), self.files)
            self.assertIn("0 failed", second.stderr)
            # Files the killed run copied were not sent again.
            copied = int(second.stderr.split("done in")[1].split(":")[1].split("copied")[0])
            self.assertEqual(copied, len(self.files) - copied_before)
            key = local_media_path("media00007abcdefghijklmnop")
            with open(os.path.join(self.store, key), "rb") as f:
                self.assertEqual(self.moto.read(key), f.read())

            third = subprocess.run(argv, capture_output=True, text=True, env=_environment(),
                                   timeout=300, check=False)  # fmt: skip
            self.assertEqual(third.returncode, 0, third.stderr)
            self.assertIn(f"{len(self.files)} copied by earlier runs, 0 to check", third.stderr)

        return deferToThread(run)


class PruneLocalTests(ServerTestCase):
    async def set_up(self) -> None:
        self.moto = MotoServer(tempfile.mkdtemp(prefix="mediarepo-moto-"))
        self.moto.start()
        self.addCleanup(self.moto.release)
        self.extra_config = {"media_storage_providers": [self.moto.provider_config()]}
        await super().set_up()

    def write_config(self) -> str:
        path = os.path.join(self.workdir, "homeserver.yaml")
        data: dict[str, Any] = {
            "server_name": SERVER_NAME,
            "database": self.database_config,
            "media_store_path": self.media_store,
            **self.extra_config,
        }
        with open(path, "w") as f:
            yaml.safe_dump(data, f)
        return path

    async def test_prunes_what_is_old_and_safe(self) -> None:
        token = await self.register()
        old_photo = await self.upload(token, images.png(100, 80), "image/png")
        old_blob = await self.upload(token, os.urandom(5000))
        old_unsafe = await self.upload(token, os.urandom(5000))
        recent = await self.upload(token, os.urandom(5000))
        assert self.server.database is not None
        long_ago = int(time.time() * 1000) - 40 * DAY_MS
        for media_id in (old_photo, old_blob, old_unsafe):
            await self.server.database.run_query(
                "t",
                "UPDATE local_media_repository SET created_ts = ? WHERE media_id = ?",
                (long_ago, media_id),
            )
        # Wait for the photo's thumbnails, so that they are files too.
        r = await self.request(
            "GET",
            f"/_matrix/client/v1/media/thumbnail/{SERVER_NAME}/{old_photo}?width=32&height=32",
            token=token,
        )
        self.assertEqual(r.code, 200)
        self.moto.client().delete_object(Bucket=BUCKET, Key=local_media_path(old_unsafe))
        config_path = self.write_config()
        thumbnails = os.path.join(self.media_store, local_thumbnail_dir(old_photo))
        expected = 2 + len(os.listdir(thumbnails))  # two originals and the thumbnails

        def local(media_id: str) -> str:
            return os.path.join(self.media_store, local_media_path(media_id))

        dry = await deferToThread(
            subprocess.run,
            _script("prune_local_media", "-c", config_path, "--days", "30", "--dry-run"),
            capture_output=True, text=True, env=_environment(), timeout=120, check=False,
        )  # fmt: skip
        self.assertEqual(dry.returncode, 0, dry.stderr)
        self.assertIn(f"would remove {expected} local files", dry.stderr)
        self.assertTrue(os.path.exists(local(old_blob)))

        done = await deferToThread(
            subprocess.run,
            _script("prune_local_media", "-c", config_path, "--days", "30"),
            capture_output=True, text=True, env=_environment(), timeout=120, check=False,
        )  # fmt: skip
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertIn(f"removed {expected} local files", done.stderr)
        self.assertIn("1 kept (not in S3)", done.stderr)
        self.assertFalse(os.path.exists(local(old_photo)))
        self.assertFalse(os.path.exists(local(old_blob)))
        self.assertEqual(os.listdir(thumbnails), [])
        self.assertTrue(os.path.exists(local(old_unsafe)))
        self.assertTrue(os.path.exists(local(recent)))
        # Pruned media is still served, from S3.
        self.server.repository.forget_local(old_blob)
        r = await self.request(
            "GET", f"/_matrix/client/v1/media/download/{SERVER_NAME}/{old_blob}", token=token
        )
        self.assertEqual((r.code, len(r.body)), (200, 5000))


class PruneLocalPostgresTests(PruneLocalTests):
    engine = "psycopg2"


class SwitchToS3Tests(ServerTestCase):
    """The whole move: a deployment without S3 gets a provider by a config
    change and a script run, then loses its local disk and still serves
    every file."""

    async def test_switch_then_lose_the_local_disk(self) -> None:
        token = await self.register()
        photo, blob = images.jpeg(640, 480), os.urandom(300_000)
        media = {
            await self.upload(token, photo, "image/jpeg"): photo,
            await self.upload(token, blob): blob,
            await self.upload(token, b"hello"): b"hello",
        }
        thumbnail = f"/_matrix/client/v1/media/thumbnail/{SERVER_NAME}"
        photo_id = next(iter(media))
        r = await self.request("GET", f"{thumbnail}/{photo_id}?width=96&height=96", token=token)
        self.assertEqual(r.code, 200)
        thumbnail_bytes = r.body
        await self.server.stop()

        self.moto = MotoServer(self.workdir)
        self.moto.start()
        self.addCleanup(self.moto.release)
        provider = {"media_storage_providers": [self.moto.provider_config()]}
        config_path = os.path.join(self.workdir, "homeserver.yaml")
        with open(config_path, "w") as f:
            yaml.safe_dump(
                {"server_name": SERVER_NAME, "database": self.database_config,
                 "media_store_path": self.media_store, **provider}, f,
            )  # fmt: skip
        copied = await deferToThread(
            subprocess.run, _script("copy_media_to_s3", "-c", config_path),
            capture_output=True, text=True, env=_environment(), timeout=300, check=False,
        )  # fmt: skip
        self.assertEqual(copied.returncode, 0, copied.stderr)

        # The local disk is lost.
        shutil.rmtree(self.media_store)
        await self.start_server(**provider)
        for media_id, data in media.items():
            self.assertEqual(await self._body(media_id, token), data)
        r = await self.request("GET", f"{thumbnail}/{photo_id}?width=96&height=96", token=token)
        self.assertEqual((r.code, r.body), (200, thumbnail_bytes))

    async def _body(self, media_id: str, token: str) -> bytes:
        r = await self.request(
            "GET", f"/_matrix/client/v1/media/download/{SERVER_NAME}/{media_id}", token=token
        )
        self.assertEqual(r.code, 200, r.body[:200])
        return r.body


class SwitchToS3PostgresTests(SwitchToS3Tests):
    engine = "psycopg2"

"""A full disk: the media store on a small tmpfs, filled to the last page.

Uploads (small and streamed, POST and PUT into a reservation) and thumbnail
generation then answer 507 ``M_RESOURCE_LIMIT_EXCEEDED``; the first failure
is logged with its traceback and no later one is; no staging file is left
behind. Once space is freed the same requests succeed.

Mounting needs root; elsewhere the test is skipped, saying so.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import subprocess
import tempfile

from twisted.trial.unittest import SkipTest

from mediarepo.media.providers.local import STAGING_DIR
from tests import images
from tests.utils import SERVER_NAME, LogRecords, ServerTestCase

STORE_SIZE = "4m"
CREATE = "/_matrix/media/v1/create"
UPLOAD = "/_matrix/media/v3/upload"
DOWNLOAD = f"/_matrix/client/v1/media/download/{SERVER_NAME}"
THUMBNAIL = f"/_matrix/client/v1/media/thumbnail/{SERVER_NAME}"


def mount_small_store() -> str:
    """A fresh tmpfs of ``STORE_SIZE``; raises SkipTest if it cannot be mounted."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        raise SkipTest("mounting a small filesystem for the media store needs root")
    mountpoint = tempfile.mkdtemp(prefix="mediarepo-full-")
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={STORE_SIZE},mode=0755", "tmpfs", mountpoint],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        os.rmdir(mountpoint)
        raise SkipTest(f"cannot mount a tmpfs for the media store: {result.stderr.strip()}")
    return mountpoint


def unmount(mountpoint: str) -> None:
    if subprocess.run(["umount", mountpoint], capture_output=True, check=False).returncode:
        # Something still holds a file open: detach now, freed when it closes.
        subprocess.run(["umount", "-l", mountpoint], capture_output=True, check=False)
    shutil.rmtree(mountpoint, ignore_errors=True)


def fill(path: str) -> None:
    """Write ``path`` until the filesystem holding it has no page left."""
    with open(path, "wb", buffering=0) as f:
        for chunk in (b"\0" * 65536, b"\0" * 4096, b"\0"):
            while True:
                try:
                    f.write(chunk)
                except OSError as e:
                    if e.errno != errno.ENOSPC:
                        raise
                    break


class DiskFullTests(ServerTestCase):
    extra_config = {"dynamic_thumbnails": True, "admin_contact": "mailto:ops@test.example"}

    async def set_up(self) -> None:
        self.store = mount_small_store()
        # Registered first, so it runs last: after the server has stopped.
        self.addCleanup(unmount, self.store)
        self.extra_config = {**self.extra_config, "media_store_path": self.store}
        self.logged = LogRecords()
        root = logging.getLogger("mediarepo")
        root.addHandler(self.logged)
        self.addCleanup(root.removeHandler, self.logged)
        await super().set_up()

    def staging_files(self) -> list[str]:
        return os.listdir(os.path.join(self.store, STAGING_DIR))

    async def put_into_reservation(self, token: str, data: bytes) -> tuple[str, int, object]:
        created = await self.request("POST", CREATE, token=token)
        self.assertEqual(created.code, 200)
        media_id = created.json()["content_uri"].rsplit("/", 1)[1]
        r = await self.request(
            "PUT", f"{UPLOAD}/{SERVER_NAME}/{media_id}", token=token, body=data,
            headers={"Content-Type": "application/octet-stream"},
        )  # fmt: skip
        return media_id, r.code, r.json()

    async def test_full_store_refuses_clearly_and_recovers(self) -> None:
        token = await self.register()
        picture = images.png_with_alpha(300, 200)
        picture_id = await self.upload(token, picture, "image/png")
        filler = os.path.join(self.store, "filler")
        fill(filler)

        refused = {
            "errcode": "M_RESOURCE_LIMIT_EXCEEDED",
            "admin_contact": "mailto:ops@test.example",
        }
        # A small body (kept in memory until it is made durable) and one
        # streamed to its staging file as it arrives, each a few times.
        for size in (1000, 300_000, 1000, 300_000):
            r = await self.request(
                "POST", UPLOAD, token=token, body=os.urandom(size),
                headers={"Content-Type": "application/octet-stream"},
            )  # fmt: skip
            self.assertEqual(r.code, 507, r.body)
            self.assertEqual({k: r.json()[k] for k in refused}, refused)
        _, code, body = await self.put_into_reservation(token, os.urandom(200_000))
        self.assertEqual(code, 507, body)
        r = await self.request("GET", f"{THUMBNAIL}/{picture_id}?width=50&height=50", token=token)
        self.assertEqual(r.code, 507, r.body)
        self.assertEqual(self.staging_files(), [])

        with_traceback = [r for r in self.logged.records if r.exc_info]
        self.assertEqual(len(with_traceback), 1, [r.getMessage() for r in with_traceback])
        self.assertIn("media store is full", with_traceback[0].getMessage())
        self.assertEqual([r for r in self.logged.records if r.levelno >= logging.ERROR],
                         with_traceback)  # fmt: skip

        os.unlink(filler)
        data = os.urandom(300_000)
        media_id = await self.upload(token, data)
        r = await self.request("GET", f"{DOWNLOAD}/{media_id}", token=token)
        self.assertEqual((r.code, r.body), (200, data))
        reserved_id, code, _ = await self.put_into_reservation(token, data[:1000])
        self.assertEqual(code, 200)
        r = await self.request("GET", f"{DOWNLOAD}/{reserved_id}", token=token)
        self.assertEqual((r.code, r.body), (200, data[:1000]))
        r = await self.request("GET", f"{THUMBNAIL}/{picture_id}?width=50&height=50", token=token)
        self.assertEqual((r.code, r.header("content-type")), (200, "image/png"))
        self.assertEqual(self.staging_files(), [])


class DiskFullPostgresTests(DiskFullTests):
    engine = "psycopg2"

"""Three instances as three hosts would run them: each with a media store of
its own (a local cache), all on one PostgreSQL database and one S3 bucket
(moto), behind nobody: requests go to any of them.

* Media uploaded through any instance is served, byte for byte, by every
  instance (from S3 where it has no copy of its own).
* A quarantine through one instance is obeyed by the others as soon as they
  are told (PostgreSQL ``NOTIFY``), although they had its row cached. (Told
  nothing, they obey it once their cached row expires:
  tests/media/test_repository_timing.py, on a test clock.)
* Remote media asked of all three at once is downloaded over federation once.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

from prometheus_client import REGISTRY
from twisted.internet import defer, reactor

from mediarepo.app import media_server
from mediarepo.media.paths import local_media_path
from mediarepo.storage.notifications import CHANGED_CHANNEL
from tests import images
from tests.integration.test_federation import FederationTestCase, Peer
from tests.s3 import MotoServer
from tests.utils import SERVER_NAME, ServerTestCase, next_return, port_number

ADMIN = "/_synapse/admin/v1"
DOWNLOAD = f"/_matrix/client/v1/media/download/{SERVER_NAME}"


class SeveralHostsTests(ServerTestCase):
    engine = "psycopg2"

    async def set_up(self) -> None:
        self.moto = MotoServer(tempfile.mkdtemp(prefix="mediarepo-moto-"))
        self.addCleanup(self.moto.release)
        self.moto.start()
        self.extra_config = {"media_storage_providers": [self.moto.provider_config()]}
        await super().set_up()
        self.instances = [self.server]
        self.urls = [self.base_url]
        for name in ("b", "c"):
            server = media_server(
                self.make_config(media_store_path=os.path.join(self.workdir, f"store-{name}")),
                reactor,
            )
            await server.start()
            self.addCleanup(server.stopService)
            self.instances.append(server)
            self.urls.append(f"http://127.0.0.1:{port_number(server.ports[0])}")
        self.admin = await self.register("admin", admin=True)
        self.alice = await self.register("alice")

    async def upload_to(self, index: int, data: bytes) -> str:
        r = await self.request(
            "POST", "/_matrix/media/v3/upload", token=self.alice, body=data,
            headers={"Content-Type": "application/octet-stream"}, base_url=self.urls[index],
        )  # fmt: skip
        self.assertEqual(r.code, 200, r.body)
        return str(r.json()["content_uri"].rsplit("/", 1)[1])

    async def download_from(self, index: int, media_id: str) -> Any:
        return await self.request(
            "GET", f"{DOWNLOAD}/{media_id}", token=self.alice, base_url=self.urls[index]
        )

    def local_copy(self, index: int, media_id: str) -> str:
        return os.path.join(self.instances[index].config.media_store_path,
                            local_media_path(media_id))  # fmt: skip

    async def test_media_from_any_instance_is_served_by_every_instance(self) -> None:
        uploads = {}
        for i in range(6):
            data = os.urandom(2000 + 70_000 * i)
            uploads[await self.upload_to(i % 3, data)] = (i % 3, data)
        for media_id, (stored_by, data) in uploads.items():
            for index in range(3):
                self.assertEqual(
                    os.path.exists(self.local_copy(index, media_id)), index == stored_by
                )
                r = await self.download_from(index, media_id)
                self.assertEqual((r.code, r.body), (200, data), (media_id, index))

    async def test_quarantine_through_one_is_obeyed_by_the_others(self) -> None:
        media_id = await self.upload_to(0, os.urandom(3000))
        for index in (1, 2):
            self.assertEqual((await self.download_from(index, media_id)).code, 200)
        told = [self.told(index) for index in (1, 2)]
        r = await self.request(
            "POST", f"{ADMIN}/media/quarantine/{SERVER_NAME}/{media_id}", token=self.admin
        )
        self.assertEqual(r.code, 200, r.body)
        await defer.gatherResults(told)
        for index in (1, 2):
            self.assertEqual((await self.download_from(index, media_id)).code, 404)

    async def test_deletion_through_one_removes_the_copies_of_the_others(self) -> None:
        media_id = await self.upload_to(0, images.png(64, 48))
        for index in (1, 2):
            # Kept just after the last byte went.
            kept = next_return(self, self.instances[index].parts.local_store, "keep_incoming")
            self.assertEqual((await self.download_from(index, media_id)).code, 200)
            await kept
            self.assertTrue(os.path.exists(self.local_copy(index, media_id)))
        told = [self.told(index) for index in (1, 2)]
        # Told, each removes its copy and its thumbnails.
        removed = [
            next_return(self, self.instances[index].repository.storage, "delete_local")
            for index in (1, 2)
        ]
        r = await self.request(
            "DELETE", f"{ADMIN}/media/{SERVER_NAME}/{media_id}", token=self.admin
        )
        self.assertEqual(r.code, 200, r.body)
        await defer.gatherResults(told + removed)
        for index in (1, 2):
            self.assertEqual((await self.download_from(index, media_id)).code, 404)
            self.assertFalse(os.path.exists(self.local_copy(index, media_id)))

    def told(self, index: int) -> defer.Deferred[None]:
        """Fires once instance ``index`` has been told of a media change."""
        notifications = self.instances[index].parts.notifications
        assert notifications is not None
        handlers = notifications.handlers
        original = handlers[CHANGED_CHANNEL]
        told: defer.Deferred[None] = defer.Deferred()

        def hear(payload: str) -> None:
            original(payload)
            if not told.called:
                told.callback(None)

        handlers[CHANGED_CHANNEL] = hear
        self.addCleanup(handlers.__setitem__, CHANGED_CHANNEL, original)
        return told.addTimeout(10, reactor)


def remote_downloads(outcome: str) -> float:
    """Downloads of remote media by every server of this process."""
    value = REGISTRY.get_sample_value("mediarepo_remote_downloads_total", {"outcome": outcome})
    return value or 0.0


class SeveralHostsFederationTests(FederationTestCase):
    """Server A's database and signing key served by three more instances
    with media stores of their own and one S3 bucket; B is the origin of the
    remote media."""

    engine = "psycopg2"

    async def start_instance(self, label: str) -> Peer:
        a = self.a.server.config
        return await self.start_peer(
            label,
            server_name=a.server_name,
            signing_key_path=a.signing_key_path,
            database={"name": "psycopg2", "args": dict(a.database.args)},
            media_storage_providers=[self.moto.provider_config()],
        )

    async def test_remote_media_is_downloaded_once_for_all_instances(self) -> None:
        self.moto = MotoServer(tempfile.mkdtemp(prefix="mediarepo-moto-"))
        self.addCleanup(self.moto.release)
        self.moto.start()
        instances = [await self.start_instance(f"a{n}") for n in (1, 2, 3)]
        data = images.png(300, 200)
        media_id = await self.upload_to(self.b, self.b_token, data, "image/png")
        fetched, failed = remote_downloads("fetched"), remote_downloads("failed")
        url = f"/_matrix/client/v1/media/download/{self.b.name}/{media_id}"
        answers = await defer.gatherResults(
            [
                defer.ensureDeferred(
                    self.http("GET", instances[i % 3].client_url + url, token=self.token)
                )
                for i in range(20)
            ]
        )
        self.assertEqual({(r.code, r.body) for r in answers}, {(200, data)})
        self.assertEqual(remote_downloads("fetched") - fetched, 1)
        self.assertEqual(remote_downloads("failed") - failed, 0)

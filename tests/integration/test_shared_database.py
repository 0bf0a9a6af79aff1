"""Two servers (two media workers, or two hosts) on one PostgreSQL database
and media store: a deletion or quarantine through one is obeyed at once by
the other, although it had the media's row cached (otherwise for up to
METADATA_CACHE_SECONDS)."""

from __future__ import annotations

import os
from typing import Any

from twisted.internet import defer, reactor

from mediarepo.app import media_server
from mediarepo.storage.notifications import CHANGED_CHANNEL
from tests.utils import SERVER_NAME, ServerTestCase, port_number

ADMIN = "/_synapse/admin/v1"
DOWNLOAD = f"/_matrix/client/v1/media/download/{SERVER_NAME}"


class TwoServersOneDatabaseTests(ServerTestCase):
    engine = "psycopg2"

    async def set_up(self) -> None:
        await super().set_up()
        self.second = media_server(self.make_config(), reactor)
        await self.second.start()
        self.addCleanup(self.second.stopService)
        self.second_url = f"http://127.0.0.1:{port_number(self.second.ports[0])}"
        self.admin = await self.register("admin", admin=True)
        self.alice = await self.register("alice")

    def told(self) -> defer.Deferred[list[str]]:
        """Fires with the payloads the second server is told of, once it
        has been told of one."""
        assert self.second.repository is not None
        repository = self.second.repository
        heard: list[str] = []
        told: defer.Deferred[list[str]] = defer.Deferred()
        original = repository.media_changed_elsewhere

        def hear(payload: str) -> None:
            original(payload)
            heard.append(payload)
            if not told.called:
                told.callback(heard)

        # What the second server's LISTEN connection hands the notifications to.
        assert self.second.parts.notifications is not None
        handlers = self.second.parts.notifications.handlers
        handlers[CHANGED_CHANNEL] = hear
        self.addCleanup(handlers.__setitem__, CHANGED_CHANNEL, original)
        return told.addTimeout(10, reactor)

    async def on_second(self, path: str) -> Any:
        return await self.request("GET", path, token=self.alice, base_url=self.second_url)

    async def test_quarantine_and_deletion_are_obeyed_at_once_elsewhere(self) -> None:
        data = os.urandom(3000)
        quarantined = await self.upload(self.alice, data)
        deleted = await self.upload(self.alice, os.urandom(3000))
        for media_id in (quarantined, deleted):
            # Read through the second server: its row is cached there now.
            r = await self.on_second(f"{DOWNLOAD}/{media_id}")
            self.assertEqual(r.code, 200)

        told = self.told()
        r = await self.request(
            "POST", f"{ADMIN}/media/quarantine/{SERVER_NAME}/{quarantined}", token=self.admin
        )
        self.assertEqual(r.code, 200, r.body)
        self.assertEqual(await told, [f"/{quarantined}"])
        self.assertEqual((await self.on_second(f"{DOWNLOAD}/{quarantined}")).code, 404)

        told = self.told()
        r = await self.request("DELETE", f"{ADMIN}/media/{SERVER_NAME}/{deleted}", token=self.admin)
        self.assertEqual(r.code, 200, r.body)
        self.assertEqual(await told, [f"/{deleted}"])
        self.assertEqual((await self.on_second(f"{DOWNLOAD}/{deleted}")).code, 404)

        # Released again: served again at once.
        told = self.told()
        r = await self.request(
            "POST", f"{ADMIN}/media/unquarantine/{SERVER_NAME}/{quarantined}", token=self.admin
        )
        self.assertEqual(r.code, 200, r.body)
        await told
        r = await self.on_second(f"{DOWNLOAD}/{quarantined}")
        self.assertEqual((r.code, r.body), (200, data))

"""Two of our servers federating over TLS on loopback, each with its own
name, signing key, database and media store, checked by a test CA."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from typing import Any

from twisted.internet import defer, reactor, ssl
from twisted.web.client import Agent, BrowserLikePolicyForHTTPS, HTTPConnectionPool

from mediarepo.accounts import new_access_token
from mediarepo.app import MediaServer, media_server
from mediarepo.config import parse_config
from mediarepo.federation.keys import load_signing_keys, write_new_signing_key
from mediarepo.federation.signing import sign_request
from mediarepo.media.events import MediaEvent, media_events
from mediarepo.storage.user_rows import UserRows
from tests import images
from tests.processes import free_port
from tests.tls import TestCA
from tests.utils import (
    AsyncSetUpTestCase,
    Response,
    database_section,
    dead_instance_name,
    http_request,
    port_number,
)


class Peer:
    """One server: its name, its client URL and its federation URL."""

    def __init__(self, server: MediaServer, federation_port: int) -> None:
        self.server = server
        self.name = server.config.server_name
        self.client_url = f"http://127.0.0.1:{port_number(server.ports[0])}"
        self.federation_url = f"https://127.0.0.1:{federation_port}"


class FederationTestCase(AsyncSetUpTestCase):
    engine = "sqlite3"

    async def set_up(self) -> None:
        self.workdir = tempfile.mkdtemp(prefix="mediarepo-federation-")
        self.addCleanup(shutil.rmtree, self.workdir, True)
        self.ca = TestCA(self.workdir)
        self.pool = HTTPConnectionPool(reactor, persistent=False)
        with open(self.ca.ca_path, "rb") as f:
            trust = ssl.trustRootFromCertificates([ssl.Certificate.loadPEM(f.read())])
        # Trusts the test CA, for requests made to the federation listeners.
        self.agent = Agent(
            reactor, contextFactory=BrowserLikePolicyForHTTPS(trustRoot=trust), pool=self.pool
        )
        self.a = await self.start_peer("a")
        self.b = await self.start_peer("b")
        self.token = await self.register(self.a, "alice")
        self.b_token = await self.register(self.b, "bob")

    async def start_peer(self, label: str, **overrides: Any) -> Peer:
        directory = os.path.join(self.workdir, label)
        os.makedirs(directory, exist_ok=True)
        cleanups: list[Callable[[], None]] = []
        # Another instance of a server shares its database (given in overrides).
        database = overrides.get("database") or database_section(self.engine, directory, cleanups)
        for cleanup in cleanups:
            self.addCleanup(cleanup)
        port = free_port()
        cert, key = self.ca.issue(label)
        data: dict[str, Any] = {
            "server_name": f"127.0.0.1:{port}",
            "listeners": [
                {"port": 0, "bind_addresses": ["127.0.0.1"], "type": "http",
                 "resources": [{"names": ["client", "media"]}]},
                {"port": port, "bind_addresses": ["127.0.0.1"], "type": "http", "tls": True,
                 "resources": [{"names": ["federation"]}]},
            ],
            "database": database,
            "media_store_path": os.path.join(directory, "media_store"),
            "signing_key_path": os.path.join(directory, "signing.key"),
            "tls_certificate_path": cert,
            "tls_private_key_path": key,
            "federation_custom_ca_list": [self.ca.ca_path],
            "ip_range_blacklist": [],
            "trusted_key_servers": [],
            "max_upload_size": "10M",
            **overrides,
        }  # fmt: skip
        if not os.path.exists(data["signing_key_path"]):
            write_new_signing_key(data["signing_key_path"])
        server = media_server(parse_config(data, directory), reactor)
        await server.start()
        self.addCleanup(server.stopService)
        return Peer(server, port)

    async def register(self, peer: Peer, localpart: str) -> str:
        token = new_access_token(localpart)
        assert peer.server.database is not None
        await UserRows(peer.server.database).register_user(
            f"@{localpart}:{peer.name}", token, False, 0
        )
        return token

    async def http(self, method: str, url: str, **kwargs: Any) -> Response:
        return await http_request(method, url, agent=self.agent, **kwargs)

    async def upload_to(self, peer: Peer, token: str, data: bytes, content_type: str) -> str:
        r = await self.http(
            "POST", f"{peer.client_url}/_matrix/media/v3/upload?filename=pic",
            token=token, body=data, headers={"Content-Type": content_type},
        )  # fmt: skip
        assert r.code == 200, r.body
        return str(r.json()["content_uri"].rsplit("/", 1)[1])

    async def download_via_a(self, origin: Peer, media_id: str, **kwargs: Any) -> Response:
        return await self.http(
            "GET",
            f"{self.a.client_url}/_matrix/client/v1/media/download/{origin.name}/{media_id}",
            token=self.token,
            **kwargs,
        )

    async def signed_get(self, signer: Peer, target: Peer, path: str, **overrides: Any) -> Response:
        """A federation request made by hand, signed with ``signer``'s key."""
        key = load_signing_keys(signer.server.config.signing_key_path)[0]
        args = {"origin": signer.name, "destination": target.name, "method": "GET", "uri": path}
        args.update(overrides)
        (header,) = sign_request(
            key, args["origin"], args["destination"], args["method"], args["uri"]
        )
        return await self.http(
            "GET", target.federation_url + path, headers={"Authorization": header}
        )


class FederationTests(FederationTestCase):
    async def test_download_fetches_once_and_caches(self) -> None:
        data = os.urandom(2_000_000)
        media_id = await self.upload_to(self.b, self.b_token, data, "application/x-test")
        cached_before = media_events.labels(MediaEvent.REMOTE_CACHED.value)._value.get()
        responses = await defer.gatherResults(
            [defer.ensureDeferred(self.download_via_a(self.b, media_id)) for _ in range(20)]
        )
        self.assertEqual({r.code for r in responses}, {200})
        self.assertTrue(all(r.body == data for r in responses))
        r = responses[0]
        self.assertEqual(r.header("Content-Type"), "application/x-test")
        self.assertEqual(r.header("Content-Disposition"), "attachment; filename=pic")
        # One fetch: one cache row, one file.
        assert self.a.server.database is not None
        rows = await self.a.server.database.run_query(
            "t", "SELECT media_origin, media_length, filesystem_id FROM remote_media_cache"
        )
        self.assertEqual(len(rows), 1)
        self.assertEqual(rows[0][:2], (self.b.name, len(data)))
        cached = media_events.labels(MediaEvent.REMOTE_CACHED.value)._value.get()
        self.assertEqual(cached - cached_before, 1)
        fid = rows[0][2]
        path = os.path.join(
            self.a.server.config.media_store_path,
            "remote_content", self.b.name, fid[:2], fid[2:4], fid[4:],
        )  # fmt: skip
        with open(path, "rb") as f:
            self.assertEqual(f.read(), data)
        # B goes away, A restarts: A still serves it from its cache.
        await self.b.server.stop()
        await self.a.server.stop()
        restarted = media_server(self.a.server.config, reactor)
        await restarted.start()
        self.addCleanup(restarted.stopService)
        self.a = Peer(restarted, 0)
        r = await self.download_via_a(self.b, media_id)
        self.assertEqual((r.code, r.body), (200, data))

    async def test_domain_whitelist(self) -> None:
        media_id = await self.upload_to(self.b, self.b_token, b"listed", "text/plain")
        await self.a.server.stop()
        self.a = await self.start_peer("a2", federation_domain_whitelist=["friend.example"])
        self.token = await self.register(self.a, "alice")
        r = await self.download_via_a(self.b, media_id)
        self.assertEqual((r.code, r.json()["errcode"]), (403, "M_FORBIDDEN"))
        # And B, whose list lacks A, refuses A's requests.
        await self.b.server.stop()
        self.b = await self.start_peer("b2", federation_domain_whitelist=["friend.example"])
        path = "/_matrix/federation/v1/media/download/abcdefghijkl"
        r = await self.signed_get(self.a, self.b, path)
        self.assertEqual((r.code, r.json()["errcode"]), (403, "M_FORBIDDEN"))

    async def test_remote_thumbnail(self) -> None:
        media_id = await self.upload_to(self.b, self.b_token, images.jpeg(800, 600), "image/jpeg")
        r = await self.http(
            "GET",
            f"{self.a.client_url}/_matrix/client/v1/media/thumbnail/{self.b.name}/{media_id}"
            "?width=320&height=240",
            token=self.token,
        )
        self.assertEqual((r.code, r.header("Content-Type")), (200, "image/jpeg"), r.body)
        self.assertEqual(images.size_of(r.body), (320, 240))
        assert self.a.server.database is not None
        rows = await self.a.server.database.run_query(
            "t", "SELECT COUNT(*) FROM remote_media_cache_thumbnails"
        )
        self.assertEqual(rows[0][0], 5)

    async def test_remote_thumbnails_survive_a_crash(self) -> None:
        """The thumbnails of remote media are made after it is served: they
        are recorded as owed with its row, and resumed if the process dies."""
        assert self.a.server.repository is not None and self.a.server.database is not None
        thumbnails = self.a.server.repository.thumbnails
        self.patch(thumbnails, "schedule_pregeneration", lambda source: None)  # the process dies
        media_id = await self.upload_to(self.b, self.b_token, images.png(400, 300), "image/png")
        r = await self.download_via_a(self.b, media_id)
        self.assertEqual(r.code, 200)
        database = self.a.server.database
        pending = await database.run_query(
            "t", "SELECT media_origin, media_id FROM mediarepo_pending_thumbnails"
        )
        self.assertEqual(pending, [(self.b.name, media_id)])
        await database.run_query(
            "t", "UPDATE mediarepo_pending_thumbnails SET instance_name = ?",
            (dead_instance_name(),),
        )  # fmt: skip
        del thumbnails.schedule_pregeneration
        self.assertEqual(await thumbnails.pending.resume(thumbnails._resume), 1)
        rows = await database.run_query(
            "t", "SELECT COUNT(*) FROM remote_media_cache_thumbnails WHERE media_id = ?",
            (media_id,),
        )  # fmt: skip
        self.assertEqual(rows[0][0], 4)
        self.assertEqual(
            await database.run_query("t", "SELECT * FROM mediarepo_pending_thumbnails"), []
        )

    async def test_unknown_remote_media(self) -> None:
        r = await self.download_via_a(self.b, "doesnotexistanywhere")
        self.assertEqual((r.code, r.json()["errcode"]), (404, "M_NOT_FOUND"))

    async def test_unreachable_peer(self) -> None:
        r = await self.http(
            "GET",
            f"{self.a.client_url}/_matrix/client/v1/media/download/127.0.0.1:1/abcdefghij",
            token=self.token,
        )
        self.assertEqual((r.code, r.json()["errcode"]), (502, "M_UNKNOWN"))

    async def test_blocked_addresses_and_servers(self) -> None:
        media_id = await self.upload_to(self.b, self.b_token, b"blocked", "text/plain")
        await self.a.server.stop()
        self.a = await self.start_peer("a2", ip_range_blacklist=["127.0.0.0/8"])
        self.token = await self.register(self.a, "alice")
        r = await self.download_via_a(self.b, media_id)
        self.assertEqual((r.code, r.json()["errcode"]), (502, "M_UNKNOWN"))
        await self.a.server.stop()
        self.a = await self.start_peer("a3", prevent_media_downloads_from=[self.b.name])
        self.token = await self.register(self.a, "alice")
        r = await self.download_via_a(self.b, media_id)
        self.assertEqual((r.code, r.json()["errcode"]), (404, "M_NOT_FOUND"))

    async def test_legacy_path_does_not_fetch(self) -> None:
        media_id = await self.upload_to(self.b, self.b_token, b"legacy", "text/plain")
        r = await self.http(
            "GET", f"{self.a.client_url}/_matrix/media/v3/download/{self.b.name}/{media_id}"
        )
        self.assertEqual((r.code, r.json()["errcode"]), (404, "M_NOT_FOUND"))

    async def test_quarantine_reaches_federation(self) -> None:
        async def quarantine(peer: Peer, media_id: str) -> None:
            assert peer.server.database is not None
            await peer.server.database.run_query(
                "t",
                "UPDATE local_media_repository SET quarantined_by = 'x' WHERE media_id = ?",
                (media_id,),
            )

        # Quarantined on the origin: peers get 404 and cache nothing.
        hidden = await self.upload_to(self.b, self.b_token, b"hidden", "text/plain")
        await quarantine(self.b, hidden)
        for path in (
            f"/_matrix/federation/v1/media/download/{hidden}",
            f"/_matrix/federation/v1/media/thumbnail/{hidden}?width=32&height=32",
        ):
            r = await self.signed_get(self.a, self.b, path)
            self.assertEqual((r.code, r.json()["errcode"]), (404, "M_NOT_FOUND"), path)
        r = await self.download_via_a(self.b, hidden)
        self.assertEqual(r.code, 404)
        # Bytes quarantined here arrive quarantined when fetched from a peer.
        data = os.urandom(3000)
        local = await self.upload_to(self.a, self.token, data, "text/plain")
        await quarantine(self.a, local)
        remote = await self.upload_to(self.b, self.b_token, data, "text/plain")
        r = await self.download_via_a(self.b, remote)
        self.assertEqual(r.code, 404)
        assert self.a.server.database is not None
        rows = await self.a.server.database.run_query(
            "t", "SELECT quarantined_by FROM remote_media_cache WHERE media_id = ?", (remote,)
        )
        self.assertEqual(rows, [("system",)])

    async def test_serving_peers_checks_signatures(self) -> None:
        media_id = await self.upload_to(self.b, self.b_token, b"signed", "text/plain")
        path = f"/_matrix/federation/v1/media/download/{media_id}"
        r = await self.signed_get(self.a, self.b, path)
        self.assertEqual(r.code, 200, r.body)
        self.assertTrue((r.header("Content-Type") or "").startswith("multipart/mixed; boundary="))
        self.assertIn(b"\r\n\r\nsigned\r\n--", r.body)
        self.assertIn(b"Content-Type: application/json\r\n\r\n{}", r.body)
        cases = [
            (await self.http("GET", self.b.federation_url + path), 401),
            (await self.signed_get(self.a, self.b, path, destination="elsewhere.test"), 401),
            # A header signed for another request (replayed onto this one).
            (await self.signed_get(self.a, self.b, path, uri=path + "x"), 401),
            (await self.signed_get(self.a, self.b, path, method="POST"), 401),
            # Claiming to be a server whose key did not sign it.
            (await self.signed_get(self.a, self.b, path, origin=self.b.name), 401),
        ]
        for response, code in cases:
            self.assertEqual(response.code, code, response.body)
            self.assertEqual(response.json()["errcode"], "M_UNAUTHORIZED")
        r = await self.http(
            "GET", self.b.federation_url + path, headers={"Authorization": "X-Matrix nonsense"}
        )
        self.assertEqual((r.code, r.json()["errcode"]), (400, "M_UNAUTHORIZED"))

    async def test_keys_endpoint(self) -> None:
        r = await self.http("GET", self.b.federation_url + "/_matrix/key/v2/server")
        self.assertEqual(r.code, 200)
        body = r.json()
        self.assertEqual(body["server_name"], self.b.name)
        self.assertEqual(len(body["verify_keys"]), 1)
        self.assertIn(self.b.name, body["signatures"])


class FederationPostgresTests(FederationTests):
    engine = "psycopg2"

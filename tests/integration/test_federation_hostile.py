"""Remote media from peers that misbehave: a fake peer on loopback TLS, with
real keys, answers our server's fetches with what a broken or hostile
server might send. Each answer must end in a clean error (or success for
the legacy-only peer) and leave nothing in the cache. (Peers that stall or
trickle: tests/media/test_remote_fetch.py, on a test clock.)"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from signedjson.key import encode_verify_key_base64, generate_signing_key, get_verify_key
from signedjson.sign import sign_json
from twisted.internet import defer, reactor
from twisted.internet.interfaces import IReactorSSL
from twisted.web import resource, server

from mediarepo.assembly import server_tls_options
from mediarepo.federation import keys
from mediarepo.federation.multipart import (
    multipart_content_type,
    multipart_head,
    multipart_redirect,
    multipart_tail,
    new_boundary,
)
from tests.integration.test_federation import FederationTestCase
from tests.processes import free_port


class FakePeer(resource.Resource):
    """A server that signs its keys properly and answers media as told."""

    isLeaf = True

    def __init__(self, name: str, signing_key_path: str) -> None:
        super().__init__()
        self.name = name
        keys.write_new_signing_key(signing_key_path)
        self._keys = keys.load_signing_keys(signing_key_path)
        self.requests: list[str] = []

    # Key answers this peer gives as a notary: server name -> signed answer.
    notarised: dict[str, Any]

    def render_POST(self, request: Any) -> Any:
        import json

        self.requests.append(request.path.decode())
        if request.path != b"/_matrix/key/v2/query":
            request.setResponseCode(404)
            return b'{"errcode": "M_UNRECOGNIZED", "error": "Unrecognized request"}'
        asked = json.loads(request.content.read())["server_keys"]
        answers = []
        for server_name in asked:
            if server_name in getattr(self, "notarised", {}):
                answer = self.notarised[server_name]
                for key in self._keys:
                    answer = sign_json(answer, self.name, key)
                answers.append(answer)
        request.setHeader("Content-Type", "application/json")
        return json.dumps({"server_keys": answers}).encode()

    def verify_keys(self) -> dict[str, str]:
        return {keys.key_id(k): encode_verify_key_base64(get_verify_key(k)) for k in self._keys}

    def render_GET(self, request: Any) -> Any:
        path = request.path.decode()
        self.requests.append(path)
        if path.startswith("/_matrix/key/v2/server"):
            import json

            body = keys.server_keys_response(self.name, self._keys, {}, 2**50)
            request.setHeader("Content-Type", "application/json")
            return json.dumps(body).encode()
        if path.startswith("/cdn/"):
            return self._render_cdn(request, path)
        behaviour = path.rsplit("/", 1)[1].split("-")[0]
        if behaviour == "legacy":
            federation = path.startswith("/_matrix/federation/v1/media/download/")
            return self._render_legacy(request, federation)
        boundary = new_boundary()
        request.setHeader("Content-Type", multipart_content_type(boundary))
        answer = self._media_answers().get(behaviour)
        if answer is None:
            request.setResponseCode(404)
            return b'{"errcode": "M_NOT_FOUND", "error": "Not here"}'
        return answer(
            request, boundary, multipart_head(boundary, "application/octet-stream", "attachment")
        )

    def _render_cdn(self, request: Any, path: str) -> bytes:
        """A plain web server the media may be redirected to."""
        if path == "/cdn/loop":
            request.setResponseCode(302)
            request.setHeader("Location", "/cdn/loop")
            return b""
        request.setHeader("Content-Type", "image/png")
        request.setHeader("Content-Disposition", "inline; filename=from-cdn.png")
        return b"bytes from the cdn"

    def _render_legacy(self, request: Any, federation: bool) -> bytes:
        """A peer that predates the federation media endpoints."""
        if federation:
            request.setResponseCode(404)
            return b'{"errcode": "M_UNRECOGNIZED", "error": "Unrecognized request"}'
        request.setHeader("Content-Type", "text/plain")
        request.setHeader("Content-Disposition", "inline; filename*=utf-8''old%20peer.txt")
        return b"from an old peer"

    def _media_answers(self) -> dict[str, Callable[[Any, str, bytes], Any]]:
        """How each behaviour (the media ID up to its first "-") answers,
        given the request, the multipart boundary and the head of the
        multipart body's first part."""
        return {
            "oversized": self._oversized,
            "truncated": self._truncated,
            "lyinglength": self._lying_length,
            "notmultipart": self._not_multipart,
            "badfirstpart": self._bad_first_part,
            "redirect": self._redirect,
            "redirectloop": self._redirect_loop,
            "fine": self._fine,
        }

    def _fine(self, request: Any, boundary: str, head: bytes) -> bytes:
        return head + b"all good" + multipart_tail(boundary)

    def _oversized(self, request: Any, boundary: str, head: bytes) -> bytes:
        return head + b"x" * (11 * 1024 * 1024) + multipart_tail(boundary)

    def _truncated(self, request: Any, boundary: str, head: bytes) -> Any:
        request.write(head + b"only part of it")
        request.channel.transport.abortConnection()
        return server.NOT_DONE_YET

    def _lying_length(self, request: Any, boundary: str, head: bytes) -> Any:
        request.setHeader("Content-Length", "100000")
        request.write(head + b"short")
        request.channel.transport.abortConnection()
        return server.NOT_DONE_YET

    def _not_multipart(self, request: Any, boundary: str, head: bytes) -> bytes:
        request.setHeader("Content-Type", "text/plain")
        return b"plain text"

    def _bad_first_part(self, request: Any, boundary: str, head: bytes) -> bytes:
        return (
            f"\r\n--{boundary}\r\nContent-Type: text/plain\r\n\r\nhi\r\n--{boundary}--\r\n"
        ).encode()

    def _redirect(self, request: Any, boundary: str, head: bytes) -> bytes:
        return multipart_redirect(boundary, f"https://{self.name}/cdn/file")

    def _redirect_loop(self, request: Any, boundary: str, head: bytes) -> bytes:
        return multipart_redirect(boundary, f"https://{self.name}/cdn/loop")


class _TrackingSite(server.Site):
    def __init__(self, resource: Any) -> None:
        super().__init__(resource)
        # Each connection, with what fires once it is gone.
        self.protocols: list[tuple[Any, defer.Deferred[None]]] = []

    def buildProtocol(self, addr: Any) -> Any:
        protocol = super().buildProtocol(addr)
        lost: defer.Deferred[None] = defer.Deferred()
        connection_lost = protocol.connectionLost

        def losing(reason: Any) -> None:
            try:
                connection_lost(reason)
            finally:
                if not lost.called:
                    lost.callback(None)

        protocol.connectionLost = losing
        self.protocols.append((protocol, lost))
        return protocol

    def abort_all(self) -> defer.Deferred[None]:
        """Cut every connection; fires once the reactor has let them go."""
        for protocol, lost in self.protocols:
            if lost.called:
                continue
            # Twisted's HTTP/2-negotiating wrapper keeps the channel inside.
            channel = getattr(protocol, "_channel", protocol)
            transport = getattr(channel, "transport", None)
            if transport is not None:
                transport.abortConnection()
        gone = defer.gatherResults([lost for _, lost in self.protocols])
        return gone.addCallback(lambda _: None).addTimeout(10, reactor)


class FakePeerTestCase(FederationTestCase):
    """Our servers A and B, and a fake peer beside them."""

    async def set_up(self) -> None:
        await super().set_up()
        port = free_port()
        name = f"127.0.0.1:{port}"
        cert, key = self.ca.issue("fake")
        self.fake = FakePeer(name, os.path.join(self.workdir, "fake.signing.key"))
        site = _TrackingSite(self.fake)
        listening = IReactorSSL(reactor).listenSSL(
            port, site, server_tls_options(cert, key), interface="127.0.0.1"
        )
        self.addCleanup(listening.stopListening)
        # Connections our server gave up on may still be closing: cut them.
        self.addCleanup(site.abort_all)
        self.fake_name = name


class HostilePeerTests(FakePeerTestCase):
    async def fetch(self, media_id: str) -> Any:
        return await self.http(
            "GET",
            f"{self.a.client_url}/_matrix/client/v1/media/download/{self.fake_name}/{media_id}",
            token=self.token,
        )

    async def forget_backoff(self) -> None:
        assert self.a.server.database is not None
        await self.a.server.database.run_query("t", "DELETE FROM destinations")

    def assert_nothing_cached(self) -> None:
        store = self.a.server.config.media_store_path
        cached = os.path.join(store, "remote_content")
        files = (
            [f for _, _, names in os.walk(cached) for f in names] if os.path.isdir(cached) else []
        )
        self.assertEqual(files, [])
        self.assertEqual(os.listdir(os.path.join(store, ".mediarepo_tmp")), [])

    async def test_hostile_answers(self) -> None:
        cases = [
            ("oversized-aaaaaa", 502, "M_TOO_LARGE"),
            ("truncated-aaaaaa", 502, "M_UNKNOWN"),
            ("lyinglength-aaaa", 502, "M_UNKNOWN"),
            ("notmultipart-aaa", 502, "M_UNKNOWN"),
            ("badfirstpart-aaa", 502, "M_UNKNOWN"),
            ("missing-aaaaaaaa", 404, "M_NOT_FOUND"),
            ("redirectloop-aaa", 502, "M_UNKNOWN"),
        ]
        for media_id, code, errcode in cases:
            # A peer that cuts the connection before its answer is backed
            # off (tests/faults/test_hostile_peers.py); here each answer is
            # looked at on its own.
            await self.forget_backoff()
            r = await self.fetch(media_id)
            self.assertEqual((r.code, r.json()["errcode"]), (code, errcode), media_id)
            self.assert_nothing_cached()
        # The server still fetches what a peer sends properly.
        await self.forget_backoff()
        r = await self.fetch("fine-aaaaaaaaaaa")
        self.assertEqual((r.code, r.body), (200, b"all good"))

    async def test_redirect_to_a_cdn(self) -> None:
        r = await self.fetch("redirect-aaaaaaa")
        self.assertEqual((r.code, r.body), (200, b"bytes from the cdn"))
        self.assertEqual(r.header("Content-Type"), "image/png")
        self.assertIn("/cdn/file", self.fake.requests)

    async def test_legacy_only_peer(self) -> None:
        r = await self.fetch("legacy-aaaaaaaaa")
        self.assertEqual((r.code, r.body), (200, b"from an old peer"))
        self.assertEqual(r.header("Content-Type"), "text/plain; charset=UTF-8")
        self.assertEqual(r.header("Content-Disposition"), "inline; filename*=utf-8''old%20peer.txt")
        self.assertIn(
            # The server name escaped in the path, as Synapse sends it.
            f"/_matrix/media/v3/download/{self.fake_name.replace(':', '%3A')}/legacy-aaaaaaaaa",
            self.fake.requests,
        )


class HostilePeerPostgresTests(HostilePeerTests):
    engine = "psycopg2"


class NotaryTests(FakePeerTestCase):
    """A server asked for another's keys (``trusted_key_servers``) answers
    for it; the answer is believed only when signed by both."""

    async def test_keys_come_from_the_notary(self) -> None:
        a_keys = keys.load_signing_keys(self.a.server.config.signing_key_path)
        self.fake.notarised = {
            self.a.name: keys.server_keys_response(self.a.name, a_keys, {}, 2**50)
        }
        await self.b.server.stop()
        notary = {"server_name": self.fake_name, "verify_keys": self.fake.verify_keys()}
        self.b = await self.start_peer("b2", trusted_key_servers=[notary])
        media_id = await self.upload_to(self.b, await self.register(self.b, "bob"), b"n", "a/b")
        path = f"/_matrix/federation/v1/media/download/{media_id}"
        r = await self.signed_get(self.a, self.b, path)
        self.assertEqual(r.code, 200, r.body)
        self.assertIn("/_matrix/key/v2/query", self.fake.requests)
        assert self.b.server.database is not None
        rows = await self.b.server.database.run_query(
            "t", "SELECT from_server FROM server_keys_json WHERE server_name = ?", (self.a.name,)
        )
        self.assertEqual({r[0] for r in rows}, {self.fake_name})

    async def test_answer_without_the_notary_signature_is_refused(self) -> None:
        a_keys = keys.load_signing_keys(self.a.server.config.signing_key_path)
        self.fake.notarised = {
            self.a.name: keys.server_keys_response(self.a.name, a_keys, {}, 2**50)
        }
        await self.b.server.stop()
        # The notary's key as configured is not the one it signs with.
        other = generate_signing_key("zzzz")
        wrong = {keys.key_id(other): encode_verify_key_base64(get_verify_key(other))}
        notary = {"server_name": self.fake_name, "verify_keys": wrong}
        self.b = await self.start_peer("b2", trusted_key_servers=[notary])
        media_id = await self.upload_to(self.b, await self.register(self.b, "bob"), b"n", "a/b")
        r = await self.signed_get(
            self.a, self.b, f"/_matrix/federation/v1/media/download/{media_id}"
        )
        # Refused from the notary, then fetched from A itself.
        self.assertEqual(r.code, 200, r.body)
        assert self.b.server.database is not None
        rows = await self.b.server.database.run_query(
            "t", "SELECT from_server FROM server_keys_json WHERE server_name = ?", (self.a.name,)
        )
        self.assertEqual({r[0] for r in rows}, {self.a.name})


class NotaryPostgresTests(NotaryTests):
    engine = "psycopg2"

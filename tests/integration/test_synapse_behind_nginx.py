"""mediarepo deployed as Synapse's media worker, behind nginx, driven by a
real Matrix client: the deployment ``docs/deployment.rst`` describes.

* Synapse (stock, from PyPI) runs on PostgreSQL with ``enable_media_repo:
  false`` in the ``homeserver.yaml`` it generated.
* mediarepo starts with the command line Synapse's media worker would get:
  ``python -m mediarepo -c homeserver.yaml -c workers/media1.yaml``, the
  worker file being ``contrib/workers/media1.yaml`` with only its port and
  its log config path changed (the log config is Synapse's own, pointed at
  another file, as Synapse's worker documentation has it).
* nginx (Debian's ``nginx-light``) runs ``contrib/nginx/matrix.conf`` with
  only its listen addresses (loopback), upstream ports and certificate paths
  changed, as a foreground child process with its own prefix, pid file and
  temporary directories in the test's working directory.
* Two matrix-nio clients, each through nginx's TLS port only: the first logs
  in, uploads a PNG and a 3 MiB file (more than nginx's default body limit),
  creates a room, invites the second, sends ``m.image`` and ``m.file``
  events; the second joins, syncs, sees both events, downloads both files
  byte for byte and gets two thumbnails of the image of the requested bounds.
  An admin reads the media admin API through nginx too.
* Who answered what is read from three logs: nginx's (the upstream of every
  request), mediarepo's (its worker_log_config file) and Synapse's (no media
  request reached it).

Needs ``matrix-synapse[postgres]``, ``matrix-nio`` and ``nginx``; skips
without them, except that with ``CI=true`` a missing nginx fails the test
(``.ci/run`` installs ``nginx-light``). ``tox -e interop`` runs it.
"""

from __future__ import annotations

import asyncio
import io
import os
import re
import shutil
import ssl
import sys
from typing import Any, NamedTuple
from urllib.parse import quote

import yaml
from twisted.trial import unittest

from tests.integration.test_synapse_interop import (
    PASSWORD,
    SKIP_REASON,
    SynapseTestCase,
    http_request,
    media_id_of,
    tail,
)
from tests.processes import free_port

try:
    import nio
except ImportError as e:
    NIO_MISSING: str | None = f"matrix-nio is not installed ({e}); `tox -e interop` runs this test"
else:
    NIO_MISSING = None

CONTRIB = os.path.join(os.path.dirname(__file__), "..", "..", "contrib")
NGINX_SITE = os.path.join(CONTRIB, "nginx", "matrix.conf")
WORKER_FILE = os.path.join(CONTRIB, "workers", "media1.yaml")

# The ports and paths the documented files name, and how often; the test
# fails if the files change shape, rather than test something else.
SYNAPSE_UPSTREAM = "server 127.0.0.1:8008;"
MEDIAREPO_UPSTREAM = "server 127.0.0.1:8085;"
CERTIFICATE = "/etc/ssl/matrix.example.com/fullchain.pem"
CERTIFICATE_KEY = "/etc/ssl/matrix.example.com/privkey.pem"

SYNC_DEADLINE = 30.0
BIG_FILE_SIZE = 3 * 1024 * 1024 + 4321

# The media paths of Synapse's worker documentation (what nginx must send to
# mediarepo), as they appear in nginx's $uri.
MEDIA_PATH = re.compile(
    r"^/_matrix/(media|client/v1/media|federation/v1/media)/"
    r"|^/_synapse/admin/v1/(purge_media_cache$|room/.*/media|user/.*/media|media/"
    r"|quarantine_media/|users/.*/media$)"
)


def find_nginx() -> str | None:
    # /usr/sbin is not on every user's PATH.
    found = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/usr/local/sbin")
    return found


def photo() -> bytes:
    """A 640x400 PNG with something in it: a gradient and two shapes."""
    from PIL import Image, ImageDraw

    image = Image.linear_gradient("L").resize((640, 400)).convert("RGB")
    draw = ImageDraw.Draw(image)
    draw.rectangle((40, 40, 240, 200), fill=(220, 40, 40))
    draw.ellipse((300, 120, 600, 360), fill=(30, 90, 220))
    out = io.BytesIO()
    image.save(out, "PNG")
    return out.getvalue()


def image_size(data: bytes) -> tuple[str, tuple[int, int]]:
    """The format and size of an image Pillow can fully decode."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        image.load()
        return str(image.format), image.size


class Routed(NamedTuple):
    """One line of nginx's access log, as the test's log_format writes it."""

    method: str
    uri: str
    status: int
    upstream: str


class ClientResults(NamedTuple):
    image_mxc: str
    file_mxc: str


class MediaWorkerBehindNginxTest(SynapseTestCase):
    """The deployment described at the top of this module."""

    def setUp(self) -> None:
        if SKIP_REASON is None and NIO_MISSING is not None:
            raise unittest.SkipTest(NIO_MISSING)
        nginx = find_nginx()
        if SKIP_REASON is None and nginx is None:
            if os.environ.get("CI") == "true":
                self.fail("nginx is not installed (.ci/run installs nginx-light if it is missing)")
            raise unittest.SkipTest("nginx is not installed (Debian: apt-get install nginx-light)")
        super().setUp()
        assert nginx is not None  # or super().setUp() skipped the test
        self.nginx = nginx

    def test_matrix_client_through_nginx_reaches_mediarepo_as_media_worker(self) -> None:
        try:
            self._run_deployment()
        except BaseException:
            self._dump_logs()
            raise

    # -- the deployment ---------------------------------------------------

    def _run_deployment(self) -> None:
        from tests.tls import TestCA

        media_port, https_port, federation_port = free_port(), free_port(), free_port()
        self._write_config(enable_media_repo=False)
        with open(self.config_path, encoding="utf-8") as f:
            synapse_config = yaml.safe_load(f)
        worker_file, media_log = self._write_worker_file(synapse_config, media_port)
        ca = TestCA(self.workdir)
        cert, key = ca.issue("nginx")
        tls = ssl.create_default_context(cafile=ca.ca_path)
        nginx_dir = self._write_nginx_config(media_port, https_port, federation_port, cert, key)
        nginx_access_log = os.path.join(nginx_dir, "access.log")
        self.log_files += [media_log, os.path.join(nginx_dir, "error.log"), nginx_access_log]

        synapse = self._start_synapse("synapse")
        admin_token = self._register_and_login("admin", admin=True)
        self._register_and_login("alice")
        self._register_and_login("bob")

        self._start(
            "mediarepo",
            [sys.executable, "-m", "mediarepo", "-c", self.config_path, "-c", worker_file],
            "/_matrix/client/v1/media/config",
            token=admin_token,
            port=media_port,
        )
        mediarepo_process = self.processes[-1]
        self._start(
            "nginx",
            [self.nginx, "-p", nginx_dir + "/", "-c", os.path.join(nginx_dir, "nginx.conf"),
             "-e", os.path.join(nginx_dir, "error.log")],
            "/_matrix/client/versions",
            token=None,
            port=https_port,
            tls=tls,
        )  # fmt: skip
        nginx_process = self.processes[-1]

        base_url = f"https://127.0.0.1:{https_port}"
        image = photo()
        big_file = os.urandom(BIG_FILE_SIZE)
        results = asyncio.run(self._clients(base_url, tls, image, big_file))
        self._note(f"clients done: {results.image_mxc}, {results.file_mxc}")

        # The media admin API through nginx, as an admin would call it.
        server, media_id = media_id_of(results.image_mxc)
        alice = f"@alice:{self.server_name}"
        response = http_request(
            https_port, "GET", f"/_synapse/admin/v1/media/{server}/{media_id}",
            token=admin_token, tls=tls,
        )  # fmt: skip
        self.assertEqual(response.status, 200, response.body[:300])
        info = response.json()["media_info"]
        self.assertEqual(
            (info["media_id"], info["media_type"], info["media_length"], info["upload_name"],
             info["user_id"]),
            (media_id, "image/png", len(image), "photo.png", alice),
        )  # fmt: skip
        response = http_request(
            https_port, "GET", f"/_synapse/admin/v1/users/{quote(alice)}/media",
            token=admin_token, tls=tls,
        )  # fmt: skip
        self.assertEqual(response.status, 200, response.body[:300])
        listed = {m["media_id"] for m in response.json()["media"]}
        self.assertEqual(listed, {media_id, media_id_of(results.file_mxc)[1]})
        # An admin path that is not the media repository's stays with Synapse.
        response = http_request(
            https_port, "GET", f"/_synapse/admin/v2/users/{quote(alice)}",
            token=admin_token, tls=tls,
        )  # fmt: skip
        self.assertEqual((response.status, response.json().get("name")), (200, alice))
        # Federation's port: media to mediarepo (which wants a signed request),
        # the rest to Synapse.
        response = http_request(
            federation_port, "GET", f"/_matrix/federation/v1/media/download/{media_id}", tls=tls
        )
        self.assertEqual((response.status, response.json().get("errcode")), (401, "M_UNAUTHORIZED"))
        response = http_request(federation_port, "GET", "/_matrix/key/v2/server", tls=tls)
        self.assertEqual((response.status, response.json().get("server_name")), (200, server))

        # Stop everything: the logs are complete (and flushed) once the processes exit.
        self.assertEqual(self._stop(nginx_process), 0, "nginx's exit status after SIGTERM")
        self.assertEqual(self._stop(mediarepo_process), 0, "mediarepo's exit status")
        self._stop(synapse)
        self._assert_routing(nginx_access_log, media_log, results, media_id, media_port)

    def _write_worker_file(
        self, synapse_config: dict[str, Any], media_port: int
    ) -> tuple[str, str]:
        """contrib/workers/media1.yaml with its port and log config changed;
        the log config is Synapse's own, writing to another file. Returns the
        worker file's path and its log file's."""
        with open(WORKER_FILE, encoding="utf-8") as f:
            worker = yaml.safe_load(f)
        self.assertEqual(len(worker["worker_listeners"]), 1, WORKER_FILE)
        worker["worker_listeners"][0]["port"] = media_port
        with open(synapse_config["log_config"], encoding="utf-8") as f:
            log_config = yaml.safe_load(f)
        media_log = os.path.join(self.workdir, "media1.log")
        self.assertEqual(log_config["handlers"]["file"]["filename"], self.log_files[0])
        log_config["handlers"]["file"]["filename"] = media_log
        worker["worker_log_config"] = os.path.join(self.workdir, "media1-log.yaml")
        with open(worker["worker_log_config"], "w", encoding="utf-8") as f:
            yaml.safe_dump(log_config, f, sort_keys=False)
        os.makedirs(os.path.join(self.workdir, "workers"))
        path = os.path.join(self.workdir, "workers", "media1.yaml")
        with open(path, "w", encoding="utf-8") as f:
            yaml.safe_dump(worker, f, sort_keys=False)
        return path, media_log

    def _write_nginx_config(
        self, media_port: int, https_port: int, federation_port: int, cert: str, key: str
    ) -> str:
        """The documented site with loopback listen addresses, the test's
        upstream ports and certificate, inside a main config of the test's
        own (what /etc/nginx/nginx.conf is on Debian). Returns nginx's prefix."""
        with open(NGINX_SITE, encoding="utf-8") as f:
            site = f.read()
        replacements = [
            (SYNAPSE_UPSTREAM, f"server 127.0.0.1:{self.port};"),
            (MEDIAREPO_UPSTREAM, f"server 127.0.0.1:{media_port};"),
            (f"ssl_certificate {CERTIFICATE};", f"ssl_certificate {cert};"),
            (f"ssl_certificate_key {CERTIFICATE_KEY};", f"ssl_certificate_key {key};"),
            ("listen 443 ", f"listen 127.0.0.1:{https_port} "),
            ("listen [::]:443 ", f"listen [::1]:{https_port} "),
            ("listen 8448 ", f"listen 127.0.0.1:{federation_port} "),
            ("listen [::]:8448 ", f"listen [::1]:{federation_port} "),
        ]
        for old, new in replacements:
            self.assertEqual(site.count(old), 1, f"{NGINX_SITE}: expected one {old!r}")
            site = site.replace(old, new)
        listens = re.findall(r"^\s*listen\s+(\S+)", site, re.M)
        self.assertTrue(
            all(address.startswith(("127.0.0.1:", "[::1]:")) for address in listens),
            f"{NGINX_SITE}: a listen directive the test does not know: {listens}",
        )
        prefix = os.path.join(self.workdir, "nginx")
        os.makedirs(prefix)
        with open(os.path.join(prefix, "matrix.conf"), "w", encoding="utf-8") as f:
            f.write(site)
        temp = "\n".join(
            f"    {kind}_temp_path {os.path.join(prefix, kind)};"
            for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
        )
        # One process (no master): a SIGKILL in cleanup leaves no worker behind.
        main = f"""daemon off;
master_process off;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log info;
events {{
    worker_connections 256;
}}
http {{
    log_format routed '$request_method $uri $status $upstream_addr';
    access_log {prefix}/access.log routed;
{temp}
    include {prefix}/matrix.conf;
}}
"""
        with open(os.path.join(prefix, "nginx.conf"), "w", encoding="utf-8") as f:
            f.write(main)
        return prefix

    # -- the clients ------------------------------------------------------

    async def _clients(
        self, base_url: str, tls: ssl.SSLContext, image: bytes, big_file: bytes
    ) -> ClientResults:
        alice = nio.AsyncClient(base_url, f"@alice:{self.server_name}", ssl=tls)
        bob = nio.AsyncClient(base_url, f"@bob:{self.server_name}", ssl=tls)
        try:
            return await self._converse(alice, bob, image, big_file)
        finally:
            await alice.close()
            await bob.close()

    def _ok(self, response: Any, expected: type, what: str) -> Any:
        self.assertIsInstance(response, expected, f"{what}: {response!r}")
        return response

    async def _converse(self, alice: Any, bob: Any, image: bytes, big_file: bytes) -> ClientResults:
        for client in (alice, bob):
            self._ok(await client.login(PASSWORD), nio.LoginResponse, f"{client.user} logs in")

        uploaded, _ = await alice.upload(
            io.BytesIO(image), content_type="image/png", filename="photo.png", filesize=len(image)
        )
        image_mxc = self._ok(uploaded, nio.UploadResponse, "upload of the image").content_uri
        self.assertEqual(media_id_of(image_mxc)[0], self.server_name)
        uploaded, _ = await alice.upload(
            io.BytesIO(big_file), content_type="application/x-test", filename="big.bin",
            filesize=len(big_file),
        )  # fmt: skip
        file_mxc = self._ok(uploaded, nio.UploadResponse, "upload of the big file").content_uri

        room = self._ok(
            await alice.room_create(name="media", invite=[bob.user_id]),
            nio.RoomCreateResponse,
            "room creation",
        )
        self._ok(await bob.join(room.room_id), nio.JoinResponse, "bob joins")
        # Bob's first sync: what he has seen so far; the events come after.
        self._ok(await bob.sync(timeout=0), nio.SyncResponse, "bob's first sync")

        image_content = {
            "msgtype": "m.image",
            "body": "photo.png",
            "url": image_mxc,
            "info": {"mimetype": "image/png", "size": len(image), "w": 640, "h": 400},
        }
        file_content = {
            "msgtype": "m.file",
            "body": "big.bin",
            "url": file_mxc,
            "info": {"mimetype": "application/x-test", "size": len(big_file)},
        }
        sent = []
        for content in (image_content, file_content):
            response = await alice.room_send(room.room_id, "m.room.message", content)
            sent.append(self._ok(response, nio.RoomSendResponse, f"send {content['msgtype']}"))

        seen: dict[str, Any] = {}
        loop = asyncio.get_running_loop()
        deadline = loop.time() + SYNC_DEADLINE
        while len(seen) < len(sent):
            self.assertLess(loop.time(), deadline, f"bob saw only {sorted(seen)} in time")
            sync = self._ok(await bob.sync(timeout=2000), nio.SyncResponse, "bob syncs")
            joined = sync.rooms.join.get(room.room_id)
            for event in joined.timeline.events if joined else []:
                if event.event_id in {s.event_id for s in sent}:
                    seen[event.event_id] = event
        image_event = seen[sent[0].event_id]
        file_event = seen[sent[1].event_id]
        self.assertIsInstance(image_event, nio.RoomMessageImage)
        self.assertIsInstance(file_event, nio.RoomMessageFile)
        self.assertEqual((image_event.url, file_event.url), (image_mxc, file_mxc))

        # Bob downloads both (authenticated media) and thumbnails the image.
        for event, data, content_type, name in (
            (image_event, image, "image/png", "photo.png"),
            (file_event, big_file, "application/x-test", "big.bin"),
        ):
            download = self._ok(
                await bob.download(mxc=event.url), nio.DownloadResponse, f"download {name}"
            )
            self.assertEqual(len(download.body), len(data), f"{name}: length")
            self.assertTrue(download.body == data, f"{name}: bytes differ from the upload")
            self.assertEqual((download.content_type, download.filename), (content_type, name))

        server, media_id = media_id_of(image_event.url)
        for width, height, method in ((96, 96, "crop"), (320, 240, "scale")):
            thumbnail = self._ok(
                await bob.thumbnail(server, media_id, width, height, nio.ResizingMethod(method)),
                nio.ThumbnailResponse,
                f"thumbnail {width}x{height} {method}",
            )
            fmt, (w, h) = image_size(thumbnail.body)
            self.assertEqual(thumbnail.content_type, f"image/{fmt.lower()}")
            if method == "crop":
                self.assertEqual((w, h), (width, height), "crop thumbnail's size")
            else:
                # Fits the box, touches it, keeps the photo's 16:10.
                self.assertEqual((w, h), (320, 200), "scale thumbnail's size")
        return ClientResults(image_mxc, file_mxc)

    # -- who answered -----------------------------------------------------

    def _assert_routing(
        self,
        nginx_access_log: str,
        media_log: str,
        results: ClientResults,
        image_id: str,
        media_port: int,
    ) -> None:
        with open(nginx_access_log, encoding="utf-8") as f:
            routed = [Routed(m, u, int(s), a) for m, u, s, a in (line.split() for line in f)]
        mediarepo_address = f"127.0.0.1:{media_port}"
        synapse_address = f"127.0.0.1:{self.port}"
        for routed_request in routed:
            uri = routed_request.uri
            expected = mediarepo_address if MEDIA_PATH.search(uri) else synapse_address
            self.assertEqual(
                routed_request.upstream, expected, f"nginx sent {routed_request} elsewhere"
            )
        server = self.server_name
        file_id = media_id_of(results.file_mxc)[1]
        answered = {(r.method, r.uri, r.status) for r in routed}
        for method, uri, status in (
            ("POST", "/_matrix/media/v3/upload", 200),
            ("GET", f"/_matrix/client/v1/media/download/{server}/{image_id}", 200),
            ("GET", f"/_matrix/client/v1/media/download/{server}/{file_id}", 200),
            ("GET", f"/_matrix/client/v1/media/thumbnail/{server}/{image_id}", 200),
            ("GET", f"/_synapse/admin/v1/media/{server}/{image_id}", 200),
            ("GET", f"/_synapse/admin/v1/users/@alice:{server}/media", 200),
            ("GET", f"/_matrix/federation/v1/media/download/{image_id}", 401),
            ("POST", "/_matrix/client/v3/login", 200),
            ("GET", "/_matrix/client/v3/sync", 200),
            ("POST", "/_matrix/client/v3/createRoom", 200),
            ("GET", "/_matrix/key/v2/server", 200),
        ):
            self.assertIn((method, uri, status), answered, "nginx's access log")

        # mediarepo logged the media requests into its worker_log_config file ...
        with open(media_log, encoding="utf-8") as f:
            ours = f.read()
        for request in (
            r"POST /_matrix/media/v3/upload\?filename=photo\.png",
            rf"GET /_matrix/client/v1/media/download/{server}/{image_id}",
            rf"GET /_matrix/client/v1/media/thumbnail/{server}/{image_id}\?width=96&height=96",
            rf"GET /_synapse/admin/v1/media/{server}/{image_id}",
        ):
            self.assertRegex(ours, rf" - mediarepo\.access - .* 200 {request}", media_log)
        # ... and nothing into Synapse's, which saw no media request at all.
        synapse_log = tail(self.log_files[0], 1_000_000)
        self.assertNotIn(" - mediarepo.", synapse_log, "mediarepo logged into Synapse's log")
        synapse_requests = re.findall(
            r" - synapse\.access\.http\.\d+ - .*\"(\w+ \S+) HTTP/1\.1\"", synapse_log
        )
        self.assertIn(
            "POST /_matrix/client/v3/createRoom", synapse_requests, "Synapse's access log"
        )
        media_requests = [
            r for r in synapse_requests if MEDIA_PATH.search(r.split()[1].split("?")[0])
        ]
        self.assertEqual(media_requests, [], "media requests that reached Synapse")

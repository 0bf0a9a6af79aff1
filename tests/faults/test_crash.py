"""SIGKILL under load, then restart: nothing acknowledged is lost.

Each round sends 200 requests at once to a server run as an operator runs
it (``python -m mediarepo``, alone and with ``--workers 2``): uploads and
PUTs into reservations, a third of them real images, so thumbnails are
owed. Once some of them have been answered the server is killed with
SIGKILL (the whole process group with workers), its staging leftovers are
made older than the sweep's age limit, and it is started again. Then:

* every acknowledged upload downloads byte for byte;
* every image with a row (acknowledged or not) gets its thumbnails, rows
  and files, resumed from what the dead process recorded;
* a PUT that was not answered can be retried: 200 if the reservation has
  no content (not 409 while the dead process's lock or file lingers), 409
  if it has (the PUT landed; then its bytes download);
* no row with content lacks its file, no file under ``local_content`` lacks
  its row, every thumbnail row has its file, and the start-up sweep leaves
  no staging file; nothing stays recorded as owed.

Per round it prints the uploads acknowledged and cut off, the thumbnails
owed at the kill, and how long the restart took to serve and to finish
them. On SQLite and PostgreSQL.
"""

from __future__ import annotations

import http.client
import io
import json
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import attrs
import psycopg2
import yaml
from PIL import Image
from twisted.internet.threads import deferToThread
from twisted.trial import unittest

import mediarepo
from mediarepo.federation.keys import write_new_signing_key
from mediarepo.media.paths import local_media_path, local_thumbnail_path
from tests.processes import STARTUP_TIMEOUT, free_port
from tests.utils import database_section

SERVER_NAME = "crash.test"
CONCURRENT = 200
# The kill comes once this share of the requests has been answered.
KILL_AFTER_SHARE = 0.35
ROUNDS = 2
# How long a restarted server may take to make every owed thumbnail.
RECOVERY_TIMEOUT = 30.0
REQUEST_TIMEOUT = 30.0


@attrs.frozen
class Sent:
    """One request of the load: what was sent, and how."""

    kind: str  # "post" or "put"
    data: bytes
    content_type: str
    media_id: str | None = None  # a PUT's reservation


@attrs.define
class Outcome:
    sent: Sent
    media_id: str | None = None  # set when acknowledged
    acknowledged: bool = False


def random_image(rng: random.Random) -> tuple[bytes, str]:
    """A small real image of noise (distinct bytes, slow enough to thumbnail)."""
    width, height = rng.randint(200, 700), rng.randint(150, 500)
    image = Image.frombytes("RGB", (width, height), rng.randbytes(width * height * 3))
    out = io.BytesIO()
    if rng.random() < 0.7:
        image.save(out, "JPEG", quality=75)
        return out.getvalue(), "image/jpeg"
    image.resize((width // 3, height // 3)).save(out, "PNG")
    return out.getvalue(), "image/png"


class CrashTests(unittest.TestCase):
    engine = "sqlite3"
    timeout = 240

    # -- set-up: config, database, user ---------------------------------------

    def setUp(self) -> None:
        self.workdir = tempfile.mkdtemp(prefix="mediarepo-crash-")
        self.addCleanup(shutil.rmtree, self.workdir, True)
        cleanups: list[Callable[[], None]] = []
        self.database = database_section(self.engine, self.workdir, cleanups)
        for cleanup in cleanups:
            self.addCleanup(cleanup)
        self.port = free_port()
        self.store = os.path.join(self.workdir, "media_store")
        self.config_path = os.path.join(self.workdir, "homeserver.yaml")
        config: dict[str, Any] = {
            "server_name": SERVER_NAME,
            "listeners": [
                {"port": self.port, "bind_addresses": ["127.0.0.1"], "type": "http",
                 "resources": [{"names": ["client", "media"]}]},
            ],
            "database": self.database,
            "media_store_path": self.store,
            "signing_key_path": os.path.join(self.workdir, "signing.key"),
            "max_pending_media_uploads": 10_000,
            "rc_media_create": {"per_second": 10_000, "burst_count": 10_000},
        }  # fmt: skip
        with open(self.config_path, "w") as f:
            yaml.safe_dump(config, f)
        write_new_signing_key(config["signing_key_path"])
        self.process: subprocess.Popen[bytes] | None = None
        self.addCleanup(self._kill)
        self.rng = random.Random(13)
        self.logs = 0
        # The server runs the code under test, installed or not.
        self.env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(mediarepo.__file__)))

    def _register(self) -> str:
        result = subprocess.run(
            [sys.executable, "-m", "mediarepo", "register-user", "-c", self.config_path,
             f"@crash:{SERVER_NAME}"],
            cwd=self.workdir, env=self.env, capture_output=True, text=True,
            timeout=STARTUP_TIMEOUT, check=False,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        return result.stdout.strip().splitlines()[-1]

    def query(self, sql: str, *args: object) -> list[tuple[Any, ...]]:
        """A statement on the server's database, from outside it."""
        params = self.database["args"]
        if self.engine == "sqlite3":
            conn = sqlite3.connect(params["database"], timeout=10)
            try:
                return conn.execute(sql, args).fetchall()
            finally:
                conn.close()
        pg = psycopg2.connect(**{k: v for k, v in params.items() if k not in ("cp_min", "cp_max")})
        try:
            with pg.cursor() as cur:
                cur.execute(sql.replace("?", "%s"), args or None)
                rows: list[tuple[Any, ...]] = cur.fetchall()
                return rows
        finally:
            pg.close()

    # -- the server process --------------------------------------------------

    def _start(self, workers: int) -> float:
        """Start the server; returns the seconds until it answered."""
        argv = [sys.executable, "-m", "mediarepo", "-c", self.config_path]
        if workers > 1:
            argv += ["--workers", str(workers)]
        log = open(os.path.join(self.workdir, f"server-{self.logs}.log"), "wb")
        self.logs += 1
        self.addCleanup(log.close)
        started = time.monotonic()
        # A session of its own: SIGKILL reaches the supervisor and its workers.
        self.process = subprocess.Popen(
            argv, cwd=self.workdir, env=self.env, stdin=subprocess.DEVNULL, stdout=log,
            stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        deadline = started + STARTUP_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                with open(log.name, "rb") as f:
                    raise AssertionError(f"the server exited: {f.read()[-3000:]!r}")
            try:
                # Any JSON answer means a process is serving (with workers, the
                # supervisor's socket takes connections before then).
                status, _ = self.http("GET", "/_matrix/client/v1/media/config", timeout=2)
                if status in (200, 401):
                    return time.monotonic() - started
            except OSError:
                pass
            time.sleep(0.05)
        raise AssertionError("the server did not answer")

    def _kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        self.process = None

    def _stop(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        self.assertEqual(self.process.wait(30), 0)
        self.process = None

    def http(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
        timeout: float = REQUEST_TIMEOUT,
    ) -> tuple[int, bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            all_headers = {"Authorization": f"Bearer {self.token}", **(headers or {})}
            conn.request(method, path, body=body, headers=all_headers)
            response = conn.getresponse()
            return response.status, response.read()
        finally:
            conn.close()

    # -- one round -----------------------------------------------------------

    def _load(self) -> list[Sent]:
        """The round's requests: reservations are made first (they are quick);
        their PUTs go with the uploads."""
        load = []
        for i in range(CONCURRENT):
            if i % 3 == 0:
                data, content_type = random_image(self.rng)
            else:
                data = self.rng.randbytes(self.rng.randint(1_000, 200_000))
                content_type = "application/octet-stream"
            if i % 2:
                status, body = self.http("POST", "/_matrix/media/v1/create")
                assert status == 200, body
                media_id = json.loads(body)["content_uri"].rsplit("/", 1)[1]
                load.append(Sent("put", data, content_type, media_id))
            else:
                load.append(Sent("post", data, content_type))
        self.rng.shuffle(load)
        return load

    def _send(self, sent: Sent) -> Outcome:
        outcome = Outcome(sent)
        headers = {"Content-Type": sent.content_type}
        try:
            if sent.kind == "post":
                status, body = self.http("POST", "/_matrix/media/v3/upload", sent.data, headers)
                if status == 200:
                    outcome.media_id = json.loads(body)["content_uri"].rsplit("/", 1)[1]
            else:
                path = f"/_matrix/media/v3/upload/{SERVER_NAME}/{sent.media_id}"
                status, body = self.http("PUT", path, sent.data, headers)
                if status == 200:
                    outcome.media_id = sent.media_id
        except (OSError, http.client.HTTPException):
            return outcome  # cut off by the kill
        # Before the kill every request succeeds.
        assert status == 200, (status, body)
        outcome.acknowledged = True
        return outcome

    def _load_and_kill(self, load: list[Sent]) -> list[Outcome]:
        answered = threading.Semaphore(0)
        threshold = int(len(load) * KILL_AFTER_SHARE)

        def send(sent: Sent) -> Outcome:
            try:
                return self._send(sent)
            finally:
                answered.release()

        with ThreadPoolExecutor(max_workers=len(load)) as pool:
            futures = [pool.submit(send, sent) for sent in load]
            for _ in range(threshold):
                answered.acquire()
            self._kill()
            return [future.result() for future in futures]

    def _owed_thumbnails(self) -> int | None:
        try:
            return int(self.query("SELECT COUNT(*) FROM mediarepo_pending_thumbnails")[0][0])
        except Exception:
            return None  # a server without the table (older code)

    def _images_without_thumbnails(self) -> list[str]:
        return [
            row[0]
            for row in self.query(
                "SELECT media_id FROM local_media_repository WHERE media_length IS NOT NULL"
                " AND media_type LIKE 'image/%' AND media_id NOT IN"
                " (SELECT media_id FROM local_media_repository_thumbnails)"
            )
        ]

    def _round(self, number: int, workers: int) -> None:
        load = self._load()
        outcomes = self._load_and_kill(load)
        acknowledged = [o for o in outcomes if o.acknowledged]
        owed = self._owed_thumbnails()
        missing_at_kill = len(self._images_without_thumbnails())
        # Everything the dead server left in staging is older than the sweep's limit.
        staging = os.path.join(self.store, ".mediarepo_tmp")
        old = time.time() - 2 * 3600
        for name in os.listdir(staging):
            os.utime(os.path.join(staging, name), (old, old))

        restarted = time.monotonic()
        serving = self._start(workers)
        while True:
            missing = self._images_without_thumbnails()
            if not missing and not self._owed_thumbnails():
                break
            elapsed = time.monotonic() - restarted
            self.assertLess(
                elapsed, RECOVERY_TIMEOUT,
                f"round {number}: {len(missing)} images still without thumbnails",
            )  # fmt: skip
            time.sleep(0.1)
        recovered = time.monotonic() - restarted
        images = sum(1 for o in acknowledged if o.sent.content_type.startswith("image/"))
        print(
            f"\n[{self.engine}, workers {workers}, round {number}] acknowledged"
            f" {len(acknowledged)}/{len(load)} ({images} images), cut off"
            f" {len(load) - len(acknowledged)}; images without thumbnails at the kill:"
            f" {missing_at_kill}, recorded as owed: {owed}; restart served in {serving:.2f} s,"
            f" thumbnails done in {recovered:.2f} s",
            file=sys.stderr,
        )

        for outcome in acknowledged:
            status, body = self.http(
                "GET", f"/_matrix/client/v1/media/download/{SERVER_NAME}/{outcome.media_id}"
            )
            self.assertEqual(status, 200, outcome.media_id)
            self.assertEqual(body, outcome.sent.data, outcome.media_id)

        for outcome in outcomes:
            if outcome.acknowledged or outcome.sent.kind != "put":
                continue
            self._retry_put(outcome.sent)

        self._check_store()

    def _retry_put(self, sent: Sent) -> None:
        """A PUT cut off by the kill, tried again as a client would."""
        assert sent.media_id is not None
        (length,) = self.query(
            "SELECT media_length FROM local_media_repository WHERE media_id = ?", sent.media_id
        )[0]
        path = f"/_matrix/media/v3/upload/{SERVER_NAME}/{sent.media_id}"
        status, body = self.http("PUT", path, sent.data, {"Content-Type": sent.content_type})
        if length is None:
            self.assertEqual(status, 200, (sent.media_id, body))
        else:
            # It landed before the kill, unanswered: the content stays.
            self.assertEqual(status, 409, (sent.media_id, body))
        status, body = self.http(
            "GET", f"/_matrix/client/v1/media/download/{SERVER_NAME}/{sent.media_id}"
        )
        self.assertEqual((status, body == sent.data), (200, True), sent.media_id)

    def _check_store(self) -> None:
        # The retried PUTs' images are being thumbnailed (owed rows, files
        # in staging): let that work finish before looking.
        staging_dir = os.path.join(self.store, ".mediarepo_tmp")
        deadline = time.monotonic() + RECOVERY_TIMEOUT
        while (self._owed_thumbnails() or os.listdir(staging_dir)) and (
            time.monotonic() < deadline
        ):
            time.sleep(0.1)
        rows = {
            media_id: length
            for media_id, length in self.query(
                "SELECT media_id, media_length FROM local_media_repository"
                " WHERE media_length IS NOT NULL"
            )
        }
        for media_id, length in rows.items():
            path = os.path.join(self.store, local_media_path(media_id))
            self.assertTrue(os.path.isfile(path), f"{media_id} has a row but no file")
            self.assertEqual(os.path.getsize(path), length, media_id)
        content = os.path.join(self.store, "local_content")
        for root, _dirs, names in os.walk(content):
            for name in names:
                parts = os.path.relpath(os.path.join(root, name), content).split(os.sep)
                self.assertIn("".join(parts), rows, "a file without its row")
        for media_id, width, height, content_type, method in self.query(
            "SELECT media_id, thumbnail_width, thumbnail_height, thumbnail_type,"
            " thumbnail_method FROM local_media_repository_thumbnails"
        ):
            path = local_thumbnail_path(media_id, width, height, content_type, method)
            self.assertTrue(os.path.isfile(os.path.join(self.store, path)), f"no file for {path}")
        # The start-up sweep took the dead server's staging files (the
        # retried PUTs' own are gone with their answers).
        staging = os.listdir(staging_dir)
        self.assertEqual(staging, [], "staging files outlived the sweep")
        self.assertEqual(self._owed_thumbnails(), 0)

    def _rounds(self, workers: int) -> None:
        self.token = self._register()
        self._start(workers)
        for number in range(1, ROUNDS + 1):
            self._round(number, workers)
        self._stop()

    def test_sigkill_one_process(self) -> Any:
        return deferToThread(self._rounds, 1)

    def test_sigkill_workers(self) -> Any:
        return deferToThread(self._rounds, 2)


class CrashPostgresTests(CrashTests):
    engine = "psycopg2"

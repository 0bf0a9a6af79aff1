"""A 10 s PostgreSQL outage under load, on the server as an operator runs it.

The server (``python -m mediarepo``, then ``--workers 2``) reaches its own
test database through a TCP proxy on loopback that the test cuts (the
machine's PostgreSQL itself is shared and never touched): every connection
is closed and new ones are blackholed (accepted, never answered: connects
wait for their timeout) or refused. Under a steady load of uploads and
downloads:

* every request answers within OUTAGE_ANSWER_LIMIT seconds, before, during
  and after the outage: a success, or a JSON Matrix error (503 M_UNKNOWN),
  never a hang, a dropped connection or a 500;
* from RECOVERY_LIMIT seconds after the proxy is back, every request
  succeeds again;
* LISTEN comes back in every process (its backend is seen again in
  pg_stat_activity, and the log says so);
* every upload acknowledged, before, during or after, downloads intact;
* SIGTERM then stops the server within its grace period, exit status 0;
* the server's log has no traceback.

The figures measured are printed (max answer time during the outage, time
to recover, to LISTEN again, to stop).
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

import attrs
import psycopg2
import yaml
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThread

from mediarepo.app import SHUTDOWN_GRACE_SECONDS
from mediarepo.federation.keys import write_new_signing_key
from mediarepo.storage.notifications import CHANGED_CHANNEL
from tests.processes import ServerProcesses, free_port
from tests.tcp_proxy import TcpProxy
from tests.utils import create_postgres_database, drop_postgres_database, postgres_params

SERVER_NAME = "outage.test"
OUTAGE_SECONDS = 10.0
# Every request answers within this, whatever the database does (a connect
# to a blackholed server gives up after connect_timeout, 2 s).
OUTAGE_ANSWER_LIMIT = 3.0
# From this long after the database is back, every request succeeds.
RECOVERY_LIMIT = 2.0
# LISTEN reconnects with backoff capped at 5 s.
LISTEN_LIMIT = 8.0
LOAD_THREADS = 4
BODY_BYTES = 4096


@attrs.frozen
class Outcome:
    kind: str  # "upload" or "download"
    started: float
    seconds: float
    status: int | None  # None: no answer (the error says why)
    content_type: str | None
    body: bytes
    error: str | None = None


class Load:
    """Uploads and downloads in a loop on a few threads, every outcome kept."""

    def __init__(self, port: int, token: str) -> None:
        self._port = port
        self._token = token
        self.outcomes: list[Outcome] = []
        # Acknowledged uploads: media ID -> SHA-256 of the body.
        self.acknowledged: dict[str, str] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._run, name=f"load-{i}", daemon=True)
            for i in range(LOAD_THREADS)
        ]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(30)

    def request(self, method: str, path: str, body: bytes | None = None) -> Outcome:
        kind = "upload" if method == "POST" else "download"
        started = time.monotonic()
        headers = {"Authorization": f"Bearer {self._token}", "Connection": "close"}
        if body is not None:
            headers["Content-Type"] = "application/octet-stream"
        conn = http.client.HTTPConnection("127.0.0.1", self._port, timeout=15)
        try:
            conn.request(method, path, body=body, headers=headers)
            response = conn.getresponse()
            data = response.read()
            return Outcome(
                kind, started, time.monotonic() - started, response.status,
                response.getheader("Content-Type"), data,
            )  # fmt: skip
        except (OSError, http.client.HTTPException) as e:
            return Outcome(kind, started, time.monotonic() - started, None, None, b"", repr(e))
        finally:
            conn.close()

    def _run(self) -> None:
        latest: str | None = None
        while not self._stop.is_set():
            body = os.urandom(BODY_BYTES)
            upload = self.request("POST", "/_matrix/media/v3/upload", body)
            outcomes = [upload]
            if upload.status == 200:
                media_id = json.loads(upload.body)["content_uri"].rsplit("/", 1)[1]
                with self._lock:
                    self.acknowledged[media_id] = hashlib.sha256(body).hexdigest()
                latest = media_id
            if latest is not None:
                outcomes.append(self.request("GET", download_path(latest)))
            with self._lock:
                self.outcomes += outcomes
            self._stop.wait(0.02)


def download_path(media_id: str) -> str:
    return f"/_matrix/client/v1/media/download/{SERVER_NAME}/{media_id}"


class DatabaseOutageTests(ServerProcesses):
    timeout = 120

    def setUp(self) -> None:
        self.workdir = tempfile.mkdtemp(prefix="mediarepo-outage-")
        self.addCleanup(shutil.rmtree, self.workdir, True)
        self.processes: list[subprocess.Popen[bytes]] = []
        self.addCleanup(self._kill_all)
        self.dbname = create_postgres_database()
        self.addCleanup(drop_postgres_database, self.dbname)
        self.proxy = TcpProxy(postgres_params()["host"], postgres_params()["port"])
        self.addCleanup(self.proxy.close)
        self.port = free_port()
        self.config_path = os.path.join(self.workdir, "homeserver.yaml")
        config: dict[str, Any] = {
            "server_name": SERVER_NAME,
            "listeners": [
                {
                    "port": self.port,
                    "bind_addresses": ["127.0.0.1"],
                    "type": "http",
                    "resources": [{"names": ["client", "media"]}],
                }
            ],
            "database": {
                "name": "psycopg2",
                "args": {
                    **postgres_params(),
                    "host": "127.0.0.1",
                    "port": self.proxy.port,
                    "dbname": self.dbname,
                    "cp_min": 2,
                    "cp_max": 5,
                },
            },
            "media_store_path": os.path.join(self.workdir, "media_store"),
            "signing_key_path": os.path.join(self.workdir, "signing.key"),
            "enable_authenticated_media": True,
        }
        with open(self.config_path, "w") as f:
            yaml.safe_dump(config, f)
        write_new_signing_key(config["signing_key_path"])

    def listening_backends(self) -> int:
        """This test database's sessions whose last statement was our last
        LISTEN (the connection listens on each channel in turn)."""
        conn = psycopg2.connect(dbname="postgres", **postgres_params())
        try:
            with conn.cursor() as cur:
                cur.execute(
                    "SELECT COUNT(*) FROM pg_stat_activity WHERE datname = %s AND query = %s",
                    (self.dbname, f"LISTEN {CHANGED_CHANNEL}"),
                )
                row = cur.fetchone()
                assert row is not None
                return int(row[0])
        finally:
            conn.close()

    def wait_for_listeners(self, count: int, within: float) -> float:
        started = time.monotonic()
        while self.listening_backends() != count:
            if time.monotonic() - started > within:
                raise AssertionError(
                    f"{self.listening_backends()} LISTEN sessions after {within}s, not {count}"
                )
            time.sleep(0.1)
        return time.monotonic() - started

    def run_outage(self, workers: int, mode: str) -> None:
        register = self._mediarepo("register-user", "-c", self.config_path, f"@alice:{SERVER_NAME}")
        self.assertEqual(register.returncode, 0, register.stderr)
        token = register.stdout.strip().splitlines()[-1]
        argv = [sys.executable, "-m", "mediarepo", "-c", self.config_path]
        if workers > 1:
            argv += ["--workers", str(workers)]
        process = self._start(argv, self.port)
        log_path = os.path.join(self.workdir, f"server-{len(self.processes) - 1}.log")
        self.wait_for_listeners(workers, 20)

        load = Load(self.port, token)
        load.start()
        try:
            time.sleep(1.5)  # load before the outage
            cut_at = time.monotonic()
            self.proxy.cut(mode)
            time.sleep(OUTAGE_SECONDS)
            restored_at = time.monotonic()
            self.proxy.restore()
            listen_seconds = self.wait_for_listeners(workers, LISTEN_LIMIT)
            remaining = restored_at + RECOVERY_LIMIT + 2.0 - time.monotonic()
            if remaining > 0:
                time.sleep(remaining)
        finally:
            load.stop()
        outcomes = load.outcomes

        # Every request answered, in time, with success or a JSON error.
        no_answer = [o for o in outcomes if o.status is None]
        self.assertEqual(no_answer, [], "requests without an answer")
        slow = [o for o in outcomes if o.seconds > OUTAGE_ANSWER_LIMIT]
        self.assertEqual(slow, [], f"requests slower than {OUTAGE_ANSWER_LIMIT}s")
        for o in outcomes:
            if o.status == 200:
                continue
            self.assertEqual(o.status, 503, o)
            self.assertEqual(o.content_type, "application/json", o)
            self.assertEqual(json.loads(o.body)["errcode"], "M_UNKNOWN", o)

        before = [o for o in outcomes if o.started + o.seconds < cut_at]
        during = [o for o in outcomes if cut_at <= o.started < restored_at]
        after = [o for o in outcomes if o.started >= restored_at]
        self.assertTrue(before and all(o.status == 200 for o in before), "load before the cut")
        refused = [o for o in during if o.status == 503]
        self.assertGreater(len(refused), 20, "the outage was seen")
        failed_after = [o for o in after if o.status != 200]
        recovery = max((o.started - restored_at for o in failed_after), default=0.0)
        self.assertLess(recovery, RECOVERY_LIMIT, "requests still failing after the outage")
        self.assertTrue(
            any(o.kind == "upload" and o.status == 200 for o in after), "uploads succeed again"
        )

        # Nothing acknowledged was lost.
        checker = Load(self.port, token)
        for media_id, digest in load.acknowledged.items():
            o = checker.request("GET", download_path(media_id))
            self.assertEqual(o.status, 200, (media_id, o))
            self.assertEqual(hashlib.sha256(o.body).hexdigest(), digest, media_id)

        stopping = time.monotonic()
        self.assertEqual(self._stop(process, SHUTDOWN_GRACE_SECONDS + 20), 0)
        stop_seconds = time.monotonic() - stopping
        self.assertLess(stop_seconds, SHUTDOWN_GRACE_SECONDS)

        with open(log_path, errors="replace") as f:
            log = f.read()
        # Losing the database is told in a few one-line warnings, not a
        # traceback per request.
        self.assertNotIn("Traceback", log)
        self.assertGreaterEqual(log.count("database reachable again"), 1)
        self.assertEqual(log.count("listening for notifications"), 2 * workers)
        self.assertEqual(log.count("mediarepo stopped"), workers)

        longest = max(o.seconds for o in during)

        def succeeded(kind: str) -> int:
            return sum(1 for o in during if o.kind == kind and o.status == 200)

        print(
            f"\n[{workers} worker(s), {mode}] {len(outcomes)} requests, "
            f"{len(load.acknowledged)} uploads acknowledged; during the {OUTAGE_SECONDS:.0f}s "
            f"outage {len(refused)} answered 503, {succeeded('upload')} uploads and "
            f"{succeeded('download')} downloads succeeded, "
            f"slowest {longest:.2f}s; slowest overall "
            f"{max(o.seconds for o in outcomes):.2f}s; last failure {recovery:.2f}s after "
            f"the restore; LISTEN back after {listen_seconds:.1f}s; stopped in "
            f"{stop_seconds:.2f}s",
            file=sys.stderr,
        )

    def test_one_process_blackholed(self) -> Deferred[None]:
        return deferToThread(self.run_outage, 1, "blackhole")

    def test_two_workers_refused(self) -> Deferred[None]:
        return deferToThread(self.run_outage, 2, "refuse")

"""Started as Synapse starts a media worker: ``-c homeserver.yaml -c
workers/media.yaml``, under every launcher, failing loudly when it cannot.

* A start that fails (a port in use, a database that is not there) exits
  non-zero under ``python -m mediarepo``, the ``mediarepo`` script,
  ``twistd -n mediarepo`` and ``--workers 2``, with one line naming the file,
  the key and the value.
* Two instances on one database: only the one
  ``media_instance_running_background_jobs`` names runs the background jobs
  (here: retention purging media nobody read for a day).
* ``worker_pid_file`` holds the pid while the worker runs.

Blocking code (subprocesses, sockets) runs in threads so the trial reactor
stays free.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from typing import Any

import yaml
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThread
from twisted.trial import unittest

import mediarepo
from mediarepo.federation.keys import write_new_signing_key
from tests.processes import free_port

SERVER_NAME = "worker.test"
TIMEOUT = 60.0


class WorkerDeploymentTests(unittest.TestCase):
    timeout = 240

    def setUp(self) -> None:
        self.workdir = tempfile.mkdtemp(prefix="mediarepo-worker-")
        self.addCleanup(shutil.rmtree, self.workdir, True)
        self.processes: list[subprocess.Popen[bytes]] = []
        self.addCleanup(self._kill_all)
        self.bin = os.path.dirname(sys.executable)
        # twistd finds plugins in the twisted/plugins folders on sys.path.
        self.env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(mediarepo.__file__)))

    def _kill_all(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.kill()
                process.wait()

    def _write(self, name: str, data: dict[str, Any]) -> str:
        path = os.path.join(self.workdir, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            yaml.safe_dump(data, f)
        return path

    def _homeserver(self, **extra: Any) -> str:
        """Synapse's own homeserver.yaml, with Synapse's listener on a port
        this test holds (as Synapse would)."""
        data = {
            "server_name": SERVER_NAME,
            "report_stats": False,
            "listeners": [
                {"port": self.synapse_port, "bind_addresses": ["127.0.0.1"], "type": "http",
                 "resources": [{"names": ["client", "federation"]}]},
            ],
            "database": {
                "name": "sqlite3",
                "args": {"database": os.path.join(self.workdir, "homeserver.db")},
            },
            "media_store_path": os.path.join(self.workdir, "media_store"),
            "signing_key_path": os.path.join(self.workdir, "signing.key"),
            "enable_media_repo": False,
            **extra,
        }  # fmt: skip
        if not os.path.exists(data["signing_key_path"]):
            write_new_signing_key(data["signing_key_path"])
        return self._write("homeserver.yaml", data)

    def _worker(self, name: str, port: int, **extra: Any) -> str:
        data = {
            "worker_app": "synapse.app.media_repository",
            "worker_name": name,
            "worker_listeners": [
                {"type": "http", "port": port, "bind_addresses": ["127.0.0.1"],
                 "resources": [{"names": ["media"]}]},
            ],
            **extra,
        }  # fmt: skip
        return self._write(f"workers/{name}.yaml", data)

    def _hold_port(self) -> int:
        """A port some other program (Synapse, here) is listening on."""
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sock.listen(1)
        self.addCleanup(sock.close)
        port: int = sock.getsockname()[1]
        return port

    def _run_to_exit(self, argv: list[str]) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            argv, cwd=self.workdir, env=self.env, capture_output=True, text=True,
            timeout=TIMEOUT, stdin=subprocess.DEVNULL, check=False,
        )  # fmt: skip

    def _start(self, argv: list[str], port: int, log_name: str) -> subprocess.Popen[bytes]:
        log = open(os.path.join(self.workdir, log_name), "wb")
        self.addCleanup(log.close)
        process = subprocess.Popen(
            argv, cwd=self.workdir, env=self.env, stdin=subprocess.DEVNULL,
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        self.processes.append(process)
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            self.assertIsNone(process.poll(), f"exited early; see {log.name}")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return process
            except OSError:
                time.sleep(0.1)
        raise AssertionError(f"did not start listening; see {log.name}")

    def _launchers(self, config_args: list[str]) -> dict[str, list[str]]:
        return {
            "python -m": [sys.executable, "-m", "mediarepo", *config_args],
            "script": [os.path.join(self.bin, "mediarepo"), *config_args],
            "twistd": [os.path.join(self.bin, "twistd"), "--nodaemon", "--pidfile=",
                       "mediarepo", *config_args],
            "--workers": [sys.executable, "-m", "mediarepo", *config_args, "--workers", "2"],
        }  # fmt: skip

    def test_port_in_use_fails_every_launcher_with_one_line(self) -> Deferred[None]:
        def run() -> None:
            self.synapse_port = self._hold_port()
            taken = self._hold_port()
            homeserver = self._homeserver()
            worker = self._worker("media1", taken)
            expected = f"worker_listeners[0] in {worker}: 127.0.0.1:{taken} is already in use"
            for name, argv in self._launchers(["-c", homeserver, "-c", worker]).items():
                result = self._run_to_exit(argv)
                self.assertNotEqual(result.returncode, 0, f"{name}: {result.stderr}")
                output = result.stdout + result.stderr
                self.assertIn(expected, output, name)
                self.assertNotIn("Traceback", output, name)
                if name != "twistd":  # twistd logs to stdout; it has no stderr line
                    self._assert_one_error_line(result.stderr, f"mediarepo: {expected}")

        return deferToThread(run)

    def test_missing_database_fails_with_one_line(self) -> Deferred[None]:
        def run() -> None:
            self.synapse_port = self._hold_port()
            closed = free_port()  # nothing listens there
            homeserver = self._homeserver(
                database={"name": "psycopg2",
                          "args": {"host": "127.0.0.1", "port": closed, "user": "synapse",
                                   "dbname": "synapse", "connect_timeout": 5}},
            )  # fmt: skip
            worker = self._worker("media1", free_port())
            for name in ("python -m", "twistd"):
                argv = self._launchers(["-c", homeserver, "-c", worker])[name]
                result = self._run_to_exit(argv)
                self.assertNotEqual(result.returncode, 0, f"{name}: {result.stderr}")
                output = result.stdout + result.stderr
                self.assertIn(
                    "start-up failed: database unavailable: connection to server", output, name
                )
                self.assertNotIn("Traceback", output, name)
                if name == "python -m":
                    self.assertTrue(
                        result.stderr.strip()
                        .splitlines()[-1]
                        .startswith(
                            "mediarepo: start-up failed: database unavailable: connection to server"
                        ),
                        output,
                    )
                    self._assert_one_error_line(result.stderr)

        return deferToThread(run)

    def test_only_the_named_instance_runs_background_jobs(self) -> Deferred[None]:
        def run() -> None:
            self.synapse_port = self._hold_port()
            homeserver = self._homeserver(
                media_instance_running_background_jobs="media1",
                media_retention={"local_media_lifetime": "1d"},
            )
            port1, port2 = free_port(), free_port()
            pid_file = os.path.join(self.workdir, "media2.pid")
            media1 = self._worker("media1", port1)
            media2 = self._worker("media2", port2, worker_pid_file=pid_file)
            register = self._run_to_exit(
                [sys.executable, "-m", "mediarepo", "register-user", "-c", homeserver,
                 "-c", media2, f"@alice:{SERVER_NAME}"]
            )  # fmt: skip
            self.assertEqual(register.returncode, 0, register.stderr)
            token = register.stdout.strip().splitlines()[-1]

            argv2 = [sys.executable, "-m", "mediarepo", "-c", homeserver, "-c", media2]
            second = self._start(argv2, port2, "media2.log")
            with open(pid_file) as f:
                self.assertEqual(int(f.read()), second.pid)
            media_id = self._upload(port2, token)
            # Nobody has read it for two days.
            database = sqlite3.connect(
                os.path.join(self.workdir, "homeserver.db"), check_same_thread=False
            )
            self.addCleanup(database.close)
            with database:
                database.execute(
                    "UPDATE local_media_repository SET created_ts = 1, last_access_ts = 1"
                )
            second.send_signal(signal.SIGTERM)
            self.assertEqual(second.wait(30), 0)
            self.assertFalse(os.path.exists(pid_file))
            # Started again, media2 runs no jobs: the media stays.
            second = self._start(argv2, port2, "media2-again.log")
            self._upload(port2, token)
            self.assertEqual(self._rows(database, media_id), 1)
            # media1 is the named instance: its retention purges it.
            self._start([sys.executable, "-m", "mediarepo", "-c", homeserver, "-c", media1],
                        port1, "media1.log")  # fmt: skip
            deadline = time.monotonic() + TIMEOUT
            while self._rows(database, media_id) and time.monotonic() < deadline:
                time.sleep(0.1)
            self.assertEqual(self._rows(database, media_id), 0)
            second.send_signal(signal.SIGTERM)
            self.assertEqual(second.wait(30), 0)
            with open(os.path.join(self.workdir, "media2-again.log")) as f:
                self.assertIn("media background jobs are left to instance media1", f.read())

        return deferToThread(run)

    def _assert_one_error_line(self, stderr: str, last_line: str | None = None) -> None:
        """The reason is said once in the log and once as the last line."""
        lines = stderr.strip().splitlines()
        if last_line is not None:
            self.assertEqual(lines[-1], last_line, stderr)
        errors = [line for line in lines if " - ERROR - " in line or " - CRITICAL - " in line]
        self.assertLessEqual(len(errors), 1, stderr)

    def _rows(self, database: sqlite3.Connection, media_id: str) -> int:
        (count,) = database.execute(
            "SELECT count(*) FROM local_media_repository WHERE media_id = ?", (media_id,)
        ).fetchone()
        return int(count)

    def _upload(self, port: int, token: str) -> str:
        import http.client
        import json

        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        try:
            connection.request(
                "POST", "/_matrix/media/v3/upload", body=os.urandom(1000),
                headers={"Authorization": f"Bearer {token}",
                         "Content-Type": "application/octet-stream"},
            )  # fmt: skip
            response = connection.getresponse()
            body = response.read()
        finally:
            connection.close()
        self.assertEqual(response.status, 200, body)
        return str(json.loads(body)["content_uri"].rsplit("/", 1)[1])

"""The server as an operator runs it: a separate process, started from the
command line, stopped by a signal.

* ``--generate-config`` writes a config and a Synapse-format signing key;
  ``register-user`` prints a token on its last line; the server started with
  ``python -m mediarepo`` (and with ``twistd -n mediarepo``) takes a 100 MB
  upload from curl and serves it back byte for byte while its peak resident
  memory stays under 100 MB; SIGTERM stops it with exit status 0.
* A server killed with SIGKILL in the middle of uploads leaves a consistent
  store: after a restart every row has its whole file, and what the dead
  uploads left behind is swept.

Blocking code (subprocesses, curl, sockets) runs in threads so the trial
reactor stays free.
"""

from __future__ import annotations

import hashlib
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import time

from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThread

from tests.processes import SERVER_NAME, ServerProcessCase

BIG_FILE_BYTES = 100 * 1024 * 1024
PEAK_RSS_LIMIT_BYTES = 100 * 1024 * 1024


def peak_rss_bytes(pid: int) -> int:
    """The process's high-water resident set size (``VmHWM``)."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmHWM for {pid}")


def sha256_of(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1024 * 1024), b""):
            digest.update(block)
    return digest.hexdigest()


class ServerProcessTests(ServerProcessCase):
    timeout = 300

    def _curl(self, *args: str) -> str:
        result = subprocess.run(
            ["curl", "--silent", "--show-error", "--fail-with-body", *args],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        return result.stdout

    def _curl_upload(self, port: int, token: str, data: str, query: str = "") -> str:
        """Upload with curl; ``data`` as curl's --data-binary takes it (``@file``)."""
        return self._curl(
            "-H", f"Authorization: Bearer {token}", "-H", "Content-Type: application/octet-stream",
            "--data-binary", data, f"http://127.0.0.1:{port}/_matrix/media/v3/upload{query}",
        )  # fmt: skip

    def _big_round_trip(self, argv: list[str], port: int, token: str) -> None:
        source = os.path.join(self.workdir, "big.bin")
        with open(source, "wb") as f:
            for _ in range(BIG_FILE_BYTES // (1024 * 1024)):
                f.write(os.urandom(1024 * 1024))
        process = self._start(argv, port)
        base = f"http://127.0.0.1:{port}"
        auth = f"Authorization: Bearer {token}"
        answer = self._curl_upload(port, token, f"@{source}", "?filename=big.bin")
        match = re.search(r'"mxc://([^/"]+)/([A-Za-z]{24})"', answer)
        assert match is not None, answer
        self.assertEqual(match.group(1), SERVER_NAME)
        copy = os.path.join(self.workdir, "copy.bin")
        self._curl(
            "-H", auth, "-o", copy,
            f"{base}/_matrix/client/v1/media/download/{SERVER_NAME}/{match.group(2)}",
        )  # fmt: skip
        self.assertEqual(os.path.getsize(copy), BIG_FILE_BYTES)
        self.assertEqual(sha256_of(copy), sha256_of(source))
        peak = peak_rss_bytes(process.pid)
        self.assertLess(peak, PEAK_RSS_LIMIT_BYTES, f"peak RSS {peak / 2**20:.1f} MiB")
        print(f"\n[{argv[1]}] 100 MB round trip, peak RSS {peak / 2**20:.1f} MiB", file=sys.stderr)
        self.assertEqual(self._stop(process), 0)

    def _generated_and_registered(self) -> tuple[int, str]:
        port = self._generate()
        with open(self.config_path) as f:
            config = f.read()
        self.assertIn("name: sqlite3", config)
        key_path = os.path.join(self.workdir, "data", f"{SERVER_NAME}.signing.key")
        with open(key_path) as f:
            self.assertRegex(f.read(), r"\Aed25519 a_[A-Za-z0-9]{4} [A-Za-z0-9+/]{43}\n\Z")
        self.assertEqual(os.stat(key_path).st_mode & 0o777, 0o600)
        return port, self._register()

    def test_python_m_mediarepo(self) -> Deferred[None]:
        def run() -> None:
            port, token = self._generated_and_registered()
            argv = [sys.executable, "-m", "mediarepo", "-c", self.config_path]
            self._big_round_trip(argv, port, token)

        return deferToThread(run)

    def test_twistd_plugin(self) -> Deferred[None]:
        def run() -> None:
            port, token = self._generated_and_registered()
            twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
            argv = [twistd, "--nodaemon", "--pidfile=", "mediarepo", "-c", self.config_path]
            process = self._start(argv, port)
            answer = self._curl_upload(port, token, "twistd")
            self.assertIn(f"mxc://{SERVER_NAME}/", answer)
            # twistd re-raises the signal it stopped on once it has shut down.
            self.assertEqual(self._stop(process), -signal.SIGTERM)
            # Our records reach twistd's log, up to the end of a clean stop.
            with open(os.path.join(self.workdir, "server-0.log")) as log:
                text = log.read()
            self.assertIn("mediarepo serving", text)
            self.assertIn("mediarepo stopped", text)

        return deferToThread(run)

    def test_workers_share_the_port(self) -> Deferred[None]:
        def run() -> None:
            port, token = self._generated_and_registered()
            argv = [sys.executable, "-m", "mediarepo", "-c", self.config_path, "--workers", "2"]
            supervisor = self._start(argv, port)
            workers = self._children(supervisor.pid)
            self.assertEqual(len(workers), 2)
            download = f"http://127.0.0.1:{port}/_matrix/client/v1/media/download/{SERVER_NAME}"
            auth = f"Authorization: Bearer {token}"
            # Uploads land in either worker; each worker serves every upload.
            ids = []
            for i in range(6):
                answer = self._curl_upload(port, token, f"upload {i}")
                ids.append(answer.split('"')[3].rsplit("/", 1)[1])
            for i, media_id in enumerate(ids):
                for _ in range(3):
                    body = self._curl("-H", auth, f"{download}/{media_id}")
                    self.assertEqual(body, f"upload {i}")
            # A worker that dies is replaced; the port keeps answering.
            os.kill(workers[0], signal.SIGKILL)
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                current = self._children(supervisor.pid)
                if len(current) == 2 and workers[0] not in current:
                    break
                time.sleep(0.2)
            else:
                self.fail("the killed worker was not replaced")
            self._curl("-H", auth, f"{download}/{ids[0]}")
            # SIGTERM to the supervisor stops everything cleanly.
            self.assertEqual(self._stop(supervisor), 0)
            for pid in current:
                self.assertFalse(os.path.exists(f"/proc/{pid}"), f"worker {pid} still running")

        return deferToThread(run)

    def test_register_user_twice_gives_new_token(self) -> Deferred[None]:
        def run() -> None:
            self._generate()
            first = self._register()
            second = self._register()
            self.assertNotEqual(first, second)
            bad = self._mediarepo("register-user", "-c", self.config_path, "@bob:elsewhere")
            self.assertEqual(bad.returncode, 2)
            self.assertIn("not on this server", bad.stderr)

        return deferToThread(run)

    def test_bad_config_value_is_one_line(self) -> Deferred[None]:
        def run() -> None:
            path = os.path.join(self.workdir, "bad.yaml")
            with open(path, "w") as f:
                f.write("server_name: bad.test\nmax_upload_size: lots\n")
            result = self._mediarepo("-c", path)
            self.assertEqual(result.returncode, 1)
            lines = result.stderr.strip().splitlines()
            self.assertEqual(len(lines), 1, result.stderr)
            self.assertIn("max_upload_size", lines[0])

        return deferToThread(run)

    def test_killed_mid_upload_leaves_consistent_store(self) -> Deferred[None]:
        def run() -> None:
            port, token = self._generated_and_registered()
            argv = [sys.executable, "-m", "mediarepo", "-c", self.config_path]
            process = self._start(argv, port)
            # Finished uploads, then several bodies left hanging half sent.
            done = [self._curl_upload(port, token, f"done {i}") for i in range(3)]
            hanging = []
            for _ in range(4):
                sock = socket.create_connection(("127.0.0.1", port))
                sock.sendall(
                    b"POST /_matrix/media/v3/upload HTTP/1.1\r\nHost: x\r\n"
                    b"Authorization: Bearer " + token.encode() + b"\r\n"
                    b"Content-Length: 10000000\r\n\r\n" + os.urandom(3_000_000)
                )
                hanging.append(sock)
            store = os.path.join(self.workdir, "data", "media_store")
            staging = os.path.join(store, ".mediarepo_tmp")
            # Killed once every hanging upload has its staging file.
            deadline = time.monotonic() + 10
            while len(os.listdir(staging)) < 4 and time.monotonic() < deadline:
                time.sleep(0.05)
            process.kill()
            process.wait()
            for sock in hanging:
                sock.close()
            self.assertEqual(len(os.listdir(staging)), 4, "the dead uploads' staging files")
            # Make the leftovers older than the sweep's age limit.
            old = time.time() - 2 * 3600
            for name in os.listdir(staging):
                os.utime(os.path.join(staging, name), (old, old))

            process = self._start(argv, port)
            deadline = time.monotonic() + 10
            while os.listdir(staging) and time.monotonic() < deadline:
                time.sleep(0.1)
            self.assertEqual(os.listdir(staging), [], "staging leftovers swept at start-up")
            db = sqlite3.connect(os.path.join(self.workdir, "data", "homeserver.db"))
            rows = db.execute(
                "SELECT media_id, media_length FROM local_media_repository"
            ).fetchall()
            db.close()
            self.assertEqual(len(rows), 3)
            files = []
            for root, _dirs, names in os.walk(os.path.join(store, "local_content")):
                files += [os.path.join(root, name) for name in names]
            self.assertEqual(len(files), 3, "a file for each row and no other")
            for media_id, length in rows:
                path = os.path.join(
                    store, "local_content", media_id[:2], media_id[2:4], media_id[4:]
                )
                self.assertEqual(os.path.getsize(path), length)
                self.assertTrue(any(media_id in answer for answer in done))
            self.assertEqual(self._stop(process), 0)

        return deferToThread(run)

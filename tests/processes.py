"""The server as a separate process, as an operator runs it: a config
written by ``--generate-config``, users made by ``register-user``, the
server started with a command line and stopped by a signal. Shared by the
integration and fault tests; blocking, so tests run it in threads.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

from twisted.trial import unittest

import mediarepo

SERVER_NAME = "cli.test"
STARTUP_TIMEOUT = 60.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class ServerProcessCase(unittest.TestCase):
    """A work directory per test, and the processes started in it, killed
    at the end if still running."""

    def setUp(self) -> None:
        self.workdir = tempfile.mkdtemp(prefix="mediarepo-cli-")
        self.addCleanup(shutil.rmtree, self.workdir, True)
        self.config_path = os.path.join(self.workdir, "data", "homeserver.yaml")
        self.processes: list[subprocess.Popen[bytes]] = []
        self.addCleanup(self._kill_all)

    def _kill_all(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.kill()
                process.wait()

    def _mediarepo(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "mediarepo", *args],
            cwd=self.workdir,
            capture_output=True,
            text=True,
            timeout=STARTUP_TIMEOUT,
            check=False,
        )

    def _generate(self) -> int:
        port = free_port()
        result = self._mediarepo(
            "--generate-config",
            "-c",
            self.config_path,
            "--server-name",
            SERVER_NAME,
            "--port",
            str(port),
        )
        self.assertEqual(result.returncode, 0, result.stderr)
        return port

    def _register(self, user_id: str = f"@alice:{SERVER_NAME}") -> str:
        result = self._mediarepo("register-user", "-c", self.config_path, user_id)
        self.assertEqual(result.returncode, 0, result.stderr)
        token = result.stdout.strip().splitlines()[-1]
        self.assertRegex(token, r"\Asyt_[A-Za-z0-9_-]+\Z")
        return token

    def _start(self, argv: list[str], port: int) -> subprocess.Popen[bytes]:
        log = open(os.path.join(self.workdir, f"server-{len(self.processes)}.log"), "wb")
        self.addCleanup(log.close)
        # twistd finds plugins in the twisted/plugins folders on sys.path: the
        # one installed beside mediarepo, or the checkout's in a development
        # (editable) install.
        env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(mediarepo.__file__)))
        process = subprocess.Popen(
            argv,
            cwd=self.workdir,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        self.processes.append(process)
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while time.monotonic() < deadline:
            self.assertIsNone(process.poll(), f"server exited early; see {log.name}")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return process
            except OSError:
                time.sleep(0.1)
        raise AssertionError("server did not start listening")

    def _stop(self, process: subprocess.Popen[bytes]) -> int:
        process.send_signal(signal.SIGTERM)
        return process.wait(30)

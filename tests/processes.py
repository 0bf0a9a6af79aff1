"""The server as a separate process, as an operator runs it: a config
written by ``--generate-config``, users made by ``register-user``, the
server started with a command line (``python -m mediarepo`` or twistd), its
output in a log file, stopped by a signal. Shared by the integration and
fault tests.

Blocking: call these from a thread (``deferToThread``) so that the trial
reactor stays free.
"""

from __future__ import annotations

import os
import random
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


def _ephemeral_ports() -> range:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low, high = (int(part) for part in f.read().split())
    except (OSError, ValueError):
        low, high = 32768, 60999
    return range(low, high + 1)


def free_port() -> int:
    """A loopback port free now, for a server the test starts next. Taken
    outside the kernel's ephemeral range: a port from there may be handed to
    an outgoing connection (to PostgreSQL, to moto) before the server binds
    it."""
    ephemeral = _ephemeral_ports()
    while True:
        port = random.randrange(10_000, 65_536)
        if port in ephemeral:
            continue
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port


class ServerProcesses(unittest.TestCase):
    """For a test that sets ``self.workdir`` (where commands run and logs
    go) and ``self.processes`` (killed at cleanup by ``_kill_all``)."""

    workdir: str
    processes: list[subprocess.Popen[bytes]]

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

    def _start(self, argv: list[str], port: int) -> subprocess.Popen[bytes]:
        """Start ``argv``; return once ``port`` accepts connections. Its
        output goes to ``server-N.log`` in the work directory."""
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
            assert process.poll() is None, f"server exited early; see {log.name}"
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return process
            except OSError:
                time.sleep(0.1)
        raise AssertionError("server did not start listening")

    def _stop(self, process: subprocess.Popen[bytes], timeout: float = 30) -> int:
        process.send_signal(signal.SIGTERM)
        return process.wait(timeout)

    @staticmethod
    def _children(pid: int) -> list[int]:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(child) for child in f.read().split()]


class ServerProcessCase(ServerProcesses):
    """A work directory per test, with a generated config in it, and the
    processes started there, killed at the end if still running."""

    def setUp(self) -> None:
        self.workdir = tempfile.mkdtemp(prefix="mediarepo-cli-")
        self.addCleanup(shutil.rmtree, self.workdir, True)
        self.config_path = os.path.join(self.workdir, "data", "homeserver.yaml")
        self.processes = []
        self.addCleanup(self._kill_all)

    def _generate(self) -> int:
        port = free_port()
        result = self._mediarepo(
            "--generate-config", "-c", self.config_path, "--server-name", SERVER_NAME,
            "--port", str(port),
        )  # fmt: skip
        self.assertEqual(result.returncode, 0, result.stderr)
        return port

    def _register(self, user_id: str = f"@alice:{SERVER_NAME}") -> str:
        result = self._mediarepo("register-user", "-c", self.config_path, user_id)
        self.assertEqual(result.returncode, 0, result.stderr)
        token = result.stdout.strip().splitlines()[-1]
        self.assertRegex(token, r"\Asyt_[A-Za-z0-9_-]+\Z")
        return token

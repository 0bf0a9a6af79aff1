"""Several server processes behind the same ports (``--workers N``).

One Python process runs one reactor thread, so CPU-bound work (HTTP
parsing, small downloads) uses one core. With ``--workers N`` a supervisor
opens the listening sockets, a set per worker on the same ports
(``SO_REUSEPORT``), and starts N worker processes that inherit them; the
kernel spreads new connections over the workers. Workers
share the database and the media store as Synapse's workers do (the upload
lock, reservations and notifications all work across processes). The
supervisor forwards SIGTERM and SIGINT, restarts a worker that dies, and
exits when all have stopped.

Each worker keeps its own in-memory caches and metrics: a scrape of
``/_synapse/metrics`` sees the worker that answered.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

import attrs
from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.interfaces import IListeningPort, IProtocolFactory
from twisted.protocols.tls import TLSMemoryBIOFactory

from mediarepo.config import Config

logger = logging.getLogger(__name__)

# The environment variable telling a worker which inherited sockets are
# which: "listener_index:address:fd,...".
INHERITED_SOCKETS_ENV = "MEDIAREPO_INHERITED_SOCKETS"
# Which worker this is (0 to N-1): only worker 0 runs the periodic
# housekeeping (sweeps, retention, eviction, provider task polling).
WORKER_INDEX_ENV = "MEDIAREPO_WORKER_INDEX"
# A worker that dies sooner than this after starting is restarted only after
# a pause, so a worker that cannot start does not spin.
_MIN_UPTIME_SECONDS = 5.0
# A worker stops by itself within mediarepo.cli.EXIT_DEADLINE_SECONDS of
# SIGTERM; one still running after this is killed.
_STOP_TIMEOUT_SECONDS = 30.0
# How long a killed worker may take to be reaped before the supervisor
# exits without it.
_KILL_WAIT_SECONDS = 5.0


@attrs.frozen
class ListeningSocket:
    """A bound, listening socket of one listener: opened by this process
    before anything else starts, or inherited from a supervisor."""

    listener_index: int
    address: str
    fd: int


def inherited_sockets() -> list[ListeningSocket]:
    """The listening sockets a supervisor passed to this worker, if any."""
    raw = os.environ.get(INHERITED_SOCKETS_ENV, "")
    found = []
    for item in filter(None, raw.split(",")):
        # The address may hold colons itself (IPv6): index first, fd last.
        index_text, rest = item.split(":", 1)
        address, fd_text = rest.rsplit(":", 1)
        found.append(ListeningSocket(int(index_text), address, int(fd_text)))
    return found


def is_supervised_worker() -> bool:
    """Whether a supervisor (``--workers``) started this process."""
    return WORKER_INDEX_ENV in os.environ


def worker_index() -> int:
    """This process's worker number; 0 when it runs alone."""
    try:
        return int(os.environ.get(WORKER_INDEX_ENV, "0"))
    except ValueError:
        return 0


def _listening_socket(address: str, port: int, shared: bool) -> socket.socket:
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if shared:
        # Every worker has a socket of its own on the same port; the kernel
        # spreads new connections over them evenly. (Only then: a second
        # server started on a taken port must fail, not share it.)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    if family == socket.AF_INET6:
        # "::" takes IPv4 too where the system allows, as Twisted's listenTCP does.
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    sock.bind((address, port))
    sock.listen(1024)
    sock.setblocking(False)
    sock.set_inheritable(True)
    return sock


def open_listening_sockets(
    config: Config, shared: bool = True
) -> list[tuple[ListeningSocket, socket.socket]]:
    """Bind and listen on every listener's addresses; ``shared``: with
    ``SO_REUSEPORT``, for workers. Raises :class:`ConfigError` naming the
    listener that cannot listen (nothing is left open then)."""
    opened: list[tuple[ListeningSocket, socket.socket]] = []
    try:
        for index, listener in enumerate(config.listeners):
            for address in listener.bind_addresses:
                try:
                    sock = _listening_socket(address, listener.port, shared)
                except OSError as e:
                    if address == "0.0.0.0" and "::" in listener.bind_addresses:
                        continue  # "::" took IPv4 already
                    raise listener.cannot_listen(address, e) from e
                opened.append((ListeningSocket(index, address, sock.fileno()), sock))
    except BaseException:
        for _, sock in opened:
            sock.close()
        raise
    return opened


class ListeningPorts(Service):
    """The listeners' sockets: opened (or inherited from a supervisor)
    before anything else starts, served once everything else has."""

    def __init__(self, reactor: Any, sockets: Sequence[ListeningSocket], shared: bool) -> None:
        self.name = "ports"
        self._reactor = reactor
        # Opened or inherited and not yet given to the reactor.
        self._unserved = list(sockets)
        self._shared = shared
        self._factories: dict[int, Any] = {}
        self.ports: list[IListeningPort] = []

    def serve(self, listener_index: int, site: IProtocolFactory, tls: Any) -> None:
        """Serve ``site`` on the sockets of a listener, once started."""
        self._factories[listener_index] = (
            site if tls is None else TLSMemoryBIOFactory(tls, False, site)
        )

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        for listening_socket in list(self._unserved):
            factory = self._factories.get(listening_socket.listener_index)
            if factory is not None:
                self._adopt(listening_socket, factory)

    def _adopt(self, listening_socket: ListeningSocket, factory: Any) -> None:
        family = socket.AF_INET6 if ":" in listening_socket.address else socket.AF_INET
        listening = self._reactor.adoptStreamPort(listening_socket.fd, family, factory)
        if self._shared:
            # One connection per wake-up: otherwise the first worker to
            # wake takes every pending connection and the others stay idle.
            listening.numberAccepts = 1
        # The reactor has its own copy of the descriptor.
        os.close(listening_socket.fd)
        self._unserved.remove(listening_socket)
        self.ports.append(listening)
        logger.info("listening on %s port %d%s", listening_socket.address,
                    listening.getHost().port, " (shared)" if self._shared else "")  # fmt: skip

    def close_unserved(self) -> None:
        """Close the sockets not given to the reactor (a start that failed)."""
        for unserved in self._unserved:
            os.close(unserved.fd)
        self._unserved = []

    def stopService(self) -> defer.Deferred[object]:
        super().stopService()  # type: ignore[no-untyped-call]
        self.close_unserved()
        ports, self.ports = self.ports, []
        stopping = [d for d in (port.stopListening() for port in ports) if d is not None]
        return defer.DeferredList(stopping, consumeErrors=True).addCallback(lambda _: None)


class Supervisor:
    def __init__(self, config_paths: Sequence[str], config: Config, workers: int) -> None:
        self._config_paths = list(config_paths)
        self._config = config
        self._count = workers
        self._processes: dict[int, tuple[subprocess.Popen[bytes], float]] = {}
        self._sockets: dict[int, list[tuple[ListeningSocket, socket.socket]]] = {}
        self._stopping = False
        # Workers that have run long enough to count as started.
        self._started_once: set[int] = set()
        # Worker pids sent SIGTERM.
        self._signalled: set[int] = set()
        # When workers still running once the stop began are killed, and
        # when they were.
        self._stop_deadline: float | None = None
        self._killed_at: float | None = None
        self._status = 0

    def _spawn(self, slot: int) -> None:
        sockets = [inherited for inherited, _ in self._sockets[slot]]
        env = dict(os.environ)
        env[INHERITED_SOCKETS_ENV] = ",".join(
            f"{s.listener_index}:{s.address}:{s.fd}" for s in sockets
        )
        env[WORKER_INDEX_ENV] = str(slot)
        process = subprocess.Popen(
            [sys.executable, "-m", "mediarepo"]
            + [arg for path in self._config_paths for arg in ("-c", path)],
            env=env,
            pass_fds=[s.fd for s in sockets],
        )
        self._processes[slot] = (process, time.monotonic())
        logger.info("worker %d started (pid %d)", slot, process.pid)

    def _signal(self, signum: int, frame: object) -> None:
        # The loop in run() passes it on (a handler may run while that loop
        # is changing the set of workers).
        self._stopping = True

    def _stop_workers(self) -> None:
        """SIGTERM to every worker not told yet (one started meanwhile too);
        the first call sets the deadline after which they are killed."""
        if self._stop_deadline is None:
            self._stop_deadline = time.monotonic() + _STOP_TIMEOUT_SECONDS
        for process, _ in list(self._processes.values()):
            if process.pid not in self._signalled and process.poll() is None:
                self._signalled.add(process.pid)
                try:
                    process.send_signal(signal.SIGTERM)
                except OSError as e:
                    logger.warning("cannot signal worker pid %d: %s", process.pid, e)

    def run(self) -> int:
        # One set of sockets per worker, kept here too: connections the
        # kernel gives a worker that is being replaced wait for its successor.
        for slot in range(self._count):
            self._sockets[slot] = open_listening_sockets(self._config)
        signal.signal(signal.SIGTERM, self._signal)
        signal.signal(signal.SIGINT, self._signal)
        for slot in range(self._count):
            self._spawn(slot)
        while self._processes:
            time.sleep(0.2)
            if self._stopping:
                self._stop_workers()
            self._kill_if_overdue()
            if self._killed_workers_linger():
                pids = [process.pid for process, _ in self._processes.values()]
                logger.error("workers %s could not be killed; exiting without them", pids)
                break
            for slot, (process, started) in list(self._processes.items()):
                self._check_worker(slot, process, started)
        for opened in self._sockets.values():
            for _, sock in opened:
                sock.close()
        return self._status

    def _kill_if_overdue(self) -> None:
        """Kill the workers still running past the stop's deadline, once."""
        if self._stop_deadline is None or self._killed_at is not None:
            return
        if time.monotonic() <= self._stop_deadline:
            return
        for process, _ in self._processes.values():
            if process.poll() is None:
                logger.warning("worker pid %d did not stop; killing it", process.pid)
                process.kill()
        self._killed_at = time.monotonic()
        self._status = 1

    def _killed_workers_linger(self) -> bool:
        """Whether killed workers are still not reaped after _KILL_WAIT_SECONDS."""
        return (
            self._killed_at is not None and time.monotonic() > self._killed_at + _KILL_WAIT_SECONDS
        )

    def _check_worker(self, slot: int, process: subprocess.Popen[bytes], started: float) -> None:
        """Note a worker that has got going; of one that exited, record its
        status when stopping, else start it again."""
        code = process.poll()
        if code is None:
            if time.monotonic() - started >= _MIN_UPTIME_SECONDS:
                self._started_once.add(slot)
            return
        del self._processes[slot]
        if self._stopping:
            self._status = self._status or (code if code > 0 else 0)
            return
        logger.warning("worker %d (pid %d) exited with %d", slot, process.pid, code)
        if time.monotonic() - started < _MIN_UPTIME_SECONDS:
            if code == 1 and slot not in self._started_once:
                # It never got going (a config or database problem): stop all.
                self._signal(signal.SIGTERM, None)
                self._status = 1
                return
            time.sleep(_MIN_UPTIME_SECONDS)
            if self._stopping:
                return
        self._spawn(slot)

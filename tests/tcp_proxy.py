"""A TCP proxy on loopback that a test can cut, for database outages.

The machine's PostgreSQL is shared and must never be stopped: a test points
its server at this proxy instead and cuts the proxy. ``cut("refuse")``
closes every connection and resets new ones at once (a server that is
down); ``cut("blackhole")`` closes every connection and accepts new ones
but never answers (packets dropped by a firewall: a connect waits for its
timeout). ``restore()`` forwards again. Runs on threads of its own, so it
works beside any reactor and any subprocess.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading

_LINGER_RESET = struct.pack("ii", 1, 0)


class TcpProxy:
    def __init__(self, target_host: str, target_port: int) -> None:
        self._target = (target_host, target_port)
        self._listener = socket.create_server(("127.0.0.1", 0), backlog=128)
        self.port: int = self._listener.getsockname()[1]
        self.mode = "forward"
        self.accepted = 0
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()
        self._closed = False
        threading.Thread(target=self._accept_loop, name="tcp-proxy", daemon=True).start()

    def cut(self, mode: str = "blackhole") -> None:
        """Close every connection; from now on refuse or blackhole new ones."""
        assert mode in ("refuse", "blackhole"), mode
        with self._lock:
            self.mode = mode
            sockets, self._open = self._open, set()
        for sock in sockets:
            _close(sock)

    def restore(self) -> None:
        """Forward again (connections held by the blackhole are closed)."""
        with self._lock:
            self.mode = "forward"
            sockets, self._open = self._open, set()
        for sock in sockets:
            _close(sock)

    def close(self) -> None:
        self._closed = True
        self.cut("refuse")
        _close(self._listener)

    @property
    def connections(self) -> int:
        """Client connections open through the proxy (or held by it)."""
        with self._lock:
            return len(self._open) // 2 if self.mode == "forward" else len(self._open)

    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                self.accepted += 1
                mode = self.mode
            if mode == "refuse":
                client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
                client.close()
            elif mode == "blackhole":
                with self._lock:
                    self._open.add(client)
            else:
                threading.Thread(target=self._connect, args=(client,), daemon=True).start()

    def _connect(self, client: socket.socket) -> None:
        try:
            upstream = socket.create_connection(self._target, timeout=5)
        except OSError:
            _close(client)
            return
        upstream.settimeout(None)
        with self._lock:
            if self.mode != "forward":
                # Cut while connecting.
                _close(client)
                _close(upstream)
                return
            self._open.update((client, upstream))
        for source, sink in ((client, upstream), (upstream, client)):
            threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        with self._lock:
            self._open.discard(source)
            self._open.discard(sink)
        _close(source)
        _close(sink)


def _close(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    with contextlib.suppress(OSError):
        sock.close()

"""The machine's own limit for uploads: a raw HTTP sink that receives each
POST body over loopback, writes it to a new file, fsyncs it and answers.

Nothing a media server must do on top is done here (no parsing beyond the
request head, no hashing, no database, no link into place): it is the rate
the machine's loopback, page cache and disk allow, printed beside the
servers' ``upload_large`` figures. One blocking thread per connection;
receiving, writing and fsync release the GIL, and 1 MiB reads keep the
Python between them negligible. Files are removed after the answer so a run
does not fill the disk.

Run as a process of its own (``python -m benchlib.rawsink DIR PORT``).
"""

from __future__ import annotations

import os
import socket
import sys
import threading

_READ = 1024 * 1024
_ANSWER = b'{"content_uri":"mxc://raw.sink/uploaded"}'


def _read_head(conn: socket.socket, buffered: bytearray) -> bytes | None:
    while b"\r\n\r\n" not in buffered:
        chunk = conn.recv(65536)
        if not chunk:
            return None
        buffered += chunk
        if len(buffered) > 65536:
            return None
    head, _, rest = bytes(buffered).partition(b"\r\n\r\n")
    buffered[:] = rest
    return head


def _content_length(head: bytes) -> int:
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value.strip())
    return 0


def _serve_connection(conn: socket.socket, directory: str, counter: list[int]) -> None:
    buffer = bytearray(_READ)
    view = memoryview(buffer)
    buffered = bytearray()
    with conn:
        while True:
            head = _read_head(conn, buffered)
            if head is None:
                return
            remaining = _content_length(head)
            counter[0] += 1
            path = os.path.join(directory, f"upload-{threading.get_ident()}-{counter[0]}")
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                if buffered:
                    os.write(fd, buffered[:remaining])
                    remaining -= min(len(buffered), remaining)
                    buffered.clear()
                while remaining > 0:
                    received = conn.recv_into(view, min(remaining, _READ))
                    if not received:
                        return
                    os.write(fd, view[:received])
                    remaining -= received
                os.fsync(fd)
            finally:
                os.close(fd)
            conn.sendall(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n%s" % (len(_ANSWER), _ANSWER)
            )
            os.unlink(path)


def serve(directory: str, port: int) -> None:
    listener = socket.create_server(("127.0.0.1", port), backlog=128)
    counter = [0]
    print(f"raw sink listening on 127.0.0.1:{port}", flush=True)
    while True:
        conn, _ = listener.accept()
        threading.Thread(
            target=_serve_connection, args=(conn, directory, counter), daemon=True
        ).start()


if __name__ == "__main__":
    serve(sys.argv[1], int(sys.argv[2]))

"""A small signed Matrix origin on loopback TLS, for the remote-fetch scenarios.

It is a homeserver named ``127.0.0.1:PORT`` as far as federation goes: it
publishes an ed25519 key at ``/_matrix/key/v2/server`` (self-signed, as the
spec requires) and serves media over ``/_matrix/federation/v1/media/download``
(multipart) and the legacy ``/_matrix/media/v3/download``. Its certificate
comes from a CA made for the run, which the servers under test are told to
trust (``federation_custom_ca_list``). It does not check the requests'
X-Matrix signatures: it is the bench's own origin, not a server under test.

Media need no upload: a media ID says its size (``s`` 4 KiB, ``m`` 1 MiB,
``l`` 20 MiB after the run's prefix), and its bytes are a per-size random
buffer with the ID's hash in front, so every ID is different content (no
server can deduplicate two fetches) and costs the origin nothing to make.

Run as a process of its own (``python -m benchlib.origin``) so that its CPU
is not the load generator's; :func:`start_origin` does that.
"""

from __future__ import annotations

import argparse
import base64
import datetime
import hashlib
import ipaddress
import json
import os
import re
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

KIB = 1024
MIB = 1024 * 1024
SIZES = {"s": 4 * KIB, "m": 1 * MIB, "l": 20 * MIB}
KEY_ID = "ed25519:bench"
_MEDIA_ID = re.compile(r"^[A-Za-z0-9]+([sml])[0-9]+$")
_BOUNDARY = "6b1d0c0f4fb84ad1a5b5e2a7c0d3f9e1"


def _unpadded_b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii").rstrip("=")


def _canonical_json(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode(
        "utf-8"
    )


def make_certificates(directory: str) -> tuple[str, str, str]:
    """A CA for the run and a certificate for 127.0.0.1 signed by it:
    ``(ca_path, cert_path, key_path)``."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    def name(common_name: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])

    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(name("bench origin CA"))
        .issuer_name(name("bench origin CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=7))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name("bench origin"))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=7))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    paths = (
        os.path.join(directory, "origin-ca.crt"),
        os.path.join(directory, "origin.crt"),
        os.path.join(directory, "origin.key"),
    )
    contents = (
        ca.public_bytes(serialization.Encoding.PEM),
        cert.public_bytes(serialization.Encoding.PEM),
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )
    for path, content in zip(paths, contents, strict=True):
        with open(path, "wb") as f:
            f.write(content)
    return paths


class _Origin:
    def __init__(self, server_name: str, signing_seed: bytes) -> None:
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
        from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

        self.server_name = server_name
        self._key = Ed25519PrivateKey.from_private_bytes(signing_seed)
        public = self._key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        self._public = _unpadded_b64(public)
        self._buffers = {tag: os.urandom(size) for tag, size in SIZES.items()}

    def key_document(self) -> bytes:
        document: dict[str, Any] = {
            "server_name": self.server_name,
            "valid_until_ts": int(time.time() * 1000) + 24 * 3600 * 1000,
            "verify_keys": {KEY_ID: {"key": self._public}},
            "old_verify_keys": {},
        }
        signature = _unpadded_b64(self._key.sign(_canonical_json(document)))
        document["signatures"] = {self.server_name: {KEY_ID: signature}}
        return _canonical_json(document)

    def media(self, media_id: str) -> tuple[bytes, memoryview] | None:
        """The first 32 bytes (the ID's hash) and the rest, or None if unknown."""
        match = _MEDIA_ID.match(media_id)
        if match is None:
            return None
        buffer = self._buffers[match.group(1)]
        return hashlib.sha256(media_id.encode()).digest(), memoryview(buffer)[32:]


class _OriginHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # The origin served: set on the subclass _handler makes.
    origin: _Origin

    def log_message(self, format: str, *args: Any) -> None:
        pass  # one line per request would cost more than the answer

    def _send(self, status: int, headers: dict[str, str], parts: list[bytes | memoryview]):
        self.send_response(status)
        length = sum(len(p) for p in parts)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(length))
        self.end_headers()
        for part in parts:
            self.wfile.write(part)

    def _not_found(self) -> None:
        body = b'{"errcode":"M_NOT_FOUND","error":"Not found"}'
        self._send(404, {"Content-Type": "application/json"}, [body])

    def _download(self, path: str) -> tuple[str | None, bool]:
        """The media ID a download path names (None if it names none), and
        whether it is the federation endpoint's (multipart) path."""
        federation = "/_matrix/federation/v1/media/download/"
        legacy = f"/_matrix/media/v3/download/{self.origin.server_name}/"
        legacy_r0 = f"/_matrix/media/r0/download/{self.origin.server_name}/"
        for prefix in (federation, legacy, legacy_r0):
            if path.startswith(prefix):
                return path[len(prefix) :], prefix == federation
        return None, False

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/_matrix/key/v2/server":
            self._send(200, {"Content-Type": "application/json"}, [self.origin.key_document()])
            return
        media_id, federation = self._download(path)
        found = self.origin.media(media_id) if media_id is not None else None
        if found is None:
            self._not_found()
            return
        head, rest = found
        if not federation:
            self._send(200, {"Content-Type": "application/octet-stream"}, [head, rest])
            return
        opening = (
            f"--{_BOUNDARY}\r\nContent-Type: application/json\r\n\r\n{{}}\r\n"
            f"--{_BOUNDARY}\r\nContent-Type: application/octet-stream\r\n\r\n"
        ).encode()
        closing = f"\r\n--{_BOUNDARY}--\r\n".encode()
        self._send(
            200,
            {"Content-Type": f"multipart/mixed; boundary={_BOUNDARY}"},
            [opening, head, rest, closing],
        )


def _handler(origin: _Origin) -> type[BaseHTTPRequestHandler]:
    return type("Handler", (_OriginHandler,), {"origin": origin})


def serve(port: int, cert: str, key: str, signing_seed_hex: str) -> None:
    server_name = f"127.0.0.1:{port}"
    origin = _Origin(server_name, bytes.fromhex(signing_seed_hex))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    httpd = ThreadingHTTPServer(("127.0.0.1", port), _handler(origin))
    httpd.daemon_threads = True
    httpd.socket = context.wrap_socket(httpd.socket, server_side=True)
    print(f"origin {server_name} listening", flush=True)
    httpd.serve_forever()


@dataclass
class OriginInfo:
    """A started origin: its server name and what a server needs to trust it."""

    server_name: str
    ca_path: str
    proc: subprocess.Popen[bytes]

    def peer_settings(self) -> dict[str, Any]:
        """homeserver.yaml keys (the same for ours and Synapse) letting a
        server fetch from this origin on loopback and trust its certificate."""
        return {
            "federation_verify_certificates": True,
            "federation_custom_ca_list": [self.ca_path],
            "ip_range_blacklist": [],
            "trusted_key_servers": [],
            # Synapse's defaults (87K/s after a 500M burst) would throttle
            # the bench's first fetches; both servers get the same.
            "remote_media_download_per_second": "10G",
            "remote_media_download_burst_count": "100G",
        }


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_origin(workdir: str, preexec: Callable[[], None] | None = None) -> OriginInfo:
    """Make certificates in ``workdir``, start the origin process (``preexec``
    run in the child before exec), wait until it listens."""
    ca_path, cert_path, key_path = make_certificates(workdir)
    port = _free_port()
    scripts = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=scripts)
    log_path = os.path.join(workdir, "origin.log")
    with open(log_path, "ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "benchlib.origin", "--port", str(port), "--cert",
             cert_path, "--key", key_path, "--seed", os.urandom(32).hex()],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
            start_new_session=True, preexec_fn=preexec,
        )  # fmt: skip
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            with open(log_path, encoding="utf-8", errors="replace") as f:
                raise RuntimeError(f"the origin exited with {proc.returncode}: {f.read()[-2000:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return OriginInfo(f"127.0.0.1:{port}", ca_path, proc)
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("the origin did not listen within 30 s")


def main() -> None:
    parser = argparse.ArgumentParser(prog="benchlib.origin")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--cert", required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--seed", required=True, help="the ed25519 signing seed, hex")
    args = parser.parse_args()
    serve(args.port, args.cert, args.key, args.seed)


if __name__ == "__main__":
    main()

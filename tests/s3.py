"""A real S3-compatible server for the tests: moto in server mode, as a
separate process on a loopback port, stoppable and restartable."""

from __future__ import annotations

import atexit
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from typing import Any, ClassVar
from urllib.parse import urlsplit

import attrs

from tests.processes import free_port

BUCKET = "media-bucket"
ACCESS_KEY = "test-access-key"
SECRET_KEY = "test-secret-key"
REGION = "us-east-1"


@attrs.frozen
class RecordedRequest:
    """A request the server got, as its recorder logged it."""

    method: str
    path: str
    query: str


class MotoServer:
    """One moto server for a test. Starting moto costs about a second, so a
    server a test is done with (:meth:`release`) is kept running, emptied,
    for the next test of the process; :meth:`stop` really stops it, for the
    tests of an unavailable S3."""

    # Servers released by earlier tests: (process, port), ready for reuse.
    _idle: ClassVar[list[tuple[subprocess.Popen[bytes], int]]] = []

    def __init__(self, log_dir: str) -> None:
        self._port: int | None = None
        self._log_dir = log_dir
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def port(self) -> int:
        # Fixed at first use: a test may configure the endpoint before it
        # starts the server, and a restart must come back on the same port.
        if self._port is None:
            self._port = free_port()
        return self._port

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, create_bucket: bool = True) -> None:
        """Start (or start again, empty) and wait until it answers."""
        if self._port is None and MotoServer._idle:
            self._process, self._port = MotoServer._idle.pop()
            self._reset()
        else:
            self._spawn()
        if create_bucket:
            self.client().create_bucket(Bucket=BUCKET)

    def _spawn(self) -> None:
        log_path = os.path.join(self._log_dir, f"moto-{self.port}.log")
        with open(log_path, "ab") as log:
            self._process = subprocess.Popen(
                [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                # Where the recorder logs requests (record_requests): not in
                # the test's directory, which goes before the server does.
                env={
                    **os.environ,
                    "MOTO_RECORDER_FILEPATH": os.path.join(
                        tempfile.gettempdir(), f"mediarepo-moto-{self.port}.requests"
                    ),
                },
            )
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(self.endpoint_url + "/moto-api/", timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or self._process.poll() is not None:
                    raise RuntimeError(f"moto did not start; see {log_path}") from None
                time.sleep(0.05)

    def _reset(self) -> None:
        """Forget every bucket, object, key and recorded request."""
        with urllib.request.urlopen(f"{self.endpoint_url}/moto-api/reset", data=b"", timeout=10):
            pass
        self._moto_api("stop-recording")
        self._moto_api("reset-recording")

    def release(self) -> None:
        """The test is done with the server: keep it, emptied, for the next test."""
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        try:
            self._reset()
        except OSError:
            process.terminate()
            process.wait(timeout=10)
            return
        MotoServer._idle.append((process, self.port))

    def _moto_api(self, action: str) -> bytes:
        with urllib.request.urlopen(
            f"{self.endpoint_url}/moto-api/recorder/{action}", data=b"", timeout=10
        ) as answer:
            body: bytes = answer.read()
        return body

    def record_requests(self) -> None:
        """Log every request the server gets from now on (forgetting earlier ones)."""
        self._moto_api("reset-recording")
        self._moto_api("start-recording")

    def recorded_requests(self) -> list[RecordedRequest]:
        """The requests logged since :meth:`record_requests`, in order."""
        lines = self._moto_api("download-recording").decode().splitlines()
        requests = []
        for line in lines:
            entry = json.loads(line)
            url = urlsplit(entry["url"])
            requests.append(RecordedRequest(entry["method"], url.path, url.query))
        return requests

    def object_reads(self, key_prefix: str) -> int:
        """How many recorded requests were GETs (whole or ranged) of objects
        whose key starts with ``key_prefix``."""
        path = f"/{BUCKET}/{key_prefix}"
        return sum(
            1 for r in self.recorded_requests() if r.method == "GET" and r.path.startswith(path)
        )

    def stop(self) -> None:
        """Stop the server: S3 is unavailable until :meth:`start`."""
        if self._process is not None:
            self._process.terminate()
            self._process.wait(timeout=10)
            self._process = None

    def client(self) -> Any:
        import boto3

        return boto3.session.Session().client(
            "s3",
            endpoint_url=self.endpoint_url,
            region_name=REGION,
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
        )

    def provider_config(self, **flags: Any) -> dict[str, Any]:
        """A ``media_storage_providers`` entry for this server, as an
        operator of the Synapse S3 module would write it."""
        entry: dict[str, Any] = {
            "module": "s3_storage_provider.S3StorageProviderBackend",
            "store_local": True,
            "store_remote": True,
            "store_synchronous": True,
            "config": {
                "bucket": BUCKET,
                "endpoint_url": self.endpoint_url,
                "region_name": REGION,
                "access_key_id": ACCESS_KEY,
                "secret_access_key": SECRET_KEY,
                "threadpool_size": 8,
            },
        }
        entry.update(flags)
        return entry

    def keys(self) -> set[str]:
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=BUCKET)
        return {item["Key"] for page in pages for item in page.get("Contents", [])}

    def read(self, key: str) -> bytes:
        body: bytes = self.client().get_object(Bucket=BUCKET, Key=key)["Body"].read()
        return body


@atexit.register
def _stop_idle_servers() -> None:
    for process, _ in MotoServer._idle:
        process.terminate()
    for process, _ in MotoServer._idle:
        process.wait(timeout=10)
    MotoServer._idle.clear()

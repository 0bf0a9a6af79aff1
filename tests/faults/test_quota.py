"""A user's upload quota holds under concurrency.

Ten uploads by one user are started at once against a server process (one
process, and ``--workers 2`` sharing the database), on SQLite and on
PostgreSQL: every request's head and the first half of every body are sent
before the rest of any body, so all ten are in flight together. With
``media_upload_limits`` of 1M an hour and 300,000-byte bodies, exactly
three are stored and the seven others are refused with Synapse's 400
``M_RESOURCE_LIMIT_EXCEEDED``, whether the bodies declare their length
(refused before they are read, or, across processes, when recorded) or
are chunked (refused when recorded); no staging file is left behind.
"""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import sys
import threading
import time
from typing import Any

import psycopg2
import yaml
from twisted.internet.threads import deferToThread

from tests.processes import SERVER_NAME, ServerProcessCase
from tests.utils import (
    create_postgres_database,
    drop_postgres_database,
    postgres_params,
    read_until_closed,
)

QUOTA_BYTES = 1024 * 1024
UPLOAD_BYTES = 300_000
UPLOADS = 10
FITTING = QUOTA_BYTES // UPLOAD_BYTES


def concurrent_uploads(port: int, token: str, chunked: bool) -> list[tuple[int, dict[str, Any]]]:
    """``UPLOADS`` uploads at once; every head and half body is sent before
    the rest of any body. Returns each answer's status and JSON body."""
    half = UPLOAD_BYTES // 2
    heads_sent = threading.Barrier(UPLOADS)
    answers: list[tuple[int, dict[str, Any]]] = []
    failures: list[BaseException] = []

    def framed(data: bytes, last: bool) -> bytes:
        if not chunked:
            return data
        return b"%x\r\n%s\r\n" % (len(data), data) + (b"0\r\n\r\n" if last else b"")

    def upload() -> None:
        body = os.urandom(UPLOAD_BYTES)
        length = b"Transfer-Encoding: chunked" if chunked else b"Content-Length: %d" % UPLOAD_BYTES
        head = (
            b"POST /_matrix/media/v3/upload HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
            b"Authorization: Bearer " + token.encode() + b"\r\n" + length + b"\r\n\r\n"
        )
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
                try:
                    sock.sendall(head + framed(body[:half], last=False))
                    heads_sent.wait(30)
                    sock.sendall(framed(body[half:], last=True))
                except OSError:
                    pass  # refused early: the answer is what matters
                answer = read_until_closed(sock)
            status_line, _, rest = answer.partition(b"\r\n")
            answers.append(
                (int(status_line.split(b" ")[1]), json.loads(rest.split(b"\r\n\r\n", 1)[1]))
            )
        except BaseException as e:
            failures.append(e)
            heads_sent.abort()

    threads = [threading.Thread(target=upload) for _ in range(UPLOADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    if failures:
        raise failures[0]
    return answers


class QuotaUnderConcurrencyTests(ServerProcessCase):
    timeout = 120

    def _configure(self, engine: str) -> None:
        with open(self.config_path) as f:
            config = yaml.safe_load(f)
        config["media_upload_limits"] = [{"time_period": "1h", "max_size": "1M"}]
        if engine == "psycopg2":
            name = create_postgres_database()
            self.addCleanup(drop_postgres_database, name)
            config["database"] = {
                "name": "psycopg2",
                "args": {"dbname": name, **postgres_params(), "cp_min": 1, "cp_max": 5},
            }
        self.database_args = config["database"]["args"]
        with open(self.config_path, "w") as f:
            yaml.safe_dump(config, f)

    def _stored(self, engine: str, user_id: str) -> list[tuple[str, int]]:
        sql = (
            "SELECT media_id, media_length FROM local_media_repository"
            " WHERE user_id = %s AND media_length IS NOT NULL"
        )
        if engine == "sqlite3":
            db = sqlite3.connect(self.database_args["database"])
            stored: list[tuple[str, int]] = db.execute(
                sql.replace("%s", "?"), (user_id,)
            ).fetchall()
            db.close()
            return stored
        args = {k: v for k, v in self.database_args.items() if not k.startswith("cp_")}
        conn = psycopg2.connect(**args)
        with conn.cursor() as cur:
            cur.execute(sql, (user_id,))
            rows: list[tuple[str, int]] = cur.fetchall()
        conn.close()
        return rows

    def _check(self, engine: str, workers: int) -> None:
        port = self._generate()
        self._configure(engine)
        users = {"declared": f"@alice:{SERVER_NAME}", "chunked": f"@bob:{SERVER_NAME}"}
        tokens = {kind: self._register(user_id) for kind, user_id in users.items()}
        argv = [sys.executable, "-m", "mediarepo", "-c", self.config_path]
        server = self._start([*argv, "--workers", str(workers)], port)
        store = os.path.join(self.workdir, "data", "media_store")
        for kind, user_id in users.items():
            answers = concurrent_uploads(port, tokens[kind], chunked=kind == "chunked")
            accepted = [body for code, body in answers if code == 200]
            refused = [(code, body.get("errcode")) for code, body in answers if code != 200]
            rows = self._stored(engine, user_id)
            stored = sum(length for _, length in rows)
            print(
                f"\n[{engine}, {workers} worker(s), {kind} lengths] {len(accepted)} of {UPLOADS}"
                f" uploads accepted, {stored} bytes stored of a {QUOTA_BYTES}-byte quota",
                file=sys.stderr,
            )
            self.assertLessEqual(stored, QUOTA_BYTES)
            self.assertEqual(len(accepted), FITTING, answers)
            self.assertEqual(refused, [(400, "M_RESOURCE_LIMIT_EXCEEDED")] * (UPLOADS - FITTING))
            self.assertEqual(
                sorted(media_id for media_id, _ in rows),
                sorted(body["content_uri"].rsplit("/", 1)[1] for body in accepted),
            )
        files = [
            name for _, _, names in os.walk(os.path.join(store, "local_content")) for name in names
        ]
        self.assertEqual(len(files), 2 * FITTING, "a file for each stored upload and no other")
        staging = os.path.join(store, ".mediarepo_tmp")
        deadline = time.monotonic() + 10
        while os.listdir(staging) and time.monotonic() < deadline:
            time.sleep(0.1)
        self.assertEqual(os.listdir(staging), [], "staging files of refused uploads")
        self.assertEqual(self._stop(server), 0)

    def test_sqlite_one_process(self) -> Any:
        return deferToThread(self._check, "sqlite3", 1)

    def test_sqlite_two_workers(self) -> Any:
        return deferToThread(self._check, "sqlite3", 2)

    def test_postgres_one_process(self) -> Any:
        return deferToThread(self._check, "psycopg2", 1)

    def test_postgres_two_workers(self) -> Any:
        return deferToThread(self._check, "psycopg2", 2)

"""Test harness: a real server on loopback, on SQLite or PostgreSQL.

``ServerTestCase`` and ``DatabaseTestCase`` run on SQLite; a test class runs
on PostgreSQL too through a subclass of its own that sets ``engine =
"psycopg2"`` (``class UploadTests(ServerTestCase)``, then ``class
UploadPostgresTests(UploadTests)``). A PostgreSQL test gets a database of its
own, created for the test and dropped after it.
"""

from __future__ import annotations

import inspect
import logging
import os
import secrets
import shutil
import socket
import tempfile
import time
from collections.abc import Callable
from typing import Any

import attrs
import psycopg2
import treq
from twisted.internet import defer, reactor, task
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import IListeningPort
from twisted.trial import unittest
from twisted.web.client import HTTPConnectionPool

from mediarepo.accounts import new_access_token
from mediarepo.app import MediaServer, media_server
from mediarepo.config import Config, parse_config
from mediarepo.federation.keys import write_new_signing_key
from mediarepo.storage.database import Database
from mediarepo.storage.user_rows import UserRows


def postgres_params() -> dict[str, Any]:
    """Where the test PostgreSQL server is: the usual libpq variables
    (``PGHOST``, ``PGPORT``, ``PGUSER``, ``PGPASSWORD``), defaulting to
    postgres@127.0.0.1:5432. The one place the tests read them: every test
    that reaches PostgreSQL (the interop tests too) takes its connection
    arguments from here."""
    params: dict[str, Any] = {
        "host": os.environ.get("PGHOST", "127.0.0.1"),
        "port": int(os.environ.get("PGPORT", "5432")),
        "user": os.environ.get("PGUSER", "postgres"),
    }
    if os.environ.get("PGPASSWORD"):
        params["password"] = os.environ["PGPASSWORD"]
    return params


SERVER_NAME = "test.example"


def create_postgres_database() -> str:
    name = f"mediarepo_test_{secrets.token_hex(6)}"
    conn = psycopg2.connect(dbname="postgres", **postgres_params())
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute(
            f"CREATE DATABASE {name} ENCODING 'UTF8' LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0"
        )
    conn.close()
    return name


def drop_postgres_database(name: str) -> None:
    conn = psycopg2.connect(dbname="postgres", **postgres_params())
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    conn.close()


def database_section(
    engine: str, workdir: str, cleanups: list[Callable[[], None]], prepared: bool = False
) -> dict[str, Any]:
    """The ``database`` section of a test's config; on PostgreSQL a database
    of the test's own: empty, or ``prepared`` with the server's schema and no
    rows (:mod:`tests.prepared_databases`)."""
    if engine == "sqlite3":
        return {"name": "sqlite3", "args": {"database": os.path.join(workdir, "homeserver.db")}}
    if prepared:
        from tests import prepared_databases

        name = prepared_databases.take()
        cleanups.append(lambda: prepared_databases.give_back(name))
    else:
        name = create_postgres_database()
        cleanups.append(lambda: drop_postgres_database(name))
    return {
        "name": "psycopg2",
        "args": {"dbname": name, **postgres_params(), "cp_min": 1, "cp_max": 5},
    }


async def prepared_database_section(
    engine: str, workdir: str, cleanups: list[Callable[[], None]]
) -> dict[str, Any]:
    """The ``database`` section of a test's config, its database already
    holding the server's schema and no rows, on either engine (see
    :mod:`tests.prepared_databases`)."""
    section = database_section(engine, workdir, cleanups, prepared=True)
    if engine == "sqlite3":
        from tests.prepared_databases import copy_sqlite_template

        await copy_sqlite_template(section["args"]["database"])
    return section


async def until(condition: Callable[[], bool], what: str, seconds: float = 10) -> None:
    """Return once ``condition()`` holds, looking every 10 ms; fail the
    test (AssertionError) if it does not within ``seconds``."""
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting until {what}")
        await task.deferLater(reactor, 0.01, lambda: None)


def next_return(case: unittest.TestCase, owner: object, name: str) -> defer.Deferred[Any]:
    """Fires with what the next call of ``owner.name`` returns (awaited, if
    it returns something to await), for a test to wait on work the code
    starts in the background. The calls go through as before."""
    method = getattr(owner, name)
    returned: defer.Deferred[Any] = defer.Deferred()

    def calling(*args: Any, **kwargs: Any) -> Any:
        result = method(*args, **kwargs)
        if returned.called:
            return result
        if not inspect.isawaitable(result):
            returned.callback(result)
            return result

        async def settle() -> Any:
            try:
                value = await result
            except BaseException:
                returned.errback()
                raise
            returned.callback(value)
            return value

        return defer.ensureDeferred(settle())

    case.patch(owner, name, calling)
    return returned.addTimeout(10, reactor)


def port_number(listening: IListeningPort) -> int:
    """The TCP port a listener has (one asked for port 0 gets a free one)."""
    address = listening.getHost()
    assert isinstance(address, IPv4Address | IPv6Address), address
    return address.port


class LogRecords(logging.Handler):
    """Keeps the records logged at ``level`` and above, for a test to read."""

    def __init__(self, level: int = logging.DEBUG) -> None:
        super().__init__(level)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@attrs.frozen
class Response:
    code: int
    headers: dict[str, list[str]]
    body: bytes

    def header(self, name: str) -> str | None:
        values = self.headers.get(name.lower())
        return values[0] if values else None

    def json(self) -> Any:
        import json

        return json.loads(self.body)


class AsyncSetUpTestCase(unittest.TestCase):
    """A test case whose set-up is a coroutine: ``set_up``. trial waits for
    what ``setUp`` returns; typeshed's ``TestCase.setUp`` returns None, so
    the override that returns a Deferred is declared here, once."""

    def setUp(self) -> defer.Deferred[None]:  # type: ignore[override]
        return defer.ensureDeferred(self.set_up())

    async def set_up(self) -> None:
        pass


class ServerTestCase(AsyncSetUpTestCase):
    """Starts a MediaServer on 127.0.0.1 (a free port) for each test."""

    engine = "sqlite3"
    # Extra homeserver.yaml keys for a test class.
    extra_config: dict[str, Any] = {}
    # Extra media_server arguments for a test class.
    server_options: dict[str, Any] = {}

    def make_config(self, **overrides: Any) -> Config:
        data: dict[str, Any] = {
            "server_name": SERVER_NAME,
            "listeners": [
                {
                    "port": 0,
                    "bind_addresses": ["127.0.0.1"],
                    "type": "http",
                    "resources": [{"names": ["client", "federation", "media", "metrics"]}],
                }
            ],
            "database": self.database_config,
            "media_store_path": os.path.join(self.workdir, "media_store"),
            "enable_metrics": True,
        }
        data.update(self.extra_config)
        data.update(overrides)
        config = parse_config(data, self.workdir)
        if not os.path.exists(config.signing_key_path):
            write_new_signing_key(config.signing_key_path)
        return config

    async def start_server(self, **overrides: Any) -> MediaServer:
        server = media_server(self.make_config(**overrides), reactor, **self.server_options)
        # Stopped even if the start fails midway (whatever started stops).
        self.addCleanup(server.stopService)
        await server.start()
        self.server = server
        self.base_url = f"http://127.0.0.1:{port_number(server.ports[0])}"
        return server

    async def set_up(self) -> None:
        self.workdir = tempfile.mkdtemp(prefix="mediarepo-test-")
        self._db_cleanups: list[Callable[[], None]] = []
        self.database_config = await prepared_database_section(
            self.engine, self.workdir, self._db_cleanups
        )
        self.pool = HTTPConnectionPool(reactor, persistent=False)
        # Cleanups run last-in first-out: the server stops before its database goes.
        for cleanup in self._db_cleanups:
            self.addCleanup(cleanup)
        self.addCleanup(shutil.rmtree, self.workdir, True)
        await self.start_server()

    @property
    def media_store(self) -> str:
        return self.server.config.media_store_path

    async def register(self, localpart: str = "alice", admin: bool = False) -> str:
        token = new_access_token(localpart)
        assert self.server.database is not None
        await UserRows(self.server.database).register_user(
            f"@{localpart}:{SERVER_NAME}", token, admin, 0
        )
        return token

    async def request(
        self,
        method: str,
        path: str,
        *,
        token: str | None = None,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
        base_url: str | None = None,
    ) -> Response:
        """A request to the test's server (or the one at ``base_url``)."""
        return await http_request(
            method, (base_url or self.base_url) + path, token=token, body=body,
            headers=headers, pool=self.pool,
        )  # fmt: skip

    async def upload(
        self,
        token: str,
        data: bytes,
        content_type: str | None = "application/octet-stream",
        filename: str | None = None,
    ) -> str:
        """Upload ``data``; returns the media ID."""
        from urllib.parse import quote

        path = "/_matrix/media/v3/upload"
        if filename is not None:
            path += "?filename=" + quote(filename)
        headers = {"Content-Type": content_type} if content_type else {}
        response = await self.request("POST", path, token=token, body=data, headers=headers)
        assert response.code == 200, (response.code, response.body)
        uri = response.json()["content_uri"]
        prefix = f"mxc://{SERVER_NAME}/"
        assert uri.startswith(prefix), uri
        return str(uri[len(prefix) :])


class DatabaseTestCase(AsyncSetUpTestCase):
    """A fresh database (and no server) per test."""

    engine = "sqlite3"
    database_args: dict[str, Any] = {}

    # Async like ServerTestCase.setUp, so that a subclass's may await.
    async def set_up(self) -> None:
        self.workdir = tempfile.mkdtemp(prefix="mediarepo-db-")
        self.addCleanup(shutil.rmtree, self.workdir, True)
        cleanups: list[Callable[[], None]] = []
        section = database_section(self.engine, self.workdir, cleanups)
        section["args"].update(self.database_args)
        for cleanup in cleanups:
            self.addCleanup(cleanup)
        self.config = parse_config({"server_name": "db.test", "database": section}, self.workdir)
        self.database = self.open()

    def open(self) -> Database:
        database = Database(self.config.database, reactor)
        self.addCleanup(database.close)
        return database


def raw_exchange(port: int, head: bytes, body_chunks: list[bytes] | None = None) -> bytes:
    """Send a request by hand (the head, then the body chunks, which may
    promise less or more than the head said) and read the answer until the
    server closes. Blocking: run it in a thread."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        try:
            sock.sendall(head)
            for chunk in body_chunks or []:
                sock.sendall(chunk)
        except OSError:
            pass  # the server may close early; what it said is what matters
        return read_until_closed(sock)


def read_until_closed(sock: socket.socket) -> bytes:
    answer = b""
    try:
        while data := sock.recv(65536):
            answer += data
    except OSError:
        pass
    return answer


async def http_request(
    method: str,
    url: str,
    *,
    token: str | None = None,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
    pool: HTTPConnectionPool | None = None,
    agent: Any = None,
) -> Response:
    """One request with treq, its whole answer read."""
    all_headers: dict[str | bytes, list[str | bytes]] = {k: [v] for k, v in (headers or {}).items()}
    if token is not None:
        all_headers["Authorization"] = [f"Bearer {token}"]
    extra: dict[str, Any] = {"agent": agent} if agent is not None else {"pool": pool}
    response = await treq.request(method, url, headers=all_headers, data=body, **extra)
    content = await response.content()
    raw = {
        k.decode().lower(): [v.decode("latin-1") for v in vs]
        for k, vs in response.headers.getAllRawHeaders()
    }
    # Twisted's client keeps Content-Length out of the headers (it is a
    # connection-control header there) except on HEAD; it is in `length`.
    if isinstance(response.length, int) and "content-length" not in raw:
        raw["content-length"] = [str(response.length)]
    return Response(response.code, raw, content)


def dead_instance_name() -> str:
    """The instance name a process of this machine had, which has exited
    (what a crash leaves in ``worker_locks`` and pending work)."""
    import subprocess

    from mediarepo.media.locks import instance_name

    process = subprocess.Popen(["sleep", "60"])
    try:
        name = instance_name(pid=process.pid)
    finally:
        process.kill()
        process.wait()
    return name

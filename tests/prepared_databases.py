"""Databases with the server's schema already made, for tests.

A server test on PostgreSQL used to create a database (20-150 ms, by how busy
the machine is), have the server create the schema in it (about 60 ms) and
drop it. Here a database is made once from a template that has the schema,
and reused: when a test is done with it, its rows are deleted
(:func:`give_back`) and the next test of the process gets it, unless the test
changed the schema (then it is dropped).

The template is made once per version of the schema by this module run as a
script, through the server's own ``prepare_database``, and kept: its name
carries a digest of the schema's files, so a changed schema gets a new one.
Run as ``python -m tests.prepared_databases NAME``: prepares the (empty)
database NAME and exits.

On SQLite (:func:`copy_sqlite_template`) the schema is made once per test
process in a file of its own (25-50 ms), and each test that wants it gets
a copy of that file (well under a millisecond).
"""

from __future__ import annotations

import atexit
import hashlib
import importlib.resources
import os
import secrets
import shutil
import sys
import tempfile
from typing import Any

import psycopg2
import psycopg2.errors

from tests.utils import postgres_params

_SCHEMA_FILES = ("__init__.py", "synapse_tables.sql", "mediarepo_tables.sql")


def template_name() -> str:
    digest = hashlib.sha256()
    schema = importlib.resources.files("mediarepo.storage.schema")
    for name in _SCHEMA_FILES:
        digest.update(schema.joinpath(name).read_bytes())
    return f"mediarepo_test_template_{digest.hexdigest()[:12]}"


def ensure_template() -> str:
    """The template's name, made first if it does not exist yet. Safe
    against other test processes making it at the same time: each builds
    under a name of its own and renames it into place."""
    import subprocess

    name = template_name()
    conn = psycopg2.connect(dbname="postgres", **postgres_params())
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
            if cur.fetchone() is not None:
                return name
            building = f"{name}_{os.getpid()}"
            cur.execute(f"DROP DATABASE IF EXISTS {building}")
            cur.execute(
                f"CREATE DATABASE {building} ENCODING 'UTF8' LC_COLLATE 'C' LC_CTYPE 'C'"
                " TEMPLATE template0"
            )
            # From the checkout's root, where ``tests`` is a package (trial
            # runs in a scratch directory).
            root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
            try:
                subprocess.run(
                    [sys.executable, "-m", "tests.prepared_databases", building],
                    check=True,
                    cwd=root,
                )
            except BaseException:
                cur.execute(f"DROP DATABASE IF EXISTS {building}")
                raise
            try:
                cur.execute(f"ALTER DATABASE {building} RENAME TO {name}")
            except psycopg2.errors.DuplicateDatabase:
                cur.execute(f"DROP DATABASE {building}")  # another process won
    finally:
        conn.close()
    return name


# Databases given back by tests of this process, emptied, for the next ones.
_idle: list[str] = []

# What the schema is made of: every relation of the public schema and its
# columns. A test that changed it does not give its database to the next.
_SHAPE = """
    SELECT md5(coalesce(string_agg(c.relname || ':' || c.relkind::text || ':' || a.attname::text
                                   || ':' || a.atttypid::text, ','
                                   ORDER BY c.relname, a.attnum), ''))
    FROM pg_class AS c
    JOIN pg_namespace AS n ON n.oid = c.relnamespace
    LEFT JOIN pg_attribute AS a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
    WHERE n.nspname = 'public'
"""

_template_shape: str | None = None


def _connect(dbname: str) -> Any:
    conn = psycopg2.connect(dbname=dbname, **postgres_params())
    conn.autocommit = True
    return conn


def _shape(dbname: str) -> str:
    conn = _connect(dbname)
    try:
        with conn.cursor() as cur:
            cur.execute(_SHAPE)
            return str(cur.fetchone()[0])
    finally:
        conn.close()


def take() -> str:
    """A database with the schema and no rows, for one test."""
    global _template_shape
    if _idle:
        return _idle.pop()
    template = ensure_template()
    if _template_shape is None:
        _drop_orphans()
    # The process in the name: a process that ends without its atexit hooks
    # (trial's workers may) leaves its idle databases to the next run.
    name = f"mediarepo_test_p{os.getpid()}_{secrets.token_hex(4)}"
    _on_server(f"CREATE DATABASE {name} TEMPLATE {template}")
    # Read from a copy: a connection to the template would stop other test
    # processes copying it.
    if _template_shape is None:
        _template_shape = _shape(name)
    return name


def give_back(name: str) -> None:
    """The test is done with ``name``: empty it for the next test, or drop
    it if the test changed its schema or cannot be cut off from it."""
    conn = _connect(name)
    try:
        with conn.cursor() as cur:
            # Whatever the test left connected (a server that was not
            # stopped, a process it killed) goes first.
            cur.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE datname = %s AND pid <> pg_backend_pid()",
                (name,),
            )
            cur.execute(_SHAPE)
            if cur.fetchone()[0] != _template_shape:
                raise _Unusable
            cur.execute(
                "SELECT c.relname, c.relkind FROM pg_class AS c"
                " JOIN pg_namespace AS n ON n.oid = c.relnamespace"
                " WHERE n.nspname = 'public' AND c.relkind IN ('r', 'S')"
            )
            relations = cur.fetchall()
            tables = [r for r, kind in relations if kind == "r" and r != "mediarepo_schema_version"]
            # DELETE, not TRUNCATE: a test leaves a few rows, and TRUNCATE
            # makes every table new files (several times slower).
            statements = ["SET lock_timeout = '2s'"]
            statements += [f"DELETE FROM {table}" for table in tables]
            statements += [f"ALTER SEQUENCE {r} RESTART" for r, kind in relations if kind == "S"]
            cur.execute(";".join(statements))
    except (_Unusable, psycopg2.Error):
        conn.close()
        drop(name)
        return
    conn.close()
    _idle.append(name)


class _Unusable(Exception):
    pass


def _on_server(sql: str) -> list[Any]:
    """Run one statement outside any database of the tests; its rows."""
    conn = _connect("postgres")
    try:
        with conn.cursor() as cur:
            cur.execute(sql)
            return cur.fetchall() if cur.description else []
    finally:
        conn.close()


def drop(name: str) -> None:
    _on_server(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def _drop_orphans() -> None:
    """Drop the databases taken by processes that have ended."""
    rows = _on_server("SELECT datname FROM pg_database WHERE datname LIKE 'mediarepo_test_p%'")
    for (name,) in rows:
        pid = name.split("_")[2][1:]
        if pid.isdigit() and not _alive(int(pid)):
            drop(name)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@atexit.register
def _drop_idle() -> None:
    while _idle:
        drop(_idle.pop())


# The SQLite file this process made with the schema, once made.
_sqlite_template: str | None = None


async def copy_sqlite_template(path: str) -> None:
    """Make ``path`` an SQLite database with the schema and no rows."""
    global _sqlite_template
    if _sqlite_template is None:
        from twisted.internet import reactor

        from mediarepo.config import DatabaseConfig
        from mediarepo.storage.database import Database
        from mediarepo.storage.schema import prepare_database

        directory = tempfile.mkdtemp(prefix="mediarepo-sqlite-template-")
        atexit.register(shutil.rmtree, directory, True)
        template = os.path.join(directory, "schema.db")
        database = Database(DatabaseConfig("sqlite3", {"database": template}, 1, 1), reactor)
        try:
            await prepare_database(database)
        finally:
            # Closing the last connection folds the write-ahead log into
            # the file: the file alone is the whole database.
            database.close()
        _sqlite_template = template
    shutil.copyfile(_sqlite_template, path)


def _prepare(name: str) -> None:
    from twisted.internet import defer, task
    from twisted.internet.interfaces import IReactorCore

    from mediarepo.config import DatabaseConfig
    from mediarepo.storage.database import Database
    from mediarepo.storage.schema import prepare_database

    async def run(reactor: IReactorCore) -> None:
        config = DatabaseConfig("psycopg2", {"dbname": name, **postgres_params()}, 1, 1)
        database = Database(config, reactor)
        try:
            await prepare_database(database)
        finally:
            database.close()

    task.react(lambda reactor: defer.ensureDeferred(run(reactor)))


if __name__ == "__main__":
    _prepare(sys.argv[1])

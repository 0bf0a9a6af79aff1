"""Creating and checking the database schema at start-up.

Two cases:

* a database Synapse owns (it has Synapse's ``schema_version`` table): its
  tables are used exactly as they are; only ``mediarepo_*`` tables are added;
* any other database (the standalone server): Synapse's media and auth tables
  are created with Synapse's names and columns, so that the data stays readable
  by Synapse tools, and then our own tables.
"""

from __future__ import annotations

import importlib.resources
import logging

import attrs

from mediarepo.storage.database import Database, Transaction

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1

# Any one PostgreSQL advisory lock number, so that two servers starting at
# once on one empty database don't race creating the same tables.
_SCHEMA_LOCK_ID = 0x6D656469

# The Synapse tables the server reads and writes.
REQUIRED_SYNAPSE_TABLES = (
    "local_media_repository",
    "local_media_repository_thumbnails",
    "local_media_repository_url_cache",
    "remote_media_cache",
    "remote_media_cache_thumbnails",
    "users",
    "access_tokens",
    "worker_locks",
    "server_keys_json",
)


class SchemaError(Exception):
    pass


@attrs.frozen
class SchemaState:
    synapse_owned: bool
    version: int


def _statements(filename: str) -> list[str]:
    text = importlib.resources.files(__package__).joinpath(filename).read_text("utf-8")
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("--")]
    chunks = "\n".join(lines).split("\n;")
    return [chunk.strip() for chunk in chunks if chunk.strip()]


def _table_exists(txn: Transaction, name: str) -> bool:
    txn.execute(txn.engine.table_exists_sql(), (name,))
    return txn.fetchone() is not None


def _prepare(txn: Transaction) -> SchemaState:
    if txn.engine.name == "psycopg2":
        txn.execute("SELECT pg_advisory_xact_lock(?)", (_SCHEMA_LOCK_ID,))
    synapse_owned = _table_exists(txn, "schema_version")
    if synapse_owned:
        missing = [t for t in REQUIRED_SYNAPSE_TABLES if not _table_exists(txn, t)]
        if missing:
            raise SchemaError(
                "the database belongs to Synapse but lacks the tables "
                f"{', '.join(missing)}; let Synapse finish creating its schema first"
            )
    else:
        for statement in _statements("synapse_tables.sql"):
            txn.execute(statement)
    for statement in _statements("mediarepo_tables.sql"):
        txn.execute(statement)

    txn.execute("SELECT version FROM mediarepo_schema_version")
    row = txn.fetchone()
    if row is None:
        txn.execute("INSERT INTO mediarepo_schema_version (version) VALUES (?)", (SCHEMA_VERSION,))
    elif row[0] > SCHEMA_VERSION:
        raise SchemaError(
            f"the database has mediarepo schema version {row[0]}, newer than this "
            f"server's {SCHEMA_VERSION}; run a newer mediarepo"
        )
    return SchemaState(synapse_owned=synapse_owned, version=SCHEMA_VERSION)


async def prepare_database(database: Database) -> SchemaState:
    """Create what is missing and check what is there; raises :class:`SchemaError`."""
    state = await database.run_interaction("prepare_database", _prepare)
    logger.info(
        "database ready (%s, %s schema, mediarepo schema version %d)",
        database.engine.name,
        "Synapse's" if state.synapse_owned else "standalone",
        state.version,
    )
    return state

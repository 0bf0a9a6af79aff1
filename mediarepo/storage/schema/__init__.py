"""Creating and checking the database schema at start-up.

Two cases:

* a database Synapse owns (it has Synapse's ``schema_version`` table): its
  tables are used exactly as they are; only ``mediarepo_*`` tables are added;
* any other database (the standalone server): Synapse's media and auth tables
  are created with Synapse's names and columns, so that the data stays readable
  by Synapse tools, and then our own tables.
"""

from __future__ import annotations

import enum
import importlib.resources
import logging
import sqlite3

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
    "destinations",
)


class SchemaError(Exception):
    pass


# Tables of Synapse's whose ``mxc://`` avatar columns the ``keep_profiles``
# filter of local purges consults, where they exist.
AVATAR_COLUMNS = (
    ("profiles", "avatar_url"),
    ("room_memberships", "avatar_url"),
    ("user_directory", "avatar_url"),
    ("room_stats_state", "avatar"),
)


class QuarantineRecords(enum.Enum):
    """How quarantine changes are recorded in ``quarantined_media_changes``."""

    # A PostgreSQL sequence hands out stream IDs, shared with Synapse's writers.
    SEQUENCE = "sequence"
    # We are the only writer (our own SQLite database): the next ID is MAX + 1.
    NEXT_MAX = "next_max"
    # A Synapse database older than the table: changes are not recorded.
    NONE = "none"
    # Synapse's SQLite database: Synapse counts stream IDs in its own memory,
    # so IDs we took would collide with its next ones; quarantine goes through Synapse.
    THROUGH_SYNAPSE = "through_synapse"


@attrs.frozen
class SchemaState:
    synapse_owned: bool
    version: int
    quarantine_records: QuarantineRecords = QuarantineRecords.NEXT_MAX
    # (table, column) pairs of AVATAR_COLUMNS present in this database.
    avatar_columns: tuple[tuple[str, str], ...] = ()
    # Synapse's ``profiles`` table (display names in user media statistics).
    has_profiles: bool = False
    # Synapse's ``events`` and ``event_json`` (media referenced in rooms).
    has_room_events: bool = False


def _statements(filename: str) -> list[str]:
    text = importlib.resources.files(__package__).joinpath(filename).read_text("utf-8")
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("--")]
    chunks = "\n".join(lines).split("\n;")
    return [chunk.strip() for chunk in chunks if chunk.strip()]


def _table_exists(txn: Transaction, name: str) -> bool:
    txn.execute(txn.engine.table_exists_sql(), (name,))
    return txn.fetchone() is not None


# RETURNING (quarantine) needs 3.35; ON CONFLICT upserts 3.24.
MIN_SQLITE_VERSION = (3, 35, 0)


def _prepare(txn: Transaction) -> SchemaState:
    if txn.engine.name == "sqlite3" and sqlite3.sqlite_version_info < MIN_SQLITE_VERSION:
        wanted = ".".join(map(str, MIN_SQLITE_VERSION))
        raise SchemaError(
            f"SQLite {sqlite3.sqlite_version} is too old; {wanted} or newer is needed"
        )
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
        if txn.engine.name == "psycopg2":
            txn.execute("CREATE SEQUENCE IF NOT EXISTS quarantined_media_id_seq")
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
    return SchemaState(
        synapse_owned=synapse_owned,
        version=SCHEMA_VERSION,
        quarantine_records=_quarantine_records(txn, synapse_owned),
        avatar_columns=tuple(
            (table, column) for table, column in AVATAR_COLUMNS if _table_exists(txn, table)
        ),
        has_profiles=_table_exists(txn, "profiles"),
        has_room_events=_table_exists(txn, "events") and _table_exists(txn, "event_json"),
    )


def _quarantine_records(txn: Transaction, synapse_owned: bool) -> QuarantineRecords:
    postgres = txn.engine.name == "psycopg2"
    if not synapse_owned:
        return QuarantineRecords.SEQUENCE if postgres else QuarantineRecords.NEXT_MAX
    if not _table_exists(txn, "quarantined_media_changes"):
        return QuarantineRecords.NONE
    return QuarantineRecords.SEQUENCE if postgres else QuarantineRecords.THROUGH_SYNAPSE


# Indexes of ours on Synapse's tables, for queries Synapse's own indexes
# serve badly (figures: docs/performance.rst, at a million rows).
EXTRA_INDEXES = (
    # ``/create`` counts a user's reservations still without content:
    # through Synapse's (user_id, created_ts) index that reads every upload
    # of the user's last day, thousands of rows for a busy user or a bot;
    # this index holds only the reservations.
    (
        "mediarepo_pending_media",
        "local_media_repository (user_id, created_ts) WHERE media_length IS NULL",
    ),
    # Purges by age (media_retention, the admin API's media/delete) take
    # the oldest local media a batch at a time; Synapse has no index on
    # created_ts, so every batch read the whole table.
    ("mediarepo_local_media_created", "local_media_repository (created_ts)"),
    # The same for cached remote media, least recently read first
    # (media_retention, purge_media_cache).
    ("mediarepo_remote_media_last_access", "remote_media_cache (last_access_ts)"),
    # The admin listing of a user's media by creation time pages by OFFSET:
    # through Synapse's (user_id, created_ts) index every row before the
    # page was read from the table for its media ID (40-50 ms at offset
    # 90,000 of a user with 100,000 media); with the ID in the index they
    # are index-only. Newest first, the API's default and Synapse's tie
    # order (media_id ascending), is the index's own order; oldest first
    # reads it backwards and sorts each run of equal times by ID.
    (
        "mediarepo_local_media_user_created",
        "local_media_repository (user_id, created_ts DESC, media_id)",
    ),
)


async def _create_extra_indexes(database: Database) -> None:
    """Create the indexes of ``EXTRA_INDEXES`` that are missing. On
    PostgreSQL they are built CONCURRENTLY, so that Synapse's writes to a
    large table are not held up while an index is built; a build that
    failed half way (an invalid index) is started again."""
    postgres = database.engine.name == "psycopg2"
    for name, definition in EXTRA_INDEXES:
        try:
            if postgres:
                rows = await database.run_query(
                    "check_extra_index",
                    "SELECT i.indisvalid FROM pg_index AS i JOIN pg_class AS c"
                    " ON c.oid = i.indexrelid WHERE c.relname = ?"
                    " AND pg_table_is_visible(c.oid)",
                    (name,),
                )
                if rows and rows[0][0]:
                    continue
                if rows:
                    await database.run_query(
                        "drop_extra_index", f"DROP INDEX CONCURRENTLY IF EXISTS {name}"
                    )
                await database.run_query(
                    "create_extra_index",
                    f"CREATE INDEX CONCURRENTLY IF NOT EXISTS {name} ON {definition}",
                )
            else:
                await database.run_query(
                    "create_extra_index", f"CREATE INDEX IF NOT EXISTS {name} ON {definition}"
                )
        except Exception as e:
            # Only speed depends on it (another process may be building it now).
            logger.warning("could not create index %s: %s", name, e)


async def prepare_database(database: Database) -> SchemaState:
    """Create what is missing and check what is there; raises :class:`SchemaError`."""
    state = await database.run_interaction("prepare_database", _prepare)
    await _create_extra_indexes(database)
    logger.info(
        "database ready (%s, %s schema, mediarepo schema version %d)",
        database.engine.name,
        "Synapse's" if state.synapse_owned else "standalone",
        state.version,
    )
    return state

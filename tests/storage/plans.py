"""The query plan a statement gets, for tests that a query is served by an
index, on SQLite and on PostgreSQL."""

from __future__ import annotations

from mediarepo.storage.database import Database, Transaction


async def query_plan(
    database: Database, sql: str, args: tuple[object, ...], index_only_on: str | None = None
) -> str:
    """The plan of ``sql`` (``EXPLAIN QUERY PLAN`` on SQLite). On PostgreSQL,
    with sequential scans made as costly as it allows, so that what shows is
    whether an index can serve the statement; with ``index_only_on`` (a
    table), bitmap scans too and that table vacuumed first: its visibility
    map set, as on a large table, is what makes an index-only scan worth it."""
    postgres = database.engine.name == "psycopg2"
    if postgres and index_only_on is not None:
        await database.run_query("t", f"VACUUM ANALYZE {index_only_on}")

    def explain(t: Transaction) -> str:
        if postgres:
            t.execute("SET LOCAL enable_seqscan = off")
            if index_only_on is not None:
                t.execute("SET LOCAL enable_bitmapscan = off")
            t.execute("EXPLAIN " + sql, args)
        else:
            t.execute("EXPLAIN QUERY PLAN " + sql, args)
        return "\n".join(str(row) for row in t.fetchall())

    return await database.run_interaction("t", explain)

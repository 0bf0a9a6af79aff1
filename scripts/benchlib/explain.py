"""EXPLAIN ANALYZE of the queries on the hot paths and of the background
jobs, on a copy of a populated database (``scripts/bench --explain N``).

The statements are those of mediarepo/storage, with parameters a busy
deployment would give them (the user with the most media, a hash shared
by several media, the purges' cut-off). Each runs in a transaction that is
rolled back, on a copy of the template that is dropped afterwards. Our
indexes are created on the copy first, as the server creates them at start.
"""

from __future__ import annotations

import re
import sys
from typing import Any

from benchlib.populate import DAY_MS, Population

LOCAL_COLUMNS = (
    "media_id, media_type, media_length, created_ts, upload_name, user_id,"
    " quarantined_by, url_cache, last_access_ts, safe_from_quarantine, authenticated, sha256"
)


def _queries(cursor: Any, population: Population) -> list[tuple[str, str, tuple[object, ...]]]:
    cursor.execute("SELECT media_id, sha256 FROM local_media_repository WHERE user_id = %s"
                   " LIMIT 1", (population.heavy_user,))  # fmt: skip
    media_id, sha256 = cursor.fetchone()
    cursor.execute(
        "SELECT sha256 FROM local_media_repository GROUP BY sha256 ORDER BY COUNT(*) DESC LIMIT 1"
    )
    shared_hash = cursor.fetchone()[0]
    cursor.execute("SELECT media_origin, media_id FROM remote_media_cache LIMIT 1")
    origin, remote_id = cursor.fetchone()
    cursor.execute("SELECT token FROM access_tokens LIMIT 1 OFFSET 500")
    token = cursor.fetchone()[0]
    heavy = population.heavy_user
    now = population.now_ms
    before = population.stale_before_ts
    prefix = "mxc://bench.test/"
    avatar = (
        f" AND media_id NOT IN (SELECT SUBSTR(avatar_url, {len(prefix) + 1}) FROM profiles"
        f" WHERE SUBSTR(avatar_url, 1, {len(prefix)}) = '{prefix}')"
        f" AND media_id NOT IN (SELECT SUBSTR(avatar_url, {len(prefix) + 1}) FROM room_memberships"
        f" WHERE SUBSTR(avatar_url, 1, {len(prefix)}) = '{prefix}')"
    )
    queries: list[tuple[str, str, tuple[object, ...]]] = [
        (
            "get_local_media",
            f"SELECT {LOCAL_COLUMNS} FROM local_media_repository WHERE media_id = %s",
            (media_id,),
        ),
        (
            "get_local_thumbnails",
            "SELECT thumbnail_width, thumbnail_height, thumbnail_type,"
            " thumbnail_method, thumbnail_length FROM local_media_repository_thumbnails"
            " WHERE media_id = %s",
            (media_id,),
        ),
        (
            "get_remote_media",
            "SELECT media_type, filesystem_id FROM remote_media_cache"
            " WHERE media_origin = %s AND media_id = %s",
            (origin, remote_id),
        ),
        (
            "get_remote_thumbnails",
            "SELECT thumbnail_width FROM remote_media_cache_thumbnails"
            " WHERE media_origin = %s AND media_id = %s",
            (origin, remote_id),
        ),
        (
            "get_user_by_access_token",
            "SELECT users.name FROM users JOIN access_tokens"
            " ON users.name = COALESCE(access_tokens.puppets_user_id, access_tokens.user_id)"
            " WHERE token = %s",
            (token,),
        ),
        (
            "count_pending_media (/create)",
            "SELECT COUNT(*), MIN(created_ts)"
            " FROM local_media_repository WHERE user_id = %s AND created_ts > %s"
            " AND media_length IS NULL",
            (heavy, now - DAY_MS),
        ),
        (
            "quota sum, 1 day",
            "SELECT COALESCE(SUM(media_length), 0) FROM local_media_repository"
            " WHERE user_id = %s AND created_ts > %s",
            (heavy, now - DAY_MS),
        ),
        (
            "quota sum, 30 days",
            "SELECT COALESCE(SUM(media_length), 0)"
            " FROM local_media_repository WHERE user_id = %s AND created_ts > %s",
            (heavy, now - 30 * DAY_MS),
        ),
        (
            "known_content (dedup + quarantine by hash)",
            "SELECT media_id FROM (SELECT media_id"
            " FROM local_media_repository WHERE sha256 = %s AND media_length = %s AND url_cache"
            " IS NULL AND quarantined_by IS NULL LIMIT 5) AS copies UNION ALL SELECT NULL FROM"
            " (SELECT 1 FROM local_media_repository WHERE sha256 = %s AND quarantined_by IS NOT"
            " NULL UNION ALL SELECT 1 FROM remote_media_cache WHERE sha256 = %s AND quarantined_by"
            " IS NOT NULL LIMIT 1) AS q",
            (sha256, 4096, sha256, sha256),
        ),
        (
            "quarantine by hash (local)",
            "UPDATE local_media_repository SET quarantined_by = 'x'"
            " WHERE sha256 = %s AND NOT safe_from_quarantine RETURNING media_id",
            (shared_hash,),
        ),
        (
            "quarantine by hash (remote)",
            "UPDATE remote_media_cache SET quarantined_by = 'x'"
            " WHERE sha256 = %s RETURNING media_origin, media_id",
            (shared_hash,),
        ),
        (
            "unquarantined_media_of_user",
            "SELECT media_id FROM local_media_repository"
            " WHERE user_id = %s AND quarantined_by IS NULL",
            (heavy,),
        ),
        (
            "delete_expired_reservations",
            "SELECT media_id FROM local_media_repository"
            " WHERE media_length IS NULL AND created_ts < %s LIMIT 100",
            (now - DAY_MS,),
        ),
        (
            "update_access_times (local)",
            "UPDATE local_media_repository SET last_access_ts = %s WHERE media_id = %s",
            (now, media_id),
        ),
        (
            "update_access_times (remote)",
            "UPDATE remote_media_cache SET last_access_ts = %s"
            " WHERE media_origin = %s AND media_id = %s AND last_access_ts < %s",
            (now, origin, remote_id, now),
        ),
        (
            "retention/purge: old_local_media",
            "SELECT media_id FROM local_media_repository WHERE created_ts < %s"
            " AND (last_access_ts < %s OR (created_ts < %s AND last_access_ts IS NULL))"
            " AND media_length > 0 AND quarantined_by IS NULL AND NOT safe_from_quarantine"
            + avatar
            + " ORDER BY created_ts, media_id LIMIT 500",
            (before, before, before),
        ),
        (
            "retention/purge: old_local_media, none left",
            "SELECT media_id FROM local_media_repository WHERE created_ts < %s"
            " AND (last_access_ts < %s OR (created_ts < %s AND last_access_ts IS NULL))"
            " AND media_length > 0 AND quarantined_by IS NULL"
            " AND NOT safe_from_quarantine" + avatar + " ORDER BY created_ts, media_id LIMIT 500",
            (before - 400 * DAY_MS, before - 400 * DAY_MS, before - 400 * DAY_MS),
        ),
        (
            "retention/purge: remote_media_unread_since",
            "SELECT media_origin, media_id,"
            " filesystem_id FROM remote_media_cache WHERE last_access_ts < %s AND quarantined_by"
            " IS NULL ORDER BY last_access_ts LIMIT 500",
            (before,),
        ),
        (
            "retention/purge: remote, none left",
            "SELECT media_origin, media_id,"
            " filesystem_id FROM remote_media_cache WHERE last_access_ts < %s AND quarantined_by"
            " IS NULL ORDER BY last_access_ts LIMIT 500",
            (before - 400 * DAY_MS,),
        ),
        (
            "prune tool: local_media_unread_page",
            "SELECT media_id FROM local_media_repository"
            " WHERE COALESCE(last_access_ts, created_ts) < %s AND media_length IS NOT NULL"
            " AND url_cache IS NULL AND media_id > %s ORDER BY media_id LIMIT 1000",
            (before, ""),
        ),
    ]
    # The admin listing's statements as the server sends them.
    from mediarepo.storage.media_admin_rows import (
        USER_MEDIA_COUNT_SQL,
        UserMediaOrder,
        user_media_page_sql,
    )

    users = (("heavy", heavy, population.heavy_count),
             ("listed", population.listed_user, population.listed_count))  # fmt: skip
    orders = ((UserMediaOrder.CREATED_TS, True), (UserMediaOrder.CREATED_TS, False),
              (UserMediaOrder.MEDIA_LENGTH, True), (UserMediaOrder.UPLOAD_NAME, False))  # fmt: skip
    for label, user, count in users:
        queries.append((
            f"admin user_media ({label}, {count}): count",
            USER_MEDIA_COUNT_SQL.replace("?", "%s"),
            (user,),
        ))  # fmt: skip
        for order, descending in orders:
            for offset in (0, count * 9 // 10):
                direction = "DESC" if descending else "ASC"
                queries.append((
                    f"admin user_media ({label}, {count}): {order.value} {direction}"
                    f" offset {offset}",
                    user_media_page_sql(order, descending).replace("?", "%s"),
                    (user, 100, offset),
                ))  # fmt: skip
    queries.append((
        "admin usage_by_user (statistics)",
        "SELECT lmr.user_id, COUNT(*) AS media_count, COALESCE(SUM(lmr.media_length), 0)"
        " AS media_length FROM local_media_repository AS lmr WHERE lmr.user_id IS NOT NULL"
        " GROUP BY lmr.user_id ORDER BY media_length DESC, lmr.user_id ASC LIMIT 100 OFFSET 0",
        (),
    ))  # fmt: skip
    return queries


def explain(psql_dsn: dict[str, Any], dbname: str, population: Population) -> list[str]:
    """Lines: each query's execution time and plan (rolled back)."""
    import psycopg2

    conn = psycopg2.connect(**psql_dsn, dbname=dbname)
    lines: list[str] = []
    try:
        with conn.cursor() as cursor:
            for name, sql, args in _queries(cursor, population):
                cursor.execute("EXPLAIN (ANALYZE, BUFFERS) " + sql, args)
                plan = [row[0] for row in cursor.fetchall()]
                conn.rollback()
                total = next((p for p in plan if p.startswith("Execution Time")), "")
                ms = re.search(r"([\d.]+) ms", total)
                lines.append(f"-- {name}: {ms.group(1) if ms else '?'} ms")
                lines.extend("   " + p for p in plan)
    finally:
        conn.close()
    return lines


def create_our_indexes(psql_dsn: dict[str, Any], dbname: str) -> None:
    """The indexes mediarepo adds to Synapse's tables at start-up (read from
    the mediarepo installed beside this tool)."""
    import psycopg2

    from mediarepo.storage.schema import EXTRA_INDEXES

    conn = psycopg2.connect(**psql_dsn, dbname=dbname)
    try:
        conn.autocommit = True
        with conn.cursor() as cursor:
            for name, definition in EXTRA_INDEXES:
                cursor.execute(f"CREATE INDEX IF NOT EXISTS {name} ON {definition}")
            cursor.execute("ANALYZE")
    finally:
        conn.close()


def print_explained(lines: list[str]) -> None:
    for line in lines:
        print(line, file=sys.stdout)

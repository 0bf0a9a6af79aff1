"""Queries behind the media admin API and purges: choosing media to delete,
listing a user's media, per-user statistics."""

from __future__ import annotations

import enum

import attrs

from mediarepo.storage.database import Database, Transaction
from mediarepo.storage.media_rows import LOCAL_MEDIA_COLUMNS, local_media_from_row
from mediarepo.values import LocalMedia


class UserMediaOrder(enum.Enum):
    """Columns a user's media may be listed by (Synapse's ``MediaSortOrder``)."""

    MEDIA_ID = "media_id"
    UPLOAD_NAME = "upload_name"
    CREATED_TS = "created_ts"
    LAST_ACCESS_TS = "last_access_ts"
    MEDIA_LENGTH = "media_length"
    MEDIA_TYPE = "media_type"
    QUARANTINED_BY = "quarantined_by"
    SAFE_FROM_QUARANTINE = "safe_from_quarantine"


class UsageOrder(enum.Enum):
    """Columns the per-user statistics may be ordered by."""

    USER_ID = "user_id"
    DISPLAYNAME = "displayname"
    MEDIA_LENGTH = "media_length"
    MEDIA_COUNT = "media_count"


@attrs.frozen
class LocalPurgeFilter:
    """Which local media a purge by age takes.

    Media counts as old when it was last read before ``before_ts`` or, never
    read, made before it. Pending reservations and empty media are never
    taken (``media_length > size_gt`` with ``size_gt >= 0``). URL-preview
    downloads are taken like other media, as Synapse's query takes them.
    """

    before_ts: int
    size_gt: int = 0
    keep_profiles: bool = True
    include_quarantined: bool = False
    include_protected: bool = False


@attrs.frozen
class UsageQuery:
    """Which uploaders the per-user statistics list, in which order, which page."""

    start: int = 0
    limit: int = 100
    from_ts: int = 0
    until_ts: int | None = None
    order_by: UsageOrder = UsageOrder.USER_ID
    descending: bool = False
    search_term: str | None = None


@attrs.frozen
class UserUsage:
    user_id: str
    displayname: str | None
    media_count: int
    media_length: int


class MediaAdminRows:
    def __init__(
        self,
        database: Database,
        server_name: str,
        avatar_columns: tuple[tuple[str, str], ...],
        has_profiles: bool,
    ) -> None:
        self._db = database
        self._server_name = server_name
        self._avatar_columns = avatar_columns
        self._has_profiles = has_profiles

    async def old_local_media(self, purge: LocalPurgeFilter, limit: int) -> list[str]:
        """Up to ``limit`` IDs of local media ``purge`` takes, oldest first."""
        clauses = [
            # Media read before a time was made before it: this bound, implied
            # by the next clause, lets mediarepo_local_media_created find the
            # old media without reading the rest of the table.
            "created_ts < ?",
            "(last_access_ts < ? OR (created_ts < ? AND last_access_ts IS NULL))",
            "media_length > ?",
        ]
        args: list[object] = [purge.before_ts, purge.before_ts, purge.before_ts, purge.size_gt]
        if not purge.include_quarantined:
            clauses.append("quarantined_by IS NULL")
        if not purge.include_protected:
            clauses.append("NOT safe_from_quarantine")
        if purge.keep_profiles:
            # Avatars are mxc URIs of our own server; compare the media ID
            # part so each avatar table is read once, not once per row.
            prefix = f"mxc://{self._server_name}/"
            for table, column in self._avatar_columns:
                clauses.append(
                    f"media_id NOT IN (SELECT SUBSTR({column}, ?) FROM {table}"
                    f" WHERE SUBSTR({column}, 1, ?) = ?)"
                )
                args.extend([len(prefix) + 1, len(prefix), prefix])
        args.append(limit)
        rows = await self._db.run_query(
            "get_local_media_ids_to_purge",
            "SELECT media_id FROM local_media_repository WHERE "
            + " AND ".join(clauses)
            + " ORDER BY created_ts, media_id LIMIT ?",
            args,
        )
        return [row[0] for row in rows]

    async def local_media_unread_page(
        self, before_ts: int, after_media_id: str, limit: int
    ) -> list[str]:
        """A page (by media ID, after ``after_media_id``) of local media with
        content not read since ``before_ts`` (never read: not made since)."""
        rows = await self._db.run_query(
            "get_local_media_unread_page",
            "SELECT media_id FROM local_media_repository"
            " WHERE COALESCE(last_access_ts, created_ts) < ? AND media_length IS NOT NULL"
            " AND url_cache IS NULL AND media_id > ? ORDER BY media_id LIMIT ?",
            (before_ts, after_media_id, limit),
        )
        return [row[0] for row in rows]

    async def remote_media_unread_page(
        self, before_ts: int, after: tuple[str, str], limit: int
    ) -> list[tuple[str, str]]:
        """A page of (origin, filesystem ID) of cached remote media not read
        since ``before_ts``, after ``after`` in that order."""
        rows = await self._db.run_query(
            "get_remote_media_unread_page",
            "SELECT media_origin, filesystem_id FROM remote_media_cache"
            " WHERE last_access_ts < ? AND (media_origin > ? OR"
            " (media_origin = ? AND filesystem_id > ?))"
            " ORDER BY media_origin, filesystem_id LIMIT ?",
            (before_ts, after[0], after[0], after[1], limit),
        )
        return [(row[0], row[1]) for row in rows]

    async def user_exists(self, user_id: str) -> bool:
        rows = await self._db.run_query(
            "get_user_by_id", "SELECT 1 FROM users WHERE name = ?", (user_id,)
        )
        return bool(rows)

    async def user_media(
        self,
        user_id: str,
        start: int,
        limit: int,
        order_by: UserMediaOrder,
        descending: bool,
    ) -> tuple[list[LocalMedia], int]:
        """A page of a user's local media and how many they have in all.
        Ties are broken by media ID, ascending, as Synapse does."""

        def txn(t: Transaction) -> tuple[list[LocalMedia], int]:
            t.execute(USER_MEDIA_COUNT_SQL, (user_id,))
            row = t.fetchone()
            total = int(row[0]) if row else 0
            t.execute(user_media_page_sql(order_by, descending), (user_id, limit, start))
            return [local_media_from_row(r) for r in t.fetchall()], total

        return await self._db.run_interaction("get_local_media_by_user_paginate", txn)

    async def usage_by_user(self, query: UsageQuery) -> tuple[list[UserUsage], int]:
        """Media count and bytes per uploader, a page of them, and how many
        uploaders match in all."""
        search_term = query.search_term

        def txn(t: Transaction) -> tuple[list[UserUsage], int]:
            args: list[object] = []
            if self._has_profiles:
                displayname = "p.displayname"
                join = "LEFT JOIN profiles AS p ON lmr.user_id = '@' || p.user_id || ':' || ?"
                args.append(self._server_name)
            else:
                displayname, join = "NULL", ""
            filters = ["lmr.user_id IS NOT NULL"]
            if search_term:
                pattern = _like_pattern(search_term)
                if self._has_profiles:
                    filters.append(
                        "(lmr.user_id LIKE ? ESCAPE '!' OR p.displayname LIKE ? ESCAPE '!')"
                    )
                    args.extend(["@" + pattern + ":" + "%", pattern])
                else:
                    filters.append("lmr.user_id LIKE ? ESCAPE '!'")
                    args.append("@" + pattern + ":" + "%")
            if query.from_ts:
                filters.append("lmr.created_ts >= ?")
                args.append(query.from_ts)
            if query.until_ts is not None:
                filters.append("lmr.created_ts <= ?")
                args.append(query.until_ts)
            group = "lmr.user_id, p.displayname" if self._has_profiles else "lmr.user_id"
            base = (
                f" FROM local_media_repository AS lmr {join} WHERE {' AND '.join(filters)}"
                f" GROUP BY {group}"
            )
            t.execute(f"SELECT COUNT(*) FROM (SELECT lmr.user_id {base}) AS uploaders", args)
            row = t.fetchone()
            total = int(row[0]) if row else 0
            column = {
                UsageOrder.USER_ID: "lmr.user_id",
                UsageOrder.DISPLAYNAME: displayname if self._has_profiles else "lmr.user_id",
                UsageOrder.MEDIA_LENGTH: "media_length",
                UsageOrder.MEDIA_COUNT: "media_count",
            }[query.order_by]
            direction = "DESC" if query.descending else "ASC"
            t.execute(
                f"SELECT lmr.user_id, {displayname}, COUNT(*) AS media_count,"
                f" COALESCE(SUM(lmr.media_length), 0) AS media_length {base}"
                f" ORDER BY {column} {direction}, lmr.user_id ASC LIMIT ? OFFSET ?",
                [*args, query.limit, query.start],
            )
            users = [UserUsage(r[0], r[1], int(r[2]), int(r[3])) for r in t.fetchall()]
            return users, total

        return await self._db.run_interaction("get_users_media_usage_paginate", txn)


# An index-only scan of Synapse's (user_id, created_ts) index.
USER_MEDIA_COUNT_SQL = "SELECT COUNT(*) FROM local_media_repository WHERE user_id = ?"


def user_media_page_sql(order_by: UserMediaOrder, descending: bool) -> str:
    """A page of a user's media (parameters: user ID, limit, offset) in
    ``order_by``'s order, ties by media ID ascending as Synapse breaks them.

    The page's media IDs are found first, from the order's column and the ID
    alone, then only the page's rows are read. By creation time the IDs come
    from mediarepo_local_media_user_created without reading the table; by
    any other column the user's rows are read and their keys sorted (a
    user's whole rows sorted spilled to disk: 0.5-0.85 s a page for a user
    with 100,000 media, 0.1-0.2 s this way; docs/performance.rst).
    """
    direction = "DESC" if descending else "ASC"
    # order_by is an enum member: a fixed column name, never user text.
    column = order_by.value
    columns = ", ".join(f"m.{c.strip()}" for c in LOCAL_MEDIA_COLUMNS.split(","))
    return (
        f"SELECT {columns} FROM local_media_repository AS m JOIN"
        f" (SELECT media_id FROM local_media_repository WHERE user_id = ?"
        f" ORDER BY {column} {direction}, media_id ASC LIMIT ? OFFSET ?) AS page"
        f" ON page.media_id = m.media_id ORDER BY m.{column} {direction}, m.media_id ASC"
    )


def _like_pattern(term: str) -> str:
    """``%term%`` for LIKE, with the term's own wildcards taken literally."""
    escaped = term.replace("!", "!!").replace("%", "!%").replace("_", "!_")
    return "%" + escaped + "%"

"""Queries on Synapse's ``destinations`` table: when each other server last
failed and how long to leave it alone, shared with Synapse when the
database is its own (times in milliseconds, as Synapse keeps them)."""

from __future__ import annotations

import attrs

from mediarepo.storage.database import Database


@attrs.frozen
class RetryTimings:
    # When the server started failing (ms), or None.
    failure_ts: int | None
    # When it was last tried and failed (ms).
    retry_last_ts: int
    # How long after retry_last_ts to leave it alone (ms).
    retry_interval: int


class DestinationRows:
    def __init__(self, database: Database) -> None:
        self._db = database

    async def get_retry_timings(self, destination: str) -> RetryTimings | None:
        """``destination``'s backoff, or ``None`` if it is not failing (no
        row, or a row whose ``retry_last_ts`` is unset or 0, as Synapse reads it)."""
        rows = await self._db.run_query(
            "get_destination_retry_timings",
            "SELECT failure_ts, retry_last_ts, retry_interval FROM destinations"
            " WHERE destination = ?",
            (destination,),
        )
        if not rows or not rows[0][1]:
            return None
        failure_ts, retry_last_ts, retry_interval = rows[0]
        return RetryTimings(failure_ts, int(retry_last_ts), int(retry_interval or 0))

    async def set_retry_timings(
        self, destination: str, failure_ts: int | None, retry_last_ts: int, retry_interval: int
    ) -> None:
        """Record a new backoff (or, with 0 and 0, its end). A longer backoff
        written meanwhile by another process (one of Synapse's, say) is not
        shortened, except by an end; an equal one is renewed (the cap)."""
        await self._db.run_query(
            "set_destination_retry_timings",
            "INSERT INTO destinations (destination, failure_ts, retry_last_ts, retry_interval)"
            " VALUES (?, ?, ?, ?)"
            " ON CONFLICT (destination) DO UPDATE SET"
            " failure_ts = EXCLUDED.failure_ts, retry_last_ts = EXCLUDED.retry_last_ts,"
            " retry_interval = EXCLUDED.retry_interval"
            " WHERE EXCLUDED.retry_interval = 0 OR destinations.retry_interval IS NULL"
            " OR destinations.retry_interval <= EXCLUDED.retry_interval",
            (destination, failure_ts, retry_last_ts, retry_interval),
        )

    async def clear_retry_timings(self, destination: str) -> bool:
        """End ``destination``'s backoff, if it has one; whether it had."""
        changed = await self._db.run_update(
            "reset_destination_retry_timings",
            "UPDATE destinations SET failure_ts = NULL, retry_last_ts = 0, retry_interval = 0"
            " WHERE destination = ? AND retry_last_ts > 0",
            (destination,),
        )
        return changed > 0

"""Queries on Synapse's ``users`` and ``access_tokens`` tables."""

from __future__ import annotations

from mediarepo.storage.database import Database, Transaction
from mediarepo.values import TokenLookup


class UserRows:
    def __init__(self, database: Database) -> None:
        self._db = database

    async def get_token(self, token: str) -> TokenLookup | None:
        """The user and token rows behind ``token``, joined as Synapse joins them:
        a puppeting token acts as the puppeted user."""
        rows = await self._db.run_query(
            "get_user_by_access_token",
            "SELECT users.name, access_tokens.id, access_tokens.device_id,"
            " access_tokens.valid_until_ms, access_tokens.user_id, access_tokens.used,"
            " users.is_guest, users.admin, users.locked, users.deactivated, users.suspended"
            " FROM users JOIN access_tokens"
            " ON users.name = COALESCE(access_tokens.puppets_user_id, access_tokens.user_id)"
            " WHERE token = ?",
            (token,),
        )
        if not rows:
            return None
        row = rows[0]
        return TokenLookup(
            user_id=row[0],
            token_id=row[1],
            device_id=row[2],
            valid_until_ms=row[3],
            token_owner=row[4],
            used=bool(row[5]),
            is_guest=bool(row[6]),
            is_admin=bool(row[7]),
            locked=bool(row[8]),
            deactivated=bool(row[9]),
            suspended=bool(row[10]),
        )

    async def mark_token_used(self, token_id: int) -> None:
        await self._db.run_query(
            "mark_access_token_as_used",
            "UPDATE access_tokens SET used = ? WHERE id = ?",
            (True, token_id),
        )

    async def register_user(
        self, user_id: str, token: str, admin: bool, now_ms: int, device_id: str | None = None
    ) -> bool:
        """Create ``user_id`` if missing and give it the access token ``token``.

        Returns whether the user was created. Token ids follow Synapse's scheme
        (one more than the largest); run this while Synapse is stopped, since
        Synapse hands out ids from a counter it reads once at start-up.
        """

        def txn(t: Transaction) -> bool:
            t.execute("SELECT admin FROM users WHERE name = ?", (user_id,))
            existing = t.fetchone()
            if existing is None:
                t.execute(
                    "INSERT INTO users (name, creation_ts, admin, is_guest, deactivated)"
                    " VALUES (?, ?, ?, 0, 0)",
                    (user_id, now_ms // 1000, 1 if admin else 0),
                )
            elif admin and not existing[0]:
                t.execute("UPDATE users SET admin = 1 WHERE name = ?", (user_id,))
            if t.engine.name == "psycopg2":
                # Serialise id allocation between concurrent registrations.
                t.execute("LOCK TABLE access_tokens IN SHARE ROW EXCLUSIVE MODE")
            t.execute("SELECT COALESCE(MAX(id), 0) + 1 FROM access_tokens")
            row = t.fetchone()
            assert row is not None
            t.execute(
                "INSERT INTO access_tokens (id, user_id, device_id, token, used)"
                " VALUES (?, ?, ?, ?, ?)",
                (row[0], user_id, device_id, token, False),
            )
            return existing is None

        return await self._db.run_interaction("register_user", txn)

"""Queries on Synapse's ``server_keys_json``: other servers' signed key
responses, shared with Synapse when the database is its own."""

from __future__ import annotations

import attrs

from mediarepo.storage.database import Database


@attrs.frozen
class StoredKeyResponse:
    from_server: str
    valid_until_ms: int
    key_json: bytes


class KeyRows:
    def __init__(self, database: Database) -> None:
        self._db = database

    async def get_key_responses(self, server_name: str, key_id: str) -> list[StoredKeyResponse]:
        """Stored responses holding ``key_id`` of ``server_name``, newest first."""
        rows = await self._db.run_query(
            "get_server_keys_json",
            "SELECT from_server, ts_valid_until_ms, key_json FROM server_keys_json"
            " WHERE server_name = ? AND key_id = ? ORDER BY ts_added_ms DESC",
            (server_name, key_id),
        )
        return [StoredKeyResponse(r[0], r[1] or 0, bytes(r[2])) for r in rows]

    async def store_key_response(
        self,
        server_name: str,
        key_ids: list[str],
        from_server: str,
        added_ms: int,
        valid_until_ms: int,
        key_json: bytes,
    ) -> None:
        """Keep a key response (one row per key it holds), replacing older ones."""
        await self._db.run_interaction(
            "store_server_keys_json",
            lambda t: t.execute_batch(
                "INSERT INTO server_keys_json (server_name, key_id, from_server, ts_added_ms,"
                " ts_valid_until_ms, key_json) VALUES (?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (server_name, key_id, from_server) DO UPDATE SET"
                " ts_added_ms = EXCLUDED.ts_added_ms,"
                " ts_valid_until_ms = EXCLUDED.ts_valid_until_ms, key_json = EXCLUDED.key_json",
                [
                    (server_name, key_id, from_server, added_ms, valid_until_ms, key_json)
                    for key_id in key_ids
                ],
            ),
        )

"""Reading media references out of Synapse's room events, where the
database is Synapse's (the standalone server has no rooms)."""

from __future__ import annotations

import json
from typing import Any

from mediarepo.storage.database import Database, Transaction

# Events are read this many at a time, newest first.
_PAGE = 100


class RoomEventRows:
    def __init__(self, database: Database) -> None:
        self._db = database

    async def media_urls_in_room(self, room_id: str) -> list[str]:
        """``content.url`` and ``content.info.thumbnail_url`` of the room's
        events that carry URLs (outliers aside), newest event first."""

        def txn(t: Transaction) -> list[str]:
            urls: list[str] = []
            before: int | None = None
            while True:
                bound = "" if before is None else " AND e.stream_ordering < ?"
                args: list[object] = [room_id, True, False]
                if before is not None:
                    args.append(before)
                t.execute(
                    "SELECT e.stream_ordering, ej.json FROM events AS e"
                    " JOIN event_json AS ej ON e.event_id = ej.event_id"
                    " WHERE e.room_id = ? AND e.contains_url = ? AND e.outlier = ?"
                    f"{bound} ORDER BY e.stream_ordering DESC LIMIT ?",
                    [*args, _PAGE],
                )
                rows = t.fetchall()
                for _, raw in rows:
                    urls.extend(_urls_of(raw))
                if len(rows) < _PAGE:
                    return urls
                before = int(rows[-1][0])

        return await self._db.run_interaction("get_media_mxcs_in_room", txn)


def _urls_of(raw: Any) -> list[str]:
    try:
        event = json.loads(raw if isinstance(raw, str) else bytes(raw).decode("utf-8"))
    except (ValueError, UnicodeDecodeError):
        return []
    content = event.get("content") if isinstance(event, dict) else None
    if not isinstance(content, dict):
        return []
    found = [content.get("url")]
    info = content.get("info")
    if isinstance(info, dict):
        found.append(info.get("thumbnail_url"))
    return [url for url in found if isinstance(url, str)]

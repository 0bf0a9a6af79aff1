"""Media referenced in a room, for the room admin endpoints. Rooms are
Synapse's: this works only when the database is Synapse's."""

from __future__ import annotations

import re

from mediarepo.errors import Codes, MatrixError
from mediarepo.media.admin_rules import MediaAdmin
from mediarepo.storage.room_rows import RoomEventRows

# What Synapse accepts as a media reference in an event.
_MXC = re.compile(r"\Amxc://([^/]+)/([^/#?]+)\Z")


class RoomMedia:
    def __init__(self, events: RoomEventRows | None, admin: MediaAdmin) -> None:
        self._events = events
        self._admin = admin

    async def _references(self, room_id: str) -> tuple[list[str], list[tuple[str, str]]]:
        """Local media IDs and remote (server, media ID) pairs the room's events name."""
        if self._events is None:
            raise MatrixError(
                404,
                Codes.UNRECOGNIZED,
                "This server keeps no room events (its database is not Synapse's):"
                " ask Synapse for media by room",
            )
        local: list[str] = []
        remote: list[tuple[str, str]] = []
        for url in await self._events.media_urls_in_room(room_id):
            match = _MXC.match(url)
            if match is None:
                continue
            server_name, media_id = match.groups()
            if self._admin.is_local(server_name):
                local.append(media_id)
            else:
                remote.append((server_name, media_id))
        return local, remote

    async def media_in_room(self, room_id: str) -> tuple[list[str], list[str]]:
        """The room's local and remote media as mxc URIs."""
        local, remote = await self._references(room_id)
        server_name = self._admin.server_name
        return (
            [f"mxc://{server_name}/{media_id}" for media_id in local],
            [f"mxc://{origin}/{media_id}" for origin, media_id in remote],
        )

    async def quarantine_room_media(self, room_id: str, quarantined_by: str) -> int:
        local, remote = await self._references(room_id)
        result = await self._admin.change_quarantine(local, remote, quarantined_by)
        return result.count

"""Synapse's media admin API under ``/_synapse/admin/v1``: the same paths,
parameters and bodies, for server admins only."""

from __future__ import annotations

import enum
from typing import Any, TypeVar

from mediarepo.errors import Codes, MatrixError
from mediarepo.http.auth import Authenticator
from mediarepo.http.server import (
    PATH_SEGMENT,
    Route,
    query_bool,
    query_int,
    query_string,
    respond_json,
    route,
)
from mediarepo.http.site import MediaRequest
from mediarepo.media.admin_rules import MediaAdmin
from mediarepo.media.rooms import RoomMedia
from mediarepo.storage.media_admin_rows import UsageOrder, UsageQuery, UserMediaOrder
from mediarepo.values import LocalMedia, RemoteMedia, Requester

E = TypeVar("E", bound=enum.Enum)


def local_media_json(media: LocalMedia) -> dict[str, Any]:
    return {
        "media_id": media.media_id,
        "media_type": media.media_type,
        "media_length": media.media_length,
        "upload_name": media.upload_name,
        "created_ts": media.created_ts,
        "url_cache": media.url_cache,
        "last_access_ts": media.last_access_ts,
        "quarantined_by": media.quarantined_by,
        "safe_from_quarantine": media.safe_from_quarantine,
        "user_id": media.user_id,
        "authenticated": media.authenticated,
        "sha256": media.sha256,
    }


def media_info_json(media: LocalMedia | RemoteMedia) -> dict[str, Any]:
    if isinstance(media, LocalMedia):
        return {"media_origin": None, "filesystem_id": None, **local_media_json(media)}
    return {
        "media_origin": media.media_origin,
        "user_id": None,
        "media_id": media.media_id,
        "media_type": media.media_type,
        "media_length": media.media_length,
        "upload_name": media.upload_name,
        "created_ts": media.created_ts,
        "filesystem_id": media.filesystem_id,
        "url_cache": None,
        "last_access_ts": media.last_access_ts,
        "quarantined_by": media.quarantined_by,
        "authenticated": media.authenticated,
        "safe_from_quarantine": None,
        "sha256": media.sha256,
    }


def _query_choice(request: MediaRequest, name: str, choices: type[E], default: E) -> E:
    value = query_string(request, name)
    if value is None:
        return default
    for choice in choices:
        if choice.value == value:
            return choice
    allowed = ", ".join(repr(c.value) for c in choices)
    raise MatrixError(
        400, Codes.INVALID_PARAM, f"Query parameter {name!r} must be one of [{allowed}]"
    )


def _query_direction(request: MediaRequest, default_descending: bool = False) -> bool:
    """``dir``: ``f`` (ascending) or ``b`` (descending)."""
    value = query_string(request, "dir")
    if value is None:
        return default_descending
    if value not in ("f", "b"):
        raise MatrixError(
            400, Codes.INVALID_PARAM, "Query parameter 'dir' must be one of ['b', 'f']"
        )
    return value == "b"


def _paging(request: MediaRequest) -> tuple[int, int]:
    return query_int(request, "from", 0), query_int(request, "limit", 100)


class AdminHandler:
    def __init__(self, admin: MediaAdmin, rooms: RoomMedia, auth: Authenticator) -> None:
        self._admin = admin
        self._rooms = rooms
        self._auth = auth

    async def _require_admin(self, request: MediaRequest) -> Requester:
        requester = await self._auth.requester(request, allow_guest=False)
        if not requester.is_admin:
            raise MatrixError(403, Codes.FORBIDDEN, "You are not a server admin")
        return requester

    # -- one media -------------------------------------------------------------

    async def on_get_media(self, request: MediaRequest, params: dict[str, str]) -> None:
        await self._require_admin(request)
        media = await self._admin.media(params["server_name"], params["media_id"])
        respond_json(request, 200, {"media_info": media_info_json(media)})

    async def on_delete_media(self, request: MediaRequest, params: dict[str, str]) -> None:
        await self._require_admin(request)
        deleted = await self._admin.delete_media(params["server_name"], params["media_id"])
        respond_json(request, 200, {"deleted_media": deleted, "total": len(deleted)})

    async def on_quarantine(self, request: MediaRequest, params: dict[str, str]) -> None:
        requester = await self._require_admin(request)
        await self._admin.set_quarantined(
            params["server_name"], params["media_id"], requester.user_id
        )
        respond_json(request, 200, {})

    async def on_unquarantine(self, request: MediaRequest, params: dict[str, str]) -> None:
        await self._require_admin(request)
        await self._admin.set_quarantined(params["server_name"], params["media_id"], None)
        respond_json(request, 200, {})

    async def on_protect(self, request: MediaRequest, params: dict[str, str]) -> None:
        await self._require_admin(request)
        await self._admin.set_protected(params["media_id"], True)
        respond_json(request, 200, {})

    async def on_unprotect(self, request: MediaRequest, params: dict[str, str]) -> None:
        await self._require_admin(request)
        await self._admin.set_protected(params["media_id"], False)
        respond_json(request, 200, {})

    # -- many media --------------------------------------------------------------

    async def on_delete_old_media(self, request: MediaRequest, params: dict[str, str]) -> None:
        await self._require_admin(request)
        server_name = params.get("server_name")
        if server_name is not None and not self._admin.is_local(server_name):
            raise MatrixError(400, Codes.UNKNOWN, "Can only delete local media")
        deleted = await self._admin.delete_old_local_media(
            before_ts=query_int(request, "before_ts"),
            size_gt=query_int(request, "size_gt", 0),
            keep_profiles=query_bool(request, "keep_profiles", True),
        )
        respond_json(request, 200, {"deleted_media": deleted, "total": len(deleted)})

    async def on_purge_remote_cache(self, request: MediaRequest, params: dict[str, str]) -> None:
        await self._require_admin(request)
        deleted = await self._admin.purge_remote_cache(query_int(request, "before_ts"))
        respond_json(request, 200, {"deleted": deleted})

    async def on_quarantine_changes(self, request: MediaRequest, params: dict[str, str]) -> None:
        await self._require_admin(request)
        changes, next_batch = await self._admin.quarantine_changes(query_int(request, "from", 0))
        body = {
            "next_batch": next_batch,
            "changes": [
                {
                    "origin": change.origin or self._admin.server_name,
                    "media_id": change.media_id,
                    "quarantined": change.quarantined,
                }
                for change in changes
            ],
        }
        respond_json(request, 200, body)

    # -- users -----------------------------------------------------------------

    def _user_media_order(self, request: MediaRequest) -> tuple[UserMediaOrder, bool]:
        # With neither parameter, newest first; otherwise ascending unless dir=b.
        if query_string(request, "order_by") is None and query_string(request, "dir") is None:
            return UserMediaOrder.CREATED_TS, True
        order = _query_choice(request, "order_by", UserMediaOrder, UserMediaOrder.CREATED_TS)
        return order, _query_direction(request)

    async def on_get_user_media(self, request: MediaRequest, params: dict[str, str]) -> None:
        await self._require_admin(request)
        start, limit = _paging(request)
        order, descending = self._user_media_order(request)
        media, total = await self._admin.user_media(
            params["user_id"], start, limit, order, descending
        )
        body: dict[str, Any] = {"media": [local_media_json(m) for m in media], "total": total}
        if start + limit < total:
            body["next_token"] = start + len(media)
        respond_json(request, 200, body)

    async def on_delete_user_media(self, request: MediaRequest, params: dict[str, str]) -> None:
        await self._require_admin(request)
        start, limit = _paging(request)
        order, descending = self._user_media_order(request)
        deleted = await self._admin.delete_user_media(
            params["user_id"], start, limit, order, descending
        )
        respond_json(request, 200, {"deleted_media": deleted, "total": len(deleted)})

    async def on_quarantine_user_media(self, request: MediaRequest, params: dict[str, str]) -> None:
        requester = await self._require_admin(request)
        count = await self._admin.quarantine_user_media(params["user_id"], requester.user_id)
        respond_json(request, 200, {"num_quarantined": count})

    async def on_usage_statistics(self, request: MediaRequest, params: dict[str, str]) -> None:
        await self._require_admin(request)
        start, limit = _paging(request)
        from_ts = query_int(request, "from_ts", 0)
        until_ts = None
        if query_string(request, "until_ts") is not None:
            until_ts = query_int(request, "until_ts")
            if until_ts <= from_ts:
                raise MatrixError(
                    400,
                    Codes.INVALID_PARAM,
                    "Query parameter until_ts must be greater than from_ts.",
                )
        search_term = query_string(request, "search_term")
        if search_term == "":
            raise MatrixError(
                400, Codes.INVALID_PARAM, "Query parameter search_term cannot be an empty string."
            )
        query = UsageQuery(
            start=start,
            limit=limit,
            from_ts=from_ts,
            until_ts=until_ts,
            order_by=_query_choice(request, "order_by", UsageOrder, UsageOrder.USER_ID),
            descending=_query_direction(request),
            search_term=search_term,
        )
        users, total = await self._admin.usage_by_user(query)
        body: dict[str, Any] = {
            "users": [
                {
                    "user_id": u.user_id,
                    "displayname": u.displayname,
                    "media_count": u.media_count,
                    "media_length": u.media_length,
                }
                for u in users
            ],
            "total": total,
        }
        if start + limit < total:
            body["next_token"] = start + len(users)
        respond_json(request, 200, body)

    # -- rooms -----------------------------------------------------------------

    async def on_get_room_media(self, request: MediaRequest, params: dict[str, str]) -> None:
        await self._require_admin(request)
        local, remote = await self._rooms.media_in_room(params["room_id"])
        respond_json(request, 200, {"local": local, "remote": remote})

    async def on_quarantine_room_media(self, request: MediaRequest, params: dict[str, str]) -> None:
        requester = await self._require_admin(request)
        count = await self._rooms.quarantine_room_media(params["room_id"], requester.user_id)
        respond_json(request, 200, {"num_quarantined": count})


def admin_routes(handler: AdminHandler) -> list[Route]:
    """Routes under ``/_synapse/admin/v1``; the specific ones come before
    the ``media/{serverName}/{mediaId}`` pattern they would also match."""
    media_key = rf"(?P<server_name>{PATH_SEGMENT})/(?P<media_id>{PATH_SEGMENT})"
    return [
        route("admin_delete_old", ["POST"], r"media/delete", handler.on_delete_old_media),
        route(
            "admin_delete_old_legacy",
            ["POST"],
            rf"media/(?P<server_name>{PATH_SEGMENT})/delete",
            handler.on_delete_old_media,
        ),
        route(
            "admin_quarantine_changes",
            ["GET"],
            r"media/quarantine_changes",
            handler.on_quarantine_changes,
        ),
        route(
            "admin_quarantine", ["POST"], rf"media/quarantine/{media_key}", handler.on_quarantine
        ),
        route(
            "admin_unquarantine",
            ["POST"],
            rf"media/unquarantine/{media_key}",
            handler.on_unquarantine,
        ),
        route(
            "admin_protect",
            ["POST"],
            rf"media/protect/(?P<media_id>{PATH_SEGMENT})",
            handler.on_protect,
        ),
        route(
            "admin_unprotect",
            ["POST"],
            rf"media/unprotect/(?P<media_id>{PATH_SEGMENT})",
            handler.on_unprotect,
        ),
        route("admin_media", ["GET"], rf"media/{media_key}", handler.on_get_media),
        route("admin_media_delete", ["DELETE"], rf"media/{media_key}", handler.on_delete_media),
        route("admin_purge_cache", ["POST"], r"purge_media_cache", handler.on_purge_remote_cache),
        route(
            "admin_user_media",
            ["GET"],
            rf"users/(?P<user_id>{PATH_SEGMENT})/media",
            handler.on_get_user_media,
        ),
        route(
            "admin_user_media_delete",
            ["DELETE"],
            rf"users/(?P<user_id>{PATH_SEGMENT})/media",
            handler.on_delete_user_media,
        ),
        route(
            "admin_user_quarantine",
            ["POST"],
            rf"user/(?P<user_id>{PATH_SEGMENT})/media/quarantine",
            handler.on_quarantine_user_media,
        ),
        route(
            "admin_media_statistics",
            ["GET"],
            r"statistics/users/media",
            handler.on_usage_statistics,
        ),
        route(
            "admin_room_media",
            ["GET"],
            rf"room/(?P<room_id>{PATH_SEGMENT})/media",
            handler.on_get_room_media,
        ),
        route(
            "admin_room_quarantine",
            ["POST"],
            rf"room/(?P<room_id>{PATH_SEGMENT})/media/quarantine",
            handler.on_quarantine_room_media,
        ),
        route(
            "admin_room_quarantine_legacy",
            ["POST"],
            rf"quarantine_media/(?P<room_id>{PATH_SEGMENT})",
            handler.on_quarantine_room_media,
        ),
    ]

"""Frozen value classes passed between the layers."""

from __future__ import annotations

import attrs


@attrs.frozen
class Requester:
    """Who made an authenticated request."""

    user_id: str
    device_id: str | None
    is_guest: bool
    is_admin: bool
    access_token_id: int | None
    # Suspended by an admin: may read, may not add media (403 M_USER_SUSPENDED).
    is_suspended: bool = False


@attrs.frozen
class TokenLookup:
    """The rows behind an access token, as ``storage.user_rows`` reads them."""

    user_id: str
    token_id: int
    device_id: str | None
    valid_until_ms: int | None
    token_owner: str
    used: bool
    is_guest: bool
    is_admin: bool
    locked: bool
    deactivated: bool
    suspended: bool


@attrs.frozen
class LocalMedia:
    """A row of ``local_media_repository``."""

    media_id: str
    media_type: str | None
    media_length: int | None  # None while an async upload is pending
    created_ts: int
    upload_name: str | None
    user_id: str | None
    quarantined_by: str | None
    url_cache: str | None
    last_access_ts: int | None
    safe_from_quarantine: bool
    authenticated: bool
    sha256: str | None

    @property
    def is_pending(self) -> bool:
        return self.media_length is None


@attrs.frozen
class ThumbnailInfo:
    """A row of ``local_media_repository_thumbnails`` (its media ID aside)."""

    width: int
    height: int
    type: str
    method: str
    length: int


@attrs.frozen
class RemoteMedia:
    """A row of ``remote_media_cache``: another server's media, cached here."""

    media_origin: str
    media_id: str
    media_type: str | None
    created_ts: int
    upload_name: str | None
    media_length: int
    filesystem_id: str
    last_access_ts: int | None
    quarantined_by: str | None
    authenticated: bool
    sha256: str | None

"""Who is behind an access token, checked as Synapse checks it.

Lookups are cached for a few seconds so that a burst of downloads costs one
query. Synapse invalidates its own cache over replication, which this server
does not see, so the cache is kept short: a logged-out token stops working
within ``TOKEN_CACHE_SECONDS``.
"""

from __future__ import annotations

import base64
import secrets
import string
import zlib
from collections import OrderedDict

from twisted.internet.interfaces import IReactorTime

from mediarepo.errors import Codes, MatrixError
from mediarepo.storage.user_rows import UserRows
from mediarepo.values import Requester, TokenLookup

TOKEN_CACHE_SECONDS = 5.0
_TOKEN_CACHE_ENTRIES = 10_000


def _unknown_token(
    message: str = "Invalid access token passed.", soft: bool = False
) -> MatrixError:
    return MatrixError(401, Codes.UNKNOWN_TOKEN, message, extra={"soft_logout": soft})


class Accounts:
    def __init__(self, users: UserRows, clock: IReactorTime) -> None:
        self._users = users
        self._clock = clock
        self._cache: OrderedDict[str, tuple[TokenLookup, float]] = OrderedDict()

    async def _lookup(self, token: str) -> TokenLookup | None:
        now = self._clock.seconds()
        cached = self._cache.get(token)
        if cached is not None and now - cached[1] < TOKEN_CACHE_SECONDS:
            return cached[0]
        lookup = await self._users.get_token(token)
        if lookup is None:
            self._cache.pop(token, None)
            return None
        if not lookup.used:
            # Synapse marks a token used once it has been seen, which retires
            # the refresh token that minted it.
            await self._users.mark_token_used(lookup.token_id)
        self._cache[token] = (lookup, now)
        self._cache.move_to_end(token)
        while len(self._cache) > _TOKEN_CACHE_ENTRIES:
            self._cache.popitem(last=False)
        return lookup

    async def authenticate(self, token: str) -> Requester:
        """The requester behind ``token``, or a 401 :class:`MatrixError`."""
        lookup = await self._lookup(token)
        if lookup is None or lookup.deactivated:
            raise _unknown_token()
        if (
            lookup.valid_until_ms is not None
            and lookup.valid_until_ms < self._clock.seconds() * 1000
        ):
            raise _unknown_token("Access token has expired", soft=True)
        if lookup.locked:
            raise MatrixError(
                401, Codes.USER_LOCKED, "User account has been locked", extra={"soft_logout": True}
            )
        return Requester(
            user_id=lookup.user_id,
            device_id=lookup.device_id,
            is_guest=lookup.is_guest,
            is_admin=lookup.is_admin,
            access_token_id=lookup.token_id,
            is_suspended=lookup.suspended,
        )


def new_access_token(localpart: str) -> str:
    """A token in Synapse's shape: ``syt_<base64 localpart>_<random>_<checksum>``."""
    encoded = base64.urlsafe_b64encode(localpart.encode()).decode().rstrip("=")
    random_part = "".join(secrets.choice(string.ascii_letters) for _ in range(20))
    base = f"syt_{encoded}_{random_part}"
    return f"{base}_{_base62(zlib.crc32(base.encode()))}"


def _base62(number: int) -> str:
    alphabet = string.digits + string.ascii_letters
    digits = ""
    while number:
        number, rest = divmod(number, 62)
        digits = alphabet[rest] + digits
    return digits.rjust(6, "0")

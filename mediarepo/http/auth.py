"""Reading credentials off a request."""

from __future__ import annotations

from mediarepo.accounts import Accounts
from mediarepo.errors import Codes, MatrixError
from mediarepo.http.site import MediaRequest
from mediarepo.values import Requester


def _missing_token(message: str) -> MatrixError:
    return MatrixError(401, Codes.MISSING_TOKEN, message)


def access_token_of(request: MediaRequest) -> str:
    """The access token from ``Authorization: Bearer`` or ``?access_token=``,
    with Synapse's errors for each way of getting it wrong."""
    headers = request.requestHeaders.getRawHeaders(b"Authorization") or []
    query = request.args.get(b"access_token")
    if headers and query:
        raise _missing_token("Mixing Authorization headers and access_token query parameters.")
    if len(headers) > 1:
        raise _missing_token("Too many Authorization headers.")
    if headers:
        parts = headers[0].split(b" ")
        if len(parts) != 2 or parts[0] != b"Bearer" or not parts[1]:
            raise _missing_token("Invalid Authorization header.")
        raw = parts[1]
    elif query:
        raw = query[0]
    else:
        raise _missing_token("Missing access token")
    try:
        return raw.decode("ascii")
    except UnicodeDecodeError as e:
        raise MatrixError(401, Codes.UNKNOWN_TOKEN, "Invalid access token passed.") from e


class Authenticator:
    def __init__(self, accounts: Accounts) -> None:
        self._accounts = accounts

    async def requester(self, request: MediaRequest, *, allow_guest: bool) -> Requester:
        requester = await self._accounts.authenticate(access_token_of(request))
        if requester.is_guest and not allow_guest:
            raise MatrixError(403, Codes.GUEST_ACCESS_FORBIDDEN, "Guest access not allowed")
        return requester

"""Reading credentials off a request."""

from __future__ import annotations

from mediarepo.accounts import Accounts
from mediarepo.errors import Codes, MatrixError
from mediarepo.federation.backoff import DestinationBackoff
from mediarepo.federation.keyring import Keyring
from mediarepo.federation.signing import AuthHeaderError, parse_x_matrix, verify_request
from mediarepo.http.server import is_storable_text
from mediarepo.http.site import MediaRequest
from mediarepo.values import Requester


def _missing_token(message: str) -> MatrixError:
    return MatrixError(401, Codes.MISSING_TOKEN, message)


def _unknown_token() -> MatrixError:
    return MatrixError(
        401, Codes.UNKNOWN_TOKEN, "Invalid access token passed.", extra={"soft_logout": False}
    )


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
    # No token has a byte that isn't ASCII, or a NUL (which the database
    # cannot even be asked about): such a token is simply not known.
    try:
        token = raw.decode("ascii")
    except UnicodeDecodeError as e:
        raise _unknown_token() from e
    if not is_storable_text(token):
        raise _unknown_token()
    return token


class Authenticator:
    def __init__(self, accounts: Accounts) -> None:
        self._accounts = accounts

    async def requester(self, request: MediaRequest, *, allow_guest: bool) -> Requester:
        requester = await self._accounts.authenticate(access_token_of(request))
        if requester.is_guest and not allow_guest:
            raise MatrixError(403, Codes.GUEST_ACCESS_FORBIDDEN, "Guest access not allowed")
        return requester


class FederationAuthenticator:
    """Checks the ``X-Matrix`` signature of a request from another server."""

    def __init__(
        self,
        keyring: Keyring,
        server_name: str,
        domain_whitelist: frozenset[str] | None,
        backoff: DestinationBackoff | None = None,
    ) -> None:
        self._keyring = keyring
        self._server_name = server_name
        self._whitelist = domain_whitelist
        self._backoff = backoff

    async def origin(self, request: MediaRequest) -> str:
        """The server that signed ``request``, or a 400/401/403 :class:`MatrixError`."""
        headers = [
            h
            for h in request.requestHeaders.getRawHeaders(b"Authorization") or []
            if h.startswith(b"X-Matrix")
        ]
        if not headers:
            raise MatrixError(401, Codes.UNAUTHORIZED, "Missing Authorization headers")
        # The request-target exactly as received, which is what the peer signed.
        uri = request.uri.decode("ascii", "replace")
        method = request.method.decode("ascii", "replace")
        origin = None
        for header in headers:
            signer = await self._signer(header, method, uri)
            if origin is not None and origin != signer:
                raise MatrixError(401, Codes.UNAUTHORIZED, "Signatures of several origins")
            origin = signer
        assert origin is not None
        if self._backoff is not None:
            # It reached us, so it is up: stop leaving it alone (as Synapse does).
            await self._backoff.clear(origin)
        return origin

    async def _signer(self, header: bytes, method: str, uri: str) -> str:
        """The origin whose valid signature ``header`` holds."""
        try:
            auth = parse_x_matrix(header)
        except AuthHeaderError as e:
            raise MatrixError(400, Codes.UNAUTHORIZED, "Malformed Authorization header") from e
        if auth.destination is not None and auth.destination != self._server_name:
            raise MatrixError(401, Codes.UNAUTHORIZED, "Destination mismatch in auth header")
        if self._whitelist is not None and auth.origin not in self._whitelist:
            raise MatrixError(403, Codes.FORBIDDEN, f"Federation denied with {auth.origin}.")
        key = await self._keyring.verify_key(auth.origin, auth.key_id)
        if key is None:
            raise MatrixError(
                401,
                Codes.UNAUTHORIZED,
                f"Failed to find any key to satisfy: {auth.origin} {auth.key_id}",
            )
        try:
            valid = verify_request(auth, method, uri, self._server_name, key)
        except AuthHeaderError as e:
            raise MatrixError(401, Codes.UNAUTHORIZED, str(e)) from e
        if not valid:
            raise MatrixError(
                401, Codes.UNAUTHORIZED, f"Invalid signature for server {auth.origin}"
            )
        return auth.origin

"""Other servers' verify keys, for checking their signed requests.

A key is looked for in memory, then in ``server_keys_json`` (Synapse's
table, so keys Synapse fetched serve us too), then asked of the notary
servers in ``trusted_key_servers``, then of the server itself. Every
answer must be signed by the server it describes (and by the notary, when
its key is configured) before it is believed, and is stored for later.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from typing import Any

from canonicaljson import encode_canonical_json
from signedjson.key import decode_verify_key_bytes, get_verify_key
from signedjson.sign import SignatureVerifyException, verify_signed_json
from unpaddedbase64 import decode_base64

from mediarepo.config_federation import TrustedKeyServer
from mediarepo.federation.client import FederationClient, FederationRequestError
from mediarepo.federation.keys import key_id as name_of_key
from mediarepo.outbound import BodyReadError, OutboundResponse
from mediarepo.sharing import SharedWork
from mediarepo.storage.key_rows import KeyRows

logger = logging.getLogger(__name__)

# Key responses larger than this are not read.
MAX_KEY_RESPONSE_BYTES = 256 * 1024


class KeyResponseError(Exception):
    pass


def verify_keys_of(
    response: dict[str, Any], server_name: str, now_ms: int
) -> dict[str, tuple[Any, int]]:
    """The keys a signed ``/_matrix/key/v2/server`` answer of
    ``server_name`` holds, each with the time it is valid until, once the
    answer is shown to be signed by one of its own keys."""
    if not isinstance(response, dict) or response.get("server_name") != server_name:
        raise KeyResponseError(f"answer is not about {server_name}")
    valid_until = response.get("valid_until_ts")
    if not isinstance(valid_until, int):
        raise KeyResponseError("no valid_until_ts")
    keys: dict[str, tuple[Any, int]] = {}
    for section, expiry_field in (("verify_keys", None), ("old_verify_keys", "expired_ts")):
        entries = response.get(section, {})
        if not isinstance(entries, dict):
            raise KeyResponseError(f"{section} is not an object")
        for key_name, entry in entries.items():
            if not isinstance(key_name, str) or not key_name.startswith("ed25519:"):
                continue
            key = _decode_key(key_name, entry)
            until = valid_until if expiry_field is None else entry.get(expiry_field, 0)
            keys[key_name] = (key, until if isinstance(until, int) else 0)
    _check_signed_by_self(response, server_name, keys)
    return keys


def _decode_key(key_name: str, entry: object) -> Any:
    """The verify key of an entry of ``verify_keys`` or ``old_verify_keys``."""
    if not isinstance(entry, dict) or not isinstance(entry.get("key"), str):
        raise KeyResponseError(f"{key_name} has no key")
    try:
        return decode_verify_key_bytes(key_name, decode_base64(entry["key"]))
    except Exception as e:
        raise KeyResponseError(f"{key_name} is not a valid key") from e


def _check_signed_by_self(
    response: dict[str, Any], server_name: str, keys: dict[str, tuple[Any, int]]
) -> None:
    """Refuse an answer with no good signature by one of the keys it lists,
    or with a bad one."""
    signed_by_self = False
    for key_name, (key, _) in keys.items():
        if key_name in response.get("signatures", {}).get(server_name, {}):
            try:
                verify_signed_json(response, server_name, key)
                signed_by_self = True
            except SignatureVerifyException as e:
                raise KeyResponseError(f"bad self-signature with {key_name}") from e
    if not signed_by_self:
        raise KeyResponseError("answer is not signed by its server")


class Keyring:
    def __init__(
        self,
        store: KeyRows,
        client: FederationClient,
        own_signing_keys: Sequence[Any],
        notaries: Sequence[TrustedKeyServer],
        clock: Any,
    ) -> None:
        self._store = store
        self._client = client
        self._server_name = client.server_name
        self._own = {name_of_key(k): get_verify_key(k) for k in own_signing_keys}
        self._notaries = notaries
        self._clock = clock
        self._cache: dict[tuple[str, str], tuple[Any, int]] = {}
        self._fetching: SharedWork[str, None] = SharedWork()

    def _now_ms(self) -> int:
        return int(self._clock.seconds() * 1000)

    async def verify_key(self, server_name: str, key_id: str) -> Any | None:
        """``server_name``'s key ``key_id``, valid now, or ``None``."""
        if server_name == self._server_name:
            return self._own.get(key_id)
        now = self._now_ms()
        cached = self._cache.get((server_name, key_id))
        if cached is not None and cached[1] >= now:
            return cached[0]
        for stored in await self._store.get_key_responses(server_name, key_id):
            if stored.valid_until_ms < now:
                continue
            try:
                keys = verify_keys_of(json.loads(stored.key_json), server_name, now)
            except (ValueError, KeyResponseError) as e:
                logger.warning("stored keys of %s are unusable: %s", server_name, e)
                continue
            self._remember(server_name, keys)
            if key_id in keys and keys[key_id][1] >= now:
                return keys[key_id][0]
        await self._fetching.run(server_name, lambda: self._fetch(server_name))
        cached = self._cache.get((server_name, key_id))
        if cached is not None and cached[1] >= now:
            return cached[0]
        return None

    def _remember(self, server_name: str, keys: dict[str, tuple[Any, int]]) -> None:
        for key_name, entry in keys.items():
            self._cache[(server_name, key_name)] = entry

    async def _fetch(self, server_name: str) -> None:
        """Ask the notaries, then the server itself, for ``server_name``'s keys."""
        for notary in self._notaries:
            try:
                await self._fetch_from_notary(notary, server_name)
                return
            except (FederationRequestError, KeyResponseError, ValueError) as e:
                logger.info("notary %s has no keys of %s: %s", notary.server_name, server_name, e)
        try:
            response = await self._get_json(server_name, "/_matrix/key/v2/server", signed=False)
            await self._accept(server_name, response, from_server=server_name)
        except (FederationRequestError, KeyResponseError, ValueError) as e:
            logger.info("cannot fetch the keys of %s: %s", server_name, e)

    async def _fetch_from_notary(self, notary: TrustedKeyServer, server_name: str) -> None:
        response = await self._client.request(
            b"POST",
            notary.server_name,
            "/_matrix/key/v2/query",
            json_body={"server_keys": {server_name: {}}},
        )
        body = await self._read_json(response)
        answers = body.get("server_keys") if isinstance(body, dict) else None
        if not isinstance(answers, list):
            raise KeyResponseError("no server_keys list")
        accepted = False
        for answer in answers:
            if not isinstance(answer, dict) or answer.get("server_name") != server_name:
                continue
            for notary_key_id, notary_key in notary.verify_keys.items():
                key = decode_verify_key_bytes(notary_key_id, decode_base64(notary_key))
                try:
                    verify_signed_json(answer, notary.server_name, key)
                except SignatureVerifyException as e:
                    raise KeyResponseError("answer not signed by the notary") from e
            await self._accept(server_name, answer, from_server=notary.server_name)
            accepted = True
        if not accepted:
            raise KeyResponseError("no answer about the server")

    async def _get_json(self, destination: str, path: str, *, signed: bool) -> Any:
        # Asked whatever its backoff says, as Synapse asks (a server whose
        # request we are checking is evidently up).
        response = await self._client.get(destination, path, signed=signed, ignore_backoff=True)
        return await self._read_json(response)

    async def _read_json(self, response: OutboundResponse) -> Any:
        if response.code != 200:
            self._client.outbound.drop_body(response)
            raise KeyResponseError(f"HTTP {response.code}")
        try:
            body = await self._client.outbound.read_limited_body(response, MAX_KEY_RESPONSE_BYTES)
        except BodyReadError as e:
            raise KeyResponseError(f"answer not read: {e}") from e
        return json.loads(body)

    async def _accept(self, server_name: str, response: Any, *, from_server: str) -> None:
        now = self._now_ms()
        keys = verify_keys_of(response, server_name, now)
        self._remember(server_name, keys)
        await self._store.store_key_response(
            server_name,
            list(keys),
            from_server,
            now,
            int(response["valid_until_ts"]),
            encode_canonical_json(response),
        )

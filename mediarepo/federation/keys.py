"""The server's ed25519 signing key, in Synapse's file format
(``ed25519 <version> <unpadded base64 seed>``, one key a line)."""

from __future__ import annotations

import os
import secrets
import string
from collections.abc import Mapping
from typing import Any

from signedjson.key import (
    encode_verify_key_base64,
    generate_signing_key,
    get_verify_key,
    read_signing_keys,
    write_signing_keys,
)
from signedjson.sign import sign_json

from mediarepo.config_federation import OldVerifyKey
from mediarepo.errors import ConfigError


def new_key_version() -> str:
    """``a_`` and four random characters, as Synapse names new keys."""
    alphabet = string.ascii_letters + string.digits
    return "a_" + "".join(secrets.choice(alphabet) for _ in range(4))


def write_new_signing_key(path: str) -> None:
    """Create a signing key file at ``path``, readable by its owner only."""
    key = generate_signing_key(new_key_version())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        write_signing_keys(f, [key])


def load_signing_keys(path: str) -> list[Any]:
    try:
        with open(path) as f:
            keys = read_signing_keys(f)
    except OSError as e:
        raise ConfigError("signing_key_path", f"cannot read {path}: {e.strerror}") from e
    except Exception as e:
        raise ConfigError("signing_key_path", f"{path} is not a signing key file: {e}") from e
    if not keys:
        raise ConfigError("signing_key_path", f"{path} holds no key")
    return list(keys)


def key_id(key: Any) -> str:
    """``ed25519:<version>``, as keys are named on the wire."""
    return f"{key.alg}:{key.version}"


def server_keys_response(
    server_name: str,
    signing_keys: list[Any],
    old_verify_keys: Mapping[str, OldVerifyKey],
    valid_until_ts: int,
) -> dict[str, Any]:
    """The body of ``GET /_matrix/key/v2/server``: our verify keys, signed by
    every signing key, so a peer can check requests signed with any of them."""
    response: dict[str, Any] = {
        "server_name": server_name,
        "valid_until_ts": valid_until_ts,
        "verify_keys": {
            key_id(key): {"key": encode_verify_key_base64(get_verify_key(key))}
            for key in signing_keys
        },
        "old_verify_keys": {
            name: {"key": old.key, "expired_ts": old.expired_ts}
            for name, old in old_verify_keys.items()
        },
    }
    for key in signing_keys:
        response = sign_json(response, server_name, key)
    return response

"""The server's ed25519 signing key, in Synapse's file format
(``ed25519 <version> <unpadded base64 seed>``, one key a line)."""

from __future__ import annotations

import os
import secrets
import string
from typing import Any

from signedjson.key import generate_signing_key, read_signing_keys, write_signing_keys

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

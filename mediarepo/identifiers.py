"""Names the Matrix spec defines, checked the one way every layer uses.

(No imports of ours: config, storage, federation and the media layer all
check server names here.)
"""

from __future__ import annotations

import re

_SERVER_NAME_HOST = re.compile(r"\A[0-9a-zA-Z-]+(?:\.[0-9a-zA-Z-]+)*\Z")
# ASCII digits only: int() also takes other scripts' digits.
_PORT = re.compile(r"[0-9]{1,5}")


def is_valid_server_name(name: str) -> bool:
    """Whether ``name`` is ``host[:port]`` as the Matrix spec defines a server name."""
    if not name or len(name) > 255:
        return False
    host, port = name, ""
    if name.startswith("["):
        end = name.find("]")
        if end == -1:
            return False
        host, rest = name[1:end], name[end + 1 :]
        if rest and not rest.startswith(":"):
            return False
        port = rest[1:] if rest else ""
        if not re.fullmatch(r"[0-9a-fA-F:.]+", host) or ":" not in host:
            return False
    elif ":" in name:
        host, port = name.rsplit(":", 1)
        if not _SERVER_NAME_HOST.match(host):
            return False
    elif not _SERVER_NAME_HOST.match(host):
        return False
    if name.endswith(":") or (port and (not _PORT.fullmatch(port) or not 0 < int(port) < 65536)):
        return False
    return True

"""Configuration of where this process listens and which of Synapse's
processes it stands in for: the main process, or a media repository or
generic worker (``worker_app``, ``worker_name``). A worker reads its own
keys (``worker_listeners``, ``worker_log_config``, ``worker_pid_file``)
where the main process reads the shared ones."""

from __future__ import annotations

import errno
import os

import attrs

from mediarepo.config_reader import ConfigReader
from mediarepo.errors import ConfigError

# The worker_app values under which Synapse serves media: this server is then
# that worker.
MEDIA_WORKER_APPS = ("synapse.app.media_repository", "synapse.app.generic_worker")
# Synapse's name for its main process (no worker_name).
MAIN_INSTANCE_NAME = "master"
# Our name in the instance_name columns of Synapse's tables (the stream
# writer of quarantined_media_changes, worker_locks' holders) when we are not
# a Synapse worker with a worker_name.
STANDALONE_INSTANCE_NAME = "mediarepo"

_HTTP_RESOURCE_NAMES = {
    "media",
    "client",
    "federation",
    "metrics",
    "keys",
    "consent",
    "openid",
    "replication",
    "health",
    "static",
    "webclient",
}


@attrs.frozen
class ListenerConfig:
    port: int
    bind_addresses: tuple[str, ...]
    type: str
    x_forwarded: bool
    resource_names: frozenset[str]
    tls: bool = False
    # Where in the config it was given ("worker_listeners[0]"), for errors.
    place: str = "listeners"

    def cannot_listen(self, address: str, error: BaseException) -> ConfigError:
        """The start-up error for failing to listen on ``address``."""
        where = f"[{address}]:{self.port}" if ":" in address else f"{address}:{self.port}"
        if getattr(error, "errno", None) == errno.EADDRINUSE:
            return ConfigError(self.place, f"{where} is already in use")
        reason = getattr(error, "strerror", None) or str(error)
        return ConfigError(self.place, f"cannot listen on {where}: {reason}")

    @property
    def serves_media(self) -> bool:
        # Synapse mounts the media repository on media, client and federation listeners.
        return bool(self.resource_names & {"media", "client", "federation"})


@attrs.frozen
class ProcessRole:
    """Which of Synapse's processes this one is, and the keys read for it."""

    # worker_app when this process is a Synapse worker; None for the main process.
    worker_app: str | None
    # Synapse's instance name: worker_name (or worker_app), else "master".
    instance_name: str
    listeners: tuple[ListenerConfig, ...]
    log_config: str | None
    pid_file: str | None


def parse_process_role(root: ConfigReader) -> ProcessRole:
    worker_app = _parse_worker_app(root)
    worker_name = root.string("worker_name")
    if worker_app is not None:
        # A Synapse worker listens on its worker_listeners only; the shared
        # listeners are the main process's.
        listener_key = "worker_listeners"
    else:
        listener_key = "listeners" if "listeners" in root.as_mapping() else "worker_listeners"
    listeners = [_parse_listener(entry) for entry in root.entries(listener_key)]
    log_config = root.string("worker_log_config" if worker_app is not None else "log_config")
    pid_file = root.string("worker_pid_file") if worker_app else None
    return ProcessRole(
        worker_app=worker_app,
        instance_name=worker_name or worker_app or MAIN_INSTANCE_NAME,
        listeners=tuple(listener for listener in listeners if listener is not None),
        log_config=os.path.abspath(log_config) if log_config else None,
        pid_file=os.path.abspath(pid_file) if pid_file else None,
    )


def _parse_worker_app(root: ConfigReader) -> str | None:
    worker_app = root.string("worker_app")
    if worker_app == "synapse.app.homeserver":
        return None  # Synapse's name for its main process
    if worker_app is not None and worker_app not in MEDIA_WORKER_APPS:
        raise ConfigError(
            "worker_app",
            f"{worker_app!r} is not a media worker; expected one of {MEDIA_WORKER_APPS}",
        )
    return worker_app


def _parse_listener(reader: ConfigReader) -> ListenerConfig | None:
    listener_type = reader.string("type", "http") or "http"
    if listener_type not in ("http", "metrics"):
        # manhole, replication and the like belong to Synapse.
        return None
    if reader.raw("path") is not None and reader.raw("port") is None:
        raise ConfigError(reader.key("path"), "unix socket listeners are not supported")
    port = reader.integer("port", -1, minimum=0)
    if not 0 <= port < 65536:
        raise ConfigError(reader.key("port"), "expected a port number")
    bind_addresses = _parse_bind_addresses(reader)
    names = _parse_resource_names(reader)
    if listener_type == "metrics":
        names.add("metrics")
    return ListenerConfig(
        port=port,
        bind_addresses=bind_addresses,
        type=listener_type,
        x_forwarded=reader.boolean("x_forwarded", False),
        resource_names=frozenset(names),
        tls=reader.boolean("tls", False),
        place=reader.key("").rstrip("."),
    )


def _parse_bind_addresses(reader: ConfigReader) -> tuple[str, ...]:
    bind = reader.raw("bind_addresses")
    if bind is None:
        single = reader.raw("bind_address")
        bind = [single] if single else ["::", "0.0.0.0"]
    if not isinstance(bind, list) or not all(isinstance(a, str) for a in bind):
        raise ConfigError(reader.key("bind_addresses"), "expected a list of addresses")
    return tuple(bind)


def _parse_resource_names(reader: ConfigReader) -> set[str]:
    names: set[str] = set()
    for resource in reader.entries("resources"):
        res_names = resource.raw("names", [])
        if not isinstance(res_names, list) or not all(isinstance(n, str) for n in res_names):
            raise ConfigError(resource.key("names"), "expected a list of resource names")
        unknown = set(res_names) - _HTTP_RESOURCE_NAMES
        if unknown:
            raise ConfigError(resource.key("names"), f"unknown resource {sorted(unknown)[0]!r}")
        names.update(res_names)
    return names

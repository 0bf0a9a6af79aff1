"""What the command-line entry points do (``__main__`` only parses arguments)."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import threading
from collections.abc import Iterator, Sequence
from typing import Any

from twisted.internet import defer

from mediarepo.config import Config, load_config
from mediarepo.errors import ConfigError, one_line

logger = logging.getLogger(__name__)

_CONFIG_TEMPLATE = """\
# mediarepo configuration, in Synapse's homeserver.yaml format.
# Every key mediarepo reads, with its default, is in homeserver.yaml.sample.

server_name: "{server_name}"

listeners:
  - port: {port}
    bind_addresses: ['127.0.0.1']
    type: http
    x_forwarded: false
    resources:
      - names: [client, federation, media, metrics]

database:
  name: sqlite3
  args:
    database: "{data_dir}/homeserver.db"

media_store_path: "{data_dir}/media_store"
signing_key_path: "{data_dir}/{server_name}.signing.key"

# Synapse's default is 50M; a standalone server is given room for video.
max_upload_size: 200M
max_image_pixels: 32M
enable_authenticated_media: true
enable_metrics: true
"""


def generate_config(config_path: str, server_name: str, data_dir: str, port: int) -> int:
    from mediarepo.federation.keys import write_new_signing_key
    from mediarepo.identifiers import is_valid_server_name

    if not is_valid_server_name(server_name):
        print(f"mediarepo: {server_name!r} is not a valid server name", file=sys.stderr)
        return 2
    data_dir = os.path.abspath(data_dir)
    os.makedirs(data_dir, exist_ok=True)
    if os.path.exists(config_path):
        print(f"{config_path} already exists; leaving it as it is")
    else:
        with open(config_path, "x", encoding="utf-8") as f:
            f.write(_CONFIG_TEMPLATE.format(server_name=server_name, data_dir=data_dir, port=port))
        print(f"wrote {config_path}")
    config = load_config(config_path)
    if not os.path.exists(config.signing_key_path):
        write_new_signing_key(config.signing_key_path)
        print(f"wrote signing key {config.signing_key_path}")
    return 0


def run(config_paths: Sequence[str], workers: int = 1) -> int:
    """Run the server until SIGTERM or SIGINT; returns the exit status.

    With ``workers`` above 1, this process only supervises that many
    worker processes sharing its listening sockets (see ``mediarepo.workers``).
    """
    from mediarepo.logging_setup import flush_logs, setup_logging
    from mediarepo.workers import Supervisor, is_supervised_worker

    config = load_config(config_paths)
    try:
        setup_logging(config.log_config, config.log_config_key)
    except ConfigError as e:
        raise config.locate(e) from e
    supervised = is_supervised_worker()
    if not supervised:
        warn_about_background_jobs(config)
    if workers > 1:
        try:
            with pid_file(config, config.pid_file):
                return Supervisor(config_paths, config, workers).run()
        except ConfigError as e:
            print(f"mediarepo: {config.locate(e)}", file=sys.stderr)
            return 1
        except OSError as e:
            print(f"mediarepo: {e}", file=sys.stderr)
            return 1

    from twisted.internet import reactor

    from mediarepo.app import media_server

    server = media_server(config, reactor)
    failure_line: list[str] = []

    def on_start_failure(failure: Any) -> None:
        if not server.running:
            return  # stopped while starting: not a failed start
        failure_line.append(report_start_failure(config, failure))
        reactor.stop()

    server.startService()
    server.started.wait().addErrback(on_start_failure)
    reactor.addSystemEventTrigger("before", "shutdown", _arm_exit_watchdog)
    reactor.addSystemEventTrigger("before", "shutdown", server.stopService)
    # A worker under a supervisor: the supervisor's pid is the service's.
    with pid_file(config, None if supervised else config.pid_file):
        reactor.run()
    if failure_line:
        # Last, after the lines of the stop, where an operator looks first.
        flush_logs()
        print(f"mediarepo: {failure_line[0]}", file=sys.stderr)
        return 1
    return 0


def report_start_failure(config: Config, failure: Any) -> str:
    """Log, in one line, why the server did not start, and return that line;
    the traceback only at debug level (the cause is ours to name, not the
    reader's to dig out)."""
    error = failure.value
    if isinstance(error, ConfigError):
        line = str(config.locate(error))
    else:
        line = "start-up failed: " + one_line(error)
    logger.debug("start-up failure", exc_info=failure.getTracebackObject())
    logger.error("%s", line)
    return line


def warn_about_background_jobs(config: Config) -> None:
    """Synapse's main process still loads the media repository (and so runs
    media background jobs on the same tables) unless the shared config says
    otherwise: say so once, at start."""
    if (
        config.worker_app is not None
        and config.enable_media_repo
        and config.media_instance_running_background_jobs is None
    ):
        logger.warning(
            "enable_media_repo is true in the shared config, so Synapse's main process "
            "also serves media and runs media background jobs on the same tables; set "
            "enable_media_repo: false for it, or media_instance_running_background_jobs: "
            "%s to name the instance that runs them",
            config.instance_name,
        )


@contextlib.contextmanager
def pid_file(config: Config, path: str | None) -> Iterator[None]:
    """Write this process's pid to ``path`` (``worker_pid_file``) while it runs."""
    if path is None:
        yield
        return
    try:
        with open(path, "w", encoding="ascii") as f:
            f.write(f"{os.getpid()}\n")
    except OSError as e:
        raise config.locate(
            ConfigError("worker_pid_file", f"cannot write {path}: {e.strerror}")
        ) from e
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)


# Once shutdown begins, the process ends within this time even if a thread
# never returns (a statement on a connection that hangs): the server's stop
# takes at most its grace period and a few seconds, and the supervisor of
# --workers kills a worker only later (mediarepo.workers).
EXIT_DEADLINE_SECONDS = 25.0


def _arm_exit_watchdog() -> None:
    def exit_now() -> None:
        # Not through logging: its handlers' locks may be held by the stuck thread.
        os.write(2, b"mediarepo: shutdown did not finish in time; exiting\n")
        os._exit(1)

    watchdog = threading.Timer(EXIT_DEADLINE_SECONDS, exit_now)
    # A daemon thread: it does not itself keep the process alive.
    watchdog.daemon = True
    watchdog.start()


_USER_ID = re.compile(r"\A@([a-z0-9._=\-/+]+):(.+)\Z")


def register_user(config_path: str | Sequence[str], user_id: str, admin: bool) -> int:
    from twisted.internet import task

    config = load_config(config_path)
    match = _USER_ID.match(user_id)
    if match is None:
        print(f"mediarepo: {user_id!r} is not a user ID such as @alice:{config.server_name}",
              file=sys.stderr)  # fmt: skip
        return 2
    if match.group(2) != config.server_name:
        print(f"mediarepo: {user_id} is not on this server ({config.server_name})", file=sys.stderr)
        return 2
    localpart = match.group(1)
    # react() runs the registration and exits the process: 0 on success.
    task.react(
        lambda reactor: defer.ensureDeferred(_register(reactor, config, user_id, localpart, admin))
    )
    return 0


async def _register(
    reactor: Any, config: Config, user_id: str, localpart: str, admin: bool
) -> None:
    import time

    from mediarepo.accounts import new_access_token
    from mediarepo.storage.database import Database
    from mediarepo.storage.schema import prepare_database
    from mediarepo.storage.user_rows import UserRows

    database = Database(config.database, reactor)
    try:
        await prepare_database(database)
        token = new_access_token(localpart)
        created = await UserRows(database).register_user(
            user_id, token, admin, int(time.time() * 1000)
        )
    finally:
        database.close()
    print(f"{'created user' if created else 'new access token for'} {user_id}"
          f"{' (admin)' if admin else ''}")  # fmt: skip
    print(token)

"""The twistd plugin: ``twistd -n mediarepo -c homeserver.yaml [-c workers/media.yaml]``."""

from __future__ import annotations

import atexit
import logging
import os
import sys
from typing import Any

from twisted.application.service import IServiceMaker, MultiService
from twisted.plugin import IPlugin
from twisted.python import usage
from zope.interface import implementer


class Options(usage.Options):
    synopsis = "-c homeserver.yaml [-c workers/media.yaml ...]"

    def __init__(self) -> None:
        super().__init__()
        self["config-paths"] = []

    def opt_config_path(self, path: str) -> None:
        """A config file, or a directory of *.yaml files; repeat to merge several in order."""
        self["config-paths"].append(path)

    opt_c = opt_config_path

    def postOptions(self) -> None:
        from mediarepo.config import load_config
        from mediarepo.errors import ConfigError

        if not self["config-paths"]:
            raise usage.UsageError("--config-path (-c) is required")
        try:
            self["config"] = load_config(self["config-paths"])
        except ConfigError as e:
            raise usage.UsageError(str(e)) from e


def _exit_failed(line: str) -> None:
    # twistd has no way to set its exit status: once it has cleaned up
    # (pid file removed) and Python is exiting, leave with status 1 so that a
    # failed start is not read as success by systemd or a supervisor.
    logging.shutdown()
    print(f"mediarepo: {line}", file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1)


class MediaRepoService(MultiService):
    """Sets up logging, then runs the server ``mediarepo.app.media_server``
    builds (the one every launcher runs) as its only child."""

    def __init__(self, config: Any) -> None:
        super().__init__()
        self._config = config

    def startService(self) -> None:
        from twisted.internet import reactor

        from mediarepo.app import media_server
        from mediarepo.cli import report_start_failure, warn_about_background_jobs
        from mediarepo.logging_setup import log_to_twisted, setup_logging

        config = self._config
        if config.log_config:
            setup_logging(config.log_config, config.log_config_key)
        else:
            log_to_twisted()
        warn_about_background_jobs(config)
        server = media_server(config, reactor)
        server.setServiceParent(self)

        def failed(failure: Any) -> None:
            if not server.running:
                return  # stopped while starting: not a failed start
            line = report_start_failure(config, failure)
            atexit.register(_exit_failed, line)
            reactor.stop()

        server.started.wait().addErrback(failed)
        super().startService()


@implementer(IServiceMaker, IPlugin)
class MediaRepoServiceMaker:
    tapname = "mediarepo"
    description = "A Synapse-compatible Matrix media repository server."
    options = Options

    def makeService(self, options: Options) -> MediaRepoService:
        return MediaRepoService(options["config"])


service_maker = MediaRepoServiceMaker()

"""The twistd plugin: ``twistd -n mediarepo -c homeserver.yaml``."""

from __future__ import annotations

from typing import Any

from twisted.application.service import IServiceMaker, Service
from twisted.plugin import IPlugin
from twisted.python import usage
from zope.interface import implementer


class Options(usage.Options):
    optParameters = [["config-path", "c", None, "homeserver.yaml to read"]]

    def postOptions(self) -> None:
        from mediarepo.config import load_config
        from mediarepo.errors import ConfigError

        if not self["config-path"]:
            raise usage.UsageError("--config-path (-c) is required")
        try:
            self["config"] = load_config(self["config-path"])
        except ConfigError as e:
            raise usage.UsageError(str(e)) from e


class MediaRepoService(Service):
    def __init__(self, config: Any) -> None:
        self._config = config
        self._server: Any = None

    def startService(self) -> None:
        from twisted.internet import reactor

        from mediarepo.app import MediaServer
        from mediarepo.logging_setup import log_to_twisted, setup_logging

        super().startService()
        config = self._config
        if config.log_config:
            setup_logging(config.log_config)
        else:
            log_to_twisted()
        self._server = MediaServer(config, reactor)

        def failed(failure: Any) -> None:
            from twisted.logger import Logger

            Logger().failure("mediarepo could not start", failure)
            reactor.stop()

        self._server.start_deferred().addErrback(failed)

    def stopService(self) -> Any:
        super().stopService()
        if self._server is not None:
            return self._server.stop_deferred()
        return None


@implementer(IServiceMaker, IPlugin)
class MediaRepoServiceMaker:
    tapname = "mediarepo"
    description = "A Synapse-compatible Matrix media repository server."
    options = Options

    def makeService(self, options: Options) -> MediaRepoService:
        return MediaRepoService(options["config"])


service_maker = MediaRepoServiceMaker()

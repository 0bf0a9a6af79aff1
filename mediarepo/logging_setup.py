"""Logging: Synapse's ``log_config`` YAML if given, stderr otherwise.

Synapse's log configs name Synapse classes (a context filter, a buffering
handler, JSON formatters). They are swapped for equivalents here so an
operator's file works unchanged. Twisted's own log events go to the same
handlers.
"""

from __future__ import annotations

import json
import logging
import logging.config
import logging.handlers
import sys
import threading
from collections.abc import Mapping
from typing import Any

import yaml
from twisted.logger import Logger, LogLevel, STDLibLogObserver, globalLogBeginner

from mediarepo.errors import ConfigError

DEFAULT_FORMAT = "%(asctime)s - %(name)s - %(lineno)d - %(levelname)s - %(request)s - %(message)s"


class RequestContextFilter(logging.Filter):
    """Stands in for Synapse's ``LoggingContextFilter``: gives every record the
    attributes Synapse's format strings use."""

    def __init__(self, **defaults: Any) -> None:
        super().__init__()
        self._defaults = defaults

    def filter(self, record: logging.LogRecord) -> bool:
        for name, value in self._defaults.items():
            if not hasattr(record, name):
                setattr(record, name, value)
        return True


class PeriodicallyFlushingMemoryHandler(logging.handlers.MemoryHandler):
    """Buffers records like ``MemoryHandler`` and flushes them at least every
    ``period`` seconds (Synapse's handler of that name), so that a busy server
    writes its log in batches, not a system call a line, and a quiet one's
    last lines still appear promptly."""

    def __init__(self, capacity: int, flushLevel: int = logging.ERROR, target: Any = None,
                 flushOnClose: bool = True, period: float = 5.0) -> None:  # fmt: skip
        super().__init__(capacity, flushLevel, target, flushOnClose)
        self._period = period
        self._stopped = threading.Event()
        # A thread of its own: flushing must not wait for the reactor, which
        # may be the very thing that is stuck.
        self._flusher = threading.Thread(
            target=self._flush_periodically, name="log-flusher", daemon=True
        )
        self._flusher.start()

    def _flush_periodically(self) -> None:
        while not self._stopped.wait(self._period):
            self.flush()

    def close(self) -> None:
        self._stopped.set()
        super().close()


_SYNAPSE_CLASSES = {
    "synapse.logging.context.LoggingContextFilter": f"{__name__}.RequestContextFilter",
    "synapse.logging.handlers.PeriodicallyFlushingMemoryHandler": (
        f"{__name__}.PeriodicallyFlushingMemoryHandler"
    ),
    "synapse.logging.TerseJsonFormatter": f"{__name__}.JsonFormatter",
    "synapse.logging.JsonFormatter": f"{__name__}.JsonFormatter",
    "synapse.logging._terse_json.TerseJsonFormatter": f"{__name__}.JsonFormatter",
    "synapse.logging._terse_json.JsonFormatter": f"{__name__}.JsonFormatter",
}

# What every record has; anything else on a record was given as ``extra``.
_PLAIN_RECORD_ATTRIBUTES = frozenset(vars(logging.makeLogRecord({}))) | {
    "message",
    "asctime",
    "request",
}


class JsonFormatter(logging.Formatter):
    """Stands in for Synapse's JSON formatters: one JSON object per record,
    with ``log``, ``namespace``, ``level`` and ``time`` as Synapse writes
    them, plus the record's extra attributes (an event and its fields)."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "log": record.getMessage(),
            "namespace": record.name,
            "level": record.levelname,
            "time": round(record.created, 2),
        }
        for name, value in vars(record).items():
            if name in _PLAIN_RECORD_ATTRIBUTES or name.startswith("_"):
                continue
            plain = value is None or isinstance(value, str | int | float | bool)
            entry[name] = value if plain else str(value)
        if record.exc_info:
            entry["exc_info"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def _replace_synapse_classes(node: Any) -> Any:
    if isinstance(node, Mapping):
        result = {}
        for key, value in node.items():
            if key in ("class", "()") and isinstance(value, str) and value.startswith("synapse."):
                value = _SYNAPSE_CLASSES.get(value, "logging.Formatter")
            result[key] = _replace_synapse_classes(value)
        return result
    if isinstance(node, list):
        return [_replace_synapse_classes(item) for item in node]
    return node


def _add_request_default() -> None:
    factory = logging.getLogRecordFactory()

    def record_factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = factory(*args, **kwargs)
        record.request = "-"
        return record

    logging.setLogRecordFactory(record_factory)


class TwistedLogHandler(logging.Handler):
    """Hands standard-library records to Twisted's logging, so that under
    ``twistd`` they go wherever twistd sends its log."""

    def __init__(self) -> None:
        super().__init__()
        self._logger = Logger(namespace="mediarepo")

    def emit(self, record: logging.LogRecord) -> None:
        self._logger.emit(
            _TWISTED_LEVELS.get(record.levelno, LogLevel.info),
            "{name} - {message}",
            name=record.name,
            message=self.format(record),
        )


_TWISTED_LEVELS = {
    logging.DEBUG: LogLevel.debug,
    logging.INFO: LogLevel.info,
    logging.WARNING: LogLevel.warn,
    logging.ERROR: LogLevel.error,
    logging.CRITICAL: LogLevel.critical,
}


def log_to_twisted() -> None:
    """Under ``twistd`` without a ``log_config``: records at INFO and above
    go to twistd's log."""
    _add_request_default()
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    root.addHandler(TwistedLogHandler())


def flush_logs() -> None:
    """Write out records still held in buffers."""
    for handler in logging.getLogger().handlers:
        handler.flush()


def setup_logging(log_config_path: str | None, key: str = "log_config") -> None:
    """Log as the Synapse-format logging config at ``log_config_path`` says
    (``key`` names where it was given), or INFO and above to stderr."""
    _add_request_default()
    if log_config_path:
        try:
            with open(log_config_path, encoding="utf-8") as f:
                data = yaml.safe_load(f)
            logging.config.dictConfig(_replace_synapse_classes(data))
        except (OSError, yaml.YAMLError, ValueError, TypeError, AttributeError) as e:
            raise ConfigError(key, f"cannot use {log_config_path}: {e}") from e
    else:
        to_stderr = logging.StreamHandler(sys.stderr)
        to_stderr.setFormatter(logging.Formatter(DEFAULT_FORMAT))
        buffered = PeriodicallyFlushingMemoryHandler(
            capacity=512, flushLevel=logging.WARNING, target=to_stderr, period=0.5
        )
        logging.basicConfig(level=logging.INFO, handlers=[buffered])
    globalLogBeginner.beginLoggingTo([STDLibLogObserver()], redirectStandardIO=False)

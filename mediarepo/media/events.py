"""Media lifecycle events.

Each event is a structured log record on the ``mediarepo.events`` logger (the
event name and its fields are attributes of the record, written as keys by
the JSON log formatters) and a count in ``mediarepo_media_events_total``.
"""

from __future__ import annotations

import enum
import logging

from prometheus_client import Counter


class MediaEvent(enum.Enum):
    UPLOADED = "media.uploaded"
    DEDUPLICATED = "media.deduplicated"
    RETRIEVED = "media.retrieved"
    REMOTE_CACHED = "media.remote_cached"
    THUMBNAIL_GENERATED = "media.thumbnail_generated"
    PURGED = "media.purged"
    URL_PREVIEWED = "media.url_previewed"


media_events = Counter("mediarepo_media_events_total", "Media lifecycle events", ["event"])
for _event in MediaEvent:
    media_events.labels(_event.value)

logger = logging.getLogger("mediarepo.events")

# Every read would be a line at INFO; retrievals are logged at DEBUG.
_LEVELS = {MediaEvent.RETRIEVED: logging.DEBUG}
# Attributes every LogRecord has, which fields must not overwrite.
_RECORD_ATTRIBUTES = frozenset(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


def emit(event: MediaEvent, *, media_id: str, **fields: str | int | bool | None) -> None:
    """Log and count ``event``; every event names its media as ``media_id``
    (with ``origin`` for another server's)."""
    fields = {"media_id": media_id, **fields}
    media_events.labels(event.value).inc()
    level = _LEVELS.get(event, logging.INFO)
    if not logger.isEnabledFor(level):
        return
    clashing = _RECORD_ATTRIBUTES.intersection(fields)
    if clashing:
        raise ValueError(f"event fields {sorted(clashing)} would overwrite log record attributes")
    text = " ".join(f"{name}={value}" for name, value in fields.items())
    logger.log(level, "%s %s", event.value, text, extra={"event": event.value, **fields})

"""Media lifecycle events: structured log records and Prometheus counts."""

from __future__ import annotations

import json
import logging
from typing import Any

from mediarepo.logging_setup import JsonFormatter
from mediarepo.media.events import MediaEvent, media_events
from tests import images
from tests.utils import SERVER_NAME, LogRecords, ServerTestCase


def _count(event: MediaEvent) -> float:
    value: float = media_events.labels(event.value)._value.get()
    return value


class EventTests(ServerTestCase):
    extra_config = {"dynamic_thumbnails": True}

    async def set_up(self) -> None:
        await super().set_up()
        self.captured = LogRecords()
        events_logger = logging.getLogger("mediarepo.events")
        previous = events_logger.level
        events_logger.setLevel(logging.DEBUG)
        events_logger.addHandler(self.captured)
        self.addCleanup(events_logger.removeHandler, self.captured)
        self.addCleanup(events_logger.setLevel, previous)

    def events(self, event: MediaEvent) -> list[dict[str, Any]]:
        formatter = JsonFormatter()
        return [
            json.loads(formatter.format(r))
            for r in self.captured.records
            if getattr(r, "event", None) == event.value
        ]

    async def test_lifecycle_events(self) -> None:
        before = {event: _count(event) for event in MediaEvent}
        user = await self.register("alice")
        admin = await self.register("root", admin=True)
        photo = images.png(80, 60)
        first = await self.upload(user, photo, "image/png")
        second = await self.upload(user, photo, "image/png")
        r = await self.request("GET", f"/_matrix/client/v1/media/download/{SERVER_NAME}/{first}",
                               token=user)  # fmt: skip
        self.assertEqual(r.code, 200)
        r = await self.request(
            "GET",
            f"/_matrix/client/v1/media/thumbnail/{SERVER_NAME}/{first}?width=20&height=20",
            token=user,
        )
        self.assertEqual(r.code, 200)
        r = await self.request("DELETE", f"/_synapse/admin/v1/media/{SERVER_NAME}/{second}",
                               token=admin)  # fmt: skip
        self.assertEqual(r.code, 200)

        uploaded = self.events(MediaEvent.UPLOADED)
        self.assertEqual([e["media_id"] for e in uploaded], [first, second])
        self.assertEqual(uploaded[0]["length"], len(photo))
        self.assertEqual(uploaded[0]["user_id"], f"@alice:{SERVER_NAME}")
        self.assertEqual(uploaded[0]["namespace"], "mediarepo.events")
        self.assertEqual([e["media_id"] for e in self.events(MediaEvent.DEDUPLICATED)], [second])
        retrieved = self.events(MediaEvent.RETRIEVED)
        self.assertEqual([(e["media_id"], e["level"]) for e in retrieved], [(first, "DEBUG")])
        (thumbnail,) = self.events(MediaEvent.THUMBNAIL_GENERATED)
        self.assertEqual(
            (thumbnail["media_id"], thumbnail["origin"], thumbnail["reason"]),
            (first, None, "dynamic"),
        )
        # Every event names its media the same way.
        for event in MediaEvent:
            for fields in self.events(event):
                self.assertIsInstance(fields["media_id"], str, fields)
                self.assertNotIn("media", fields)
        (purged,) = self.events(MediaEvent.PURGED)
        self.assertEqual((purged["media_id"], purged["reason"]), (second, "admin request"))
        counted = {event: _count(event) - before[event] for event in MediaEvent}
        self.assertEqual(
            counted,
            {
                MediaEvent.UPLOADED: 2,
                MediaEvent.DEDUPLICATED: 1,
                MediaEvent.RETRIEVED: 1,
                MediaEvent.REMOTE_CACHED: 0,
                MediaEvent.THUMBNAIL_GENERATED: 1,
                MediaEvent.PURGED: 1,
                MediaEvent.URL_PREVIEWED: 0,
            },
        )
        # The counter is exported.
        r = await self.request("GET", "/_synapse/metrics")
        self.assertIn(b'mediarepo_media_events_total{event="media.uploaded"}', r.body)


class EventPostgresTests(EventTests):
    engine = "psycopg2"

"""Backoff from failing servers in Synapse's ``destinations`` table: the
arithmetic, the rows it leaves (Synapse's units: ms), and the client that
refuses to contact a backed-off server. Time is a fake clock; the
database is real, on both engines."""

from __future__ import annotations

import random
from typing import Any

from signedjson.key import generate_signing_key
from twisted.internet import defer, reactor
from twisted.internet.task import Clock
from twisted.trial import unittest
from twisted.web.http_headers import Headers

from mediarepo.config import parse_config
from mediarepo.errors import ConfigError
from mediarepo.federation.backoff import BackoffPolicy, DestinationBackoff
from mediarepo.federation.client import (
    FederationClient,
    FederationRequestError,
    NotRetryingDestination,
)
from mediarepo.outbound import OutboundRequestError
from mediarepo.storage.destination_rows import DestinationRows
from mediarepo.storage.schema import prepare_database
from tests.utils import DatabaseTestCase

MINUTE_MS = 60 * 1000
DAY_MS = 24 * 60 * MINUTE_MS
# Synapse's defaults.
POLICY = BackoffPolicy(10 * MINUTE_MS, 2.0, 7 * DAY_MS)


class _FixedJitter(random.Random):
    def __init__(self, factor: float) -> None:
        super().__init__()
        self.factor = factor

    def uniform(self, a: float, b: float) -> float:
        assert (a, b) == (0.8, 1.4)
        return self.factor


class PolicyTests(unittest.TestCase):
    def test_first_failure_waits_the_minimum(self) -> None:
        self.assertEqual(POLICY.next_interval(0, random.Random()), 10 * MINUTE_MS)

    def test_each_failure_multiplies_with_jitter(self) -> None:
        self.assertEqual(POLICY.next_interval(10 * MINUTE_MS, _FixedJitter(0.8)), 16 * MINUTE_MS)
        self.assertEqual(POLICY.next_interval(10 * MINUTE_MS, _FixedJitter(1.4)), 28 * MINUTE_MS)
        rng = random.Random(7)
        for _ in range(200):
            interval = POLICY.next_interval(10 * MINUTE_MS, rng)
            self.assertTrue(16 * MINUTE_MS <= interval <= 28 * MINUTE_MS, interval)

    def test_capped_at_the_maximum(self) -> None:
        self.assertEqual(POLICY.next_interval(5 * DAY_MS, _FixedJitter(1.0)), 7 * DAY_MS)
        self.assertEqual(POLICY.next_interval(7 * DAY_MS, _FixedJitter(0.8)), 7 * DAY_MS)
        # From the minimum, the cap is reached after about 10 failures.
        interval, failures = 0, 0
        while interval < 7 * DAY_MS:
            interval = POLICY.next_interval(interval, _FixedJitter(1.0))
            failures += 1
        self.assertEqual(failures, 11)

    def test_config_keys(self) -> None:
        config = parse_config(
            {
                "server_name": "a.test",
                "federation": {
                    "destination_min_retry_interval": "30s",
                    "destination_retry_multiplier": 3,
                    "destination_max_retry_interval": "1h",
                },
                "federation_idle_timeout": "5s",
            },
            "/tmp",
        )
        self.assertEqual(
            BackoffPolicy.from_config(config.federation),
            BackoffPolicy(30_000, 3.0, 3_600_000),
        )
        self.assertEqual(config.federation.idle_timeout_ms, 5000)
        defaults = parse_config({"server_name": "a.test"}, "/tmp").federation
        self.assertEqual(BackoffPolicy.from_config(defaults), POLICY)
        self.assertEqual(defaults.idle_timeout_ms, 20_000)
        for bad in (
            {"federation": {"destination_retry_multiplier": 0.5}},
            {"federation": {"destination_retry_multiplier": "x"}},
            {"federation": {"destination_min_retry_interval": 0}},
            {"federation": {"destination_max_retry_interval": "1m"}},
            {"federation_idle_timeout": 0},
            {"federation_idle_timeout": "soon"},
        ):
            with self.assertRaises(ConfigError):
                parse_config({"server_name": "a.test", **bad}, "/tmp")


class DestinationBackoffTests(DatabaseTestCase):
    async def set_up(self) -> None:
        await super().set_up()
        await prepare_database(self.database)
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.backoff = DestinationBackoff(
            DestinationRows(self.database), POLICY, self.clock, _FixedJitter(1.0)
        )

    async def row(self, destination: str = "down.test") -> Any:
        rows = await self.database.run_query(
            "t",
            "SELECT failure_ts, retry_last_ts, retry_interval FROM destinations"
            " WHERE destination = ?",
            (destination,),
        )
        return rows[0] if rows else None

    def now_ms(self) -> int:
        return int(self.clock.seconds() * 1000)

    async def retry_at(self, destination: str = "down.test", **kwargs: Any) -> int | None:
        return (await self.backoff.attempt(destination, **kwargs)).retry_at_ms()

    async def test_failures_back_off_and_success_resets(self) -> None:
        self.assertIsNone(await self.retry_at())
        first = self.now_ms()
        await (await self.backoff.attempt("down.test")).failed("refused")
        self.assertEqual(await self.row(), (first, first, 10 * MINUTE_MS))
        self.assertEqual(await self.retry_at(), first + 10 * MINUTE_MS)
        # Still backed off a millisecond before the interval ends.
        self.clock.advance(10 * 60 - 0.001)
        retry_at = await self.retry_at()
        assert retry_at is not None
        self.assertGreater(retry_at, self.now_ms())
        self.clock.advance(0.001)
        retry_at = await self.retry_at()
        assert retry_at is not None
        self.assertLessEqual(retry_at, self.now_ms())
        # Tried again and failing again: twice as long, the first failure kept.
        second = self.now_ms()
        await (await self.backoff.attempt("down.test")).failed("refused")
        self.assertEqual(await self.row(), (first, second, 20 * MINUTE_MS))
        self.clock.advance(20 * 60)
        await (await self.backoff.attempt("down.test")).answered(200)
        # Synapse's way of saying "up": zeros and no failure time.
        self.assertEqual(await self.row(), (None, 0, 0))
        self.assertIsNone(await self.retry_at())

    async def test_which_answers_count(self) -> None:
        for code, backs_off in [(404, False), (403, False), (400, False), (500, True),
                                (502, True), (401, True), (429, True)]:  # fmt: skip
            destination = f"s{code}.test"
            await (await self.backoff.attempt(destination)).answered(code)
            self.assertEqual(
                await self.retry_at(destination) is not None, backs_off, f"HTTP {code}"
            )
        # A 404 from a server being backed off does not end its backoff.
        await self.database.run_query(
            "t", "UPDATE destinations SET retry_last_ts = 1 WHERE destination = 's500.test'"
        )
        await (await self.backoff.attempt("s500.test")).answered(404)
        self.assertEqual((await self.row("s500.test"))[1], 1)

    async def test_ignoring_the_backoff(self) -> None:
        await (await self.backoff.attempt("down.test")).failed("refused")
        self.assertIsNone(await self.retry_at(ignore_backoff=True))
        # A failure then does not lengthen it...
        before = await self.row()
        self.clock.advance(1)
        await (await self.backoff.attempt("down.test", ignore_backoff=True)).failed("refused")
        self.assertEqual(await self.row(), before)
        # ...but a success ends it.
        await (await self.backoff.attempt("down.test", ignore_backoff=True)).succeeded()
        self.assertEqual(await self.row(), (None, 0, 0))

    async def test_a_longer_backoff_written_elsewhere_stands(self) -> None:
        # Synapse (another process) backed the server off for a day.
        await self.database.run_query(
            "t",
            "INSERT INTO destinations (destination, failure_ts, retry_last_ts, retry_interval)"
            " VALUES ('down.test', 1, ?, ?)",
            (self.now_ms(), DAY_MS),
        )
        self.assertEqual(await self.retry_at(), self.now_ms() + DAY_MS)
        # We read no backoff before it was written, then failed.
        attempt = await self.backoff.attempt("other.test")
        attempt.destination = "down.test"
        await attempt.failed("refused")
        self.assertEqual((await self.row())[2], DAY_MS)

    async def test_cap_keeps_renewing(self) -> None:
        await self.database.run_query(
            "t",
            "INSERT INTO destinations (destination, failure_ts, retry_last_ts, retry_interval)"
            " VALUES ('down.test', 1, ?, ?)",
            (self.now_ms(), 7 * DAY_MS),
        )
        self.clock.advance(7 * 24 * 3600)
        await (await self.backoff.attempt("down.test")).failed("refused")
        # Still the cap, counted from this failure.
        self.assertEqual(await self.row(), (1, self.now_ms(), 7 * DAY_MS))

    async def test_clear_on_contact(self) -> None:
        await self.backoff.clear("never.test")
        self.assertIsNone(await self.row("never.test"))
        await (await self.backoff.attempt("down.test")).failed("refused")
        await self.backoff.clear("down.test")
        self.assertEqual(await self.row(), (None, 0, 0))
        self.assertIsNone(await self.retry_at())

    async def test_rows_without_a_retry_time_are_not_backoffs(self) -> None:
        # Synapse writes rows for servers it sends events to, without timings.
        await self.database.run_query(
            "t",
            "INSERT INTO destinations (destination, last_successful_stream_ordering)"
            " VALUES ('up.test', 5)",
        )
        self.assertIsNone(await self.retry_at("up.test"))
        await (await self.backoff.attempt("up.test")).failed("refused")
        rows = await self.database.run_query(
            "t",
            "SELECT retry_interval, last_successful_stream_ordering FROM destinations"
            " WHERE destination = 'up.test'",
        )
        self.assertEqual(rows, [(10 * MINUTE_MS, 5)])


class DestinationBackoffPostgresTests(DestinationBackoffTests):
    engine = "psycopg2"


class ClientBackoffTests(DatabaseTestCase):
    """The client does not contact a backed-off server at all."""

    async def set_up(self) -> None:
        await super().set_up()
        await prepare_database(self.database)
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        config = parse_config(
            {"server_name": "us.test", "ip_range_whitelist": ["127.0.0.0/8"]}, "/tmp"
        )
        self.client = FederationClient(
            reactor,
            "us.test",
            generate_signing_key("a"),
            config.federation,
            backoff=DestinationBackoff(
                DestinationRows(self.database), POLICY, self.clock, _FixedJitter(1.0)
            ),
        )
        self.addCleanup(lambda: defer.ensureDeferred(self.client.close()))
        self.sent: list[str] = []
        self.answer: Any = OutboundRequestError("down")

        async def send(method: bytes, url: str, **kwargs: Any) -> Any:
            self.sent.append(url)
            if isinstance(self.answer, Exception):
                raise self.answer
            return self.answer

        self.patch(self.client.outbound, "request", send)

    async def test_backed_off_server_is_not_contacted(self) -> None:
        with self.assertRaises(FederationRequestError):
            await self.client.get("127.0.0.1:1", "/x")
        self.assertEqual(len(self.sent), 1)
        for _ in range(5):
            with self.assertRaises(NotRetryingDestination) as caught:
                await self.client.get("127.0.0.1:1", "/x")
        self.assertEqual(caught.exception.retry_at_ms, self.clock.seconds() * 1000 + 10 * MINUTE_MS)
        self.assertEqual(len(self.sent), 1)
        # Key fetches ask anyway.
        with self.assertRaises(FederationRequestError):
            await self.client.get("127.0.0.1:1", "/keys", ignore_backoff=True)
        self.assertEqual(len(self.sent), 2)
        # Once the interval has passed, it is tried again.
        self.clock.advance(10 * 60)
        self.answer = _Answer(200)
        response = await self.client.get("127.0.0.1:1", "/x")
        self.assertEqual(response.code, 200)
        self.assertEqual(len(self.sent), 3)
        rows = await self.database.run_query("t", "SELECT retry_interval FROM destinations")
        self.assertEqual(rows, [(0,)])

    async def test_server_errors_back_off(self) -> None:
        self.answer = _Answer(503)
        response = await self.client.get("127.0.0.1:1", "/x")
        self.assertEqual(response.code, 503)
        with self.assertRaises(NotRetryingDestination):
            await self.client.get("127.0.0.1:1", "/x")
        self.assertEqual(len(self.sent), 1)


class ClientBackoffPostgresTests(ClientBackoffTests):
    engine = "psycopg2"


class _Answer:
    def __init__(self, code: int) -> None:
        self.code = code
        self.headers = Headers()

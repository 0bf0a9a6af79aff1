"""The service tree's start and stop rules, on a test clock: children start
in order and stop one at a time in reverse; a child that fails or hangs does
not keep the others from stopping; every wait is bounded."""

from __future__ import annotations

from twisted.internet import defer, task
from twisted.python.failure import Failure
from twisted.trial import unittest

from mediarepo import services
from mediarepo.services import OrderedServices, Outcome, StepService


class OrderedServicesTests(unittest.TestCase):
    def setUp(self) -> None:
        self.clock = task.Clock()
        self.events: list[str] = []
        self.parent = OrderedServices(self.clock, stop_budget_seconds=10.0)

    def child(self, name: str, stop: object = None, stop_seconds: float | None = None) -> None:
        def started() -> None:
            self.events.append(f"start {name}")

        def stopped() -> object:
            self.events.append(f"stop {name}")
            return stop() if callable(stop) else None

        self.parent.add(StepService(name, start=started, stop=stopped, stop_seconds=stop_seconds))

    def test_started_in_order_and_stopped_in_reverse(self) -> None:
        self.child("pools")
        self.parent.startService()
        self.child("database")
        self.child("ports")
        stopped = self.parent.stopService()
        self.assertTrue(stopped.called)
        self.assertEqual(
            self.events,
            ["start pools", "start database", "start ports",
             "stop ports", "stop database", "stop pools"],
        )  # fmt: skip
        self.assertEqual([s.name for s in self.parent if s.running], [])

    def test_a_waited_stop_holds_the_next_until_it_ends(self) -> None:
        settled: defer.Deferred[None] = defer.Deferred()
        self.child("database")
        self.child("uploads", stop=lambda: settled)
        self.parent.startService()
        stopped = self.parent.stopService()
        self.assertEqual(self.events[-1], "stop uploads")
        self.clock.advance(1)
        self.assertFalse(stopped.called)
        settled.callback(None)
        self.assertEqual(self.events[-1], "stop database")
        self.assertTrue(stopped.called)

    def test_failing_and_hanging_children_do_not_stop_the_rest(self) -> None:
        def fails() -> None:
            raise RuntimeError("cannot stop")

        self.child("pools")
        self.child("thumbnails", stop=defer.Deferred)
        self.child("federation client", stop=fails)
        self.child("uploads", stop=defer.Deferred, stop_seconds=3.0)
        self.parent.startService()
        with self.assertLogs("mediarepo.services", "WARNING") as logs:
            stopped = self.parent.stopService()
            # The uploads' own limit, then a step's time for the thumbnails.
            self.clock.advance(3.0)
            self.assertEqual(self.events[-1], "stop thumbnails")
            self.clock.advance(services.STOP_STEP_SECONDS - 0.5)
            self.assertFalse(stopped.called)
            self.clock.advance(0.5)
        self.assertTrue(stopped.called)
        self.assertEqual(self.events[-1], "stop pools")
        text = "\n".join(logs.output)
        self.assertIn("stopping: uploads did not finish within 3.0s", text)
        self.assertIn("stopping: federation client failed", text)
        self.assertIn("stopping: thumbnails did not finish within 5.0s", text)

    def test_the_whole_stop_is_bounded(self) -> None:
        """After the uploads took their time, the rest share what is left of
        the budget and a step, each given at least a tenth of a second."""
        for name in ("first", "second", "third"):
            self.child(name, stop=defer.Deferred)
        self.child("uploads", stop=defer.Deferred, stop_seconds=14.0)
        self.parent.startService()
        stopped = self.parent.stopService()
        self.clock.advance(14.0)  # budget 10 + step 5 = 15: one second left
        self.clock.advance(1.0)
        self.clock.advance(0.1)
        self.clock.advance(0.1)
        self.assertTrue(stopped.called)

    def test_a_second_stop_waits_for_the_first(self) -> None:
        settled: defer.Deferred[None] = defer.Deferred()
        self.child("uploads", stop=lambda: settled)
        self.parent.startService()
        first = self.parent.stopService()
        second = self.parent.stopService()
        self.assertEqual(self.events.count("stop uploads"), 1)
        self.assertFalse(second.called)
        settled.callback(None)
        self.assertTrue(first.called and second.called)


class OutcomeTests(unittest.TestCase):
    def test_waiters_before_and_after_the_end(self) -> None:
        outcome = Outcome()
        early = outcome.wait()
        outcome.end(None)
        self.assertIsNone(self.successResultOf(early))
        self.assertIsNone(self.successResultOf(outcome.wait()))

    def test_a_failure_reaches_every_waiter(self) -> None:
        outcome = Outcome()
        early = outcome.wait()
        outcome.end(Failure(ValueError("no")))
        self.failureResultOf(early, ValueError)
        self.failureResultOf(outcome.wait(), ValueError)

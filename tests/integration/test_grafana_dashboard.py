"""The Grafana dashboard in contrib/ asks only for metrics the server exports."""

from __future__ import annotations

import json
import os
import re

from tests.utils import ServerTestCase

DASHBOARD = os.path.join(
    os.path.dirname(__file__), os.pardir, os.pardir, "contrib", "grafana", "mediarepo.json"
)
# Series a histogram or counter family exposes beside its own name.
_SUFFIXES = ("_bucket", "_sum", "_count", "_total", "_created")


def dashboard_metrics() -> set[str]:
    with open(DASHBOARD, encoding="utf-8") as f:
        dashboard = json.load(f)
    names = set()
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            names.update(re.findall(r"\b(mediarepo_[a-z_]+)\{", target["expr"]))
    return names


class GrafanaDashboardTests(ServerTestCase):
    async def test_every_queried_metric_is_exported(self) -> None:
        queried = dashboard_metrics()
        self.assertGreater(len(queried), 10)
        response = await self.request("GET", "/_synapse/metrics")
        self.assertEqual(response.code, 200)
        exported = set()
        for line in response.body.decode().splitlines():
            match = re.match(r"# TYPE (\S+) ", line)
            if match:
                family = match.group(1)
                exported.add(family)
                exported.update(family + suffix for suffix in _SUFFIXES)
        self.assertEqual(queried - exported, set())

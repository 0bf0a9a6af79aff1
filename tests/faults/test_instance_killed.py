"""One of two instances (two hosts: media stores of their own, one
PostgreSQL database, one S3 bucket) is killed with SIGKILL under load: no
upload it acknowledged is lost (every one downloads intact from the other,
out of S3), and the other keeps serving throughout."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any

import yaml
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThread

from mediarepo.federation.keys import write_new_signing_key
from tests.faults.test_database_outage import SERVER_NAME, Load, download_path
from tests.processes import ServerProcesses, free_port
from tests.s3 import MotoServer
from tests.utils import create_postgres_database, drop_postgres_database, postgres_params

# How long the load runs before the kill, and after it.
LOAD_SECONDS = 3.0


class InstanceKilledTests(ServerProcesses):
    timeout = 180

    def setUp(self) -> None:
        self.workdir = tempfile.mkdtemp(prefix="mediarepo-hosts-")
        self.addCleanup(shutil.rmtree, self.workdir, True)
        self.processes: list[subprocess.Popen[bytes]] = []
        self.addCleanup(self._kill_all)
        self.dbname = create_postgres_database()
        self.addCleanup(drop_postgres_database, self.dbname)
        self.moto = MotoServer(self.workdir)
        self.addCleanup(self.moto.release)
        self.moto.start()
        key_path = os.path.join(self.workdir, "signing.key")
        write_new_signing_key(key_path)
        self.ports = [free_port(), free_port()]
        self.configs = []
        for index, port in enumerate(self.ports):
            config: dict[str, Any] = {
                "server_name": SERVER_NAME,
                "listeners": [{"port": port, "bind_addresses": ["127.0.0.1"], "type": "http",
                               "resources": [{"names": ["client", "media"]}]}],
                "database": {"name": "psycopg2",
                             "args": {**postgres_params(), "dbname": self.dbname, "cp_min": 2,
                                      "cp_max": 5}},
                "media_store_path": os.path.join(self.workdir, f"store-{index}"),
                "signing_key_path": key_path,
                "media_storage_providers": [self.moto.provider_config()],
            }  # fmt: skip
            path = os.path.join(self.workdir, f"instance-{index}.yaml")
            with open(path, "w") as f:
                yaml.safe_dump(config, f)
            self.configs.append(path)

    def test_killed_instance_loses_nothing_and_the_other_serves_on(self) -> Deferred[None]:
        return deferToThread(self._scenario)

    def _scenario(self) -> None:
        register = self._mediarepo("register-user", "-c", self.configs[0], f"@alice:{SERVER_NAME}")
        self.assertEqual(register.returncode, 0, register.stderr)
        token = register.stdout.strip().splitlines()[-1]
        doomed, survivor = (
            self._start([sys.executable, "-m", "mediarepo", "-c", path], port)
            for path, port in zip(self.configs, self.ports, strict=True)
        )
        loads = [Load(port, token) for port in self.ports]
        for load in loads:
            load.start()
        time.sleep(LOAD_SECONDS)  # load, not synchronisation: let uploads pile up
        doomed.send_signal(signal.SIGKILL)
        doomed.wait(10)
        killed_at = time.monotonic()
        time.sleep(LOAD_SECONDS)
        for load in loads:
            load.stop()

        # The survivor answered every request it was sent, before and after.
        survivor_outcomes = loads[1].outcomes
        self.assertGreater(len(survivor_outcomes), 20)
        failed = [o for o in survivor_outcomes if o.status != 200]
        self.assertEqual(failed, [], "the surviving instance failed requests")
        after = [o for o in survivor_outcomes if o.started > killed_at]
        self.assertGreater(len(after), 5)

        # Every upload either instance acknowledged downloads intact from the survivor.
        acknowledged = {**loads[0].acknowledged, **loads[1].acknowledged}
        self.assertGreater(len(loads[0].acknowledged), 5)
        check = Load(self.ports[1], token)
        for media_id, digest in acknowledged.items():
            outcome = check.request("GET", download_path(media_id))
            self.assertEqual(outcome.status, 200, media_id)
            self.assertEqual(hashlib.sha256(outcome.body).hexdigest(), digest, media_id)
        print(
            f"\n[instance killed] acknowledged by the killed instance:"
            f" {len(loads[0].acknowledged)}, by the survivor: {len(loads[1].acknowledged)};"
            f" survivor requests: {len(survivor_outcomes)} ({len(after)} after the kill),"
            " all 200",
            file=sys.stderr,
        )
        self.assertEqual(self._stop(survivor), 0)

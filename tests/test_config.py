"""Reading Synapse's homeserver.yaml keys."""

from __future__ import annotations

import os
from typing import Any

from twisted.trial import unittest

from mediarepo.config import load_config, parse_config
from mediarepo.config_reader import parse_duration_ms, parse_size
from mediarepo.config_storage import DirectoryProviderConfig, S3ProviderConfig
from mediarepo.errors import ConfigError
from mediarepo.identifiers import is_valid_server_name
from mediarepo.outbound import ProxySettings

# A Synapse config as operators have them: many keys mediarepo does not use.
SYNAPSE_CONFIG = {
    "server_name": "example.org",
    "pid_file": "/data/homeserver.pid",
    "listeners": [
        {
            "port": 8008,
            "tls": False,
            "type": "http",
            "x_forwarded": True,
            "bind_addresses": ["::1", "127.0.0.1"],
            "resources": [{"names": ["client", "federation"], "compress": False}],
        },
        {"port": 9000, "type": "manhole"},
        {"port": 9092, "type": "metrics", "bind_addresses": ["127.0.0.1"]},
    ],
    "database": {
        "name": "psycopg2",
        "txn_limit": 10000,
        "args": {"user": "synapse", "dbname": "synapse", "cp_min": 2, "cp_max": 7},
    },
    "log_config": "/data/example.org.log.config",
    "media_store_path": "/data/media_store",
    "registration_shared_secret": "secret",
    "report_stats": False,
    "macaroon_secret_key": "m",
    "form_secret": "f",
    "signing_key_path": "/data/example.org.signing.key",
    "trusted_key_servers": [{"server_name": "matrix.org"}],
    "max_upload_size": "100M",
    "rc_message": {"per_second": 1},
}


def parse(data: dict[str, Any]) -> Any:
    return parse_config(data, "/etc/matrix")


class ConfigTests(unittest.TestCase):
    def test_synapse_config_loads(self) -> None:
        config = parse(SYNAPSE_CONFIG)
        self.assertEqual(config.server_name, "example.org")
        self.assertEqual(config.max_upload_size, 100 * 1024 * 1024)
        self.assertEqual(config.media_store_path, "/data/media_store")
        self.assertEqual(config.database.engine, "psycopg2")
        self.assertEqual((config.database.cp_min, config.database.cp_max), (2, 7))
        self.assertNotIn("cp_min", config.database.args)
        # The manhole listener is Synapse's business; the metrics one is ours.
        self.assertEqual([listener.port for listener in config.listeners], [8008, 9092])
        http, metrics = config.listeners
        self.assertTrue(http.x_forwarded)
        self.assertTrue(http.serves_media)
        self.assertEqual(http.bind_addresses, ("::1", "127.0.0.1"))
        self.assertEqual(metrics.resource_names, frozenset({"metrics"}))

    def test_defaults(self) -> None:
        config = parse({"server_name": "example.org"})
        self.assertEqual(config.max_upload_size, 50 * 1024 * 1024)
        self.assertEqual(config.max_image_pixels, 32 * 1024 * 1024)
        self.assertTrue(config.enable_authenticated_media)
        self.assertFalse(config.enable_metrics)
        self.assertEqual(config.database.engine, "sqlite3")
        self.assertEqual(config.database.args["database"], os.path.abspath("homeserver.db"))
        self.assertEqual(config.media_store_path, os.path.abspath("media_store"))
        self.assertEqual(config.signing_key_path, "/etc/matrix/example.org.signing.key")
        self.assertEqual(config.listeners, ())

    def test_worker_listeners(self) -> None:
        config = parse(
            {
                "server_name": "example.org",
                "worker_app": "synapse.app.media_repository",
                "worker_listeners": [
                    {"type": "http", "port": 8085, "resources": [{"names": ["media"]}]}
                ],
            }
        )
        self.assertEqual(config.listeners[0].port, 8085)
        self.assertEqual(config.listeners[0].bind_addresses, ("::", "0.0.0.0"))

    def test_sizes_and_durations(self) -> None:
        self.assertEqual(parse_size("k", "10K"), 10240)
        self.assertEqual(parse_size("k", "2g"), 2 * 1024**3)
        self.assertEqual(parse_size("k", 1234), 1234)
        self.assertEqual(parse_duration_ms("k", "24h"), 86_400_000)
        self.assertEqual(parse_duration_ms("k", "2w"), 14 * 86_400_000)
        self.assertEqual(parse_duration_ms("k", 500), 500)
        for bad in ("ten", "-5M", "", True, 1.5, "5 MB"):
            with self.assertRaises(ConfigError):
                parse_size("k", bad)

    def test_upload_limits_longest_period_first(self) -> None:
        config = parse(
            {
                "server_name": "example.org",
                "media_upload_limits": [
                    {"time_period": "1h", "max_size": "10M"},
                    {"time_period": "1d", "max_size": "100M"},
                ],
            }
        )
        self.assertEqual(
            [(limit.time_period_ms, limit.max_size) for limit in config.media_upload_limits],
            [(86_400_000, 100 * 1024**2), (3_600_000, 10 * 1024**2)],
        )

    def test_storage_providers(self) -> None:
        config = parse(
            {
                "server_name": "example.org",
                "media_storage_providers": [
                    {
                        "module": "s3_storage_provider.S3StorageProviderBackend",
                        "store_local": True,
                        "store_remote": True,
                        "config": {"bucket": "b", "prefix": "media/", "region_name": "eu"},
                    },
                    {
                        "module": "synapse.rest.media.v1.storage_provider"
                        ".FileStorageProviderBackend",
                        "config": {"directory": "/backup"},
                    },
                ],
                "media_store_max_size": "10G",
            }
        )
        s3, directory = config.media_storage_providers
        self.assertEqual(
            (s3.store_local, s3.store_remote, s3.store_synchronous), (True, True, False)
        )
        assert isinstance(s3.backend, S3ProviderConfig)
        self.assertEqual(
            (s3.backend.bucket, s3.backend.prefix, s3.backend.threadpool_size),
            ("b", "media/", 40),
        )
        self.assertEqual(directory.backend, DirectoryProviderConfig("/backup"))
        self.assertFalse(directory.store_local or directory.store_remote)
        self.assertEqual(config.media_store_max_size, 10 * 1024**3)
        legacy = parse({"server_name": "example.org", "backup_media_store_path": "/b"})
        (backup,) = legacy.media_storage_providers
        self.assertEqual((backup.store_local, backup.store_remote, backup.store_synchronous),
                         (True, True, False))  # fmt: skip
        bad: list[tuple[dict[str, Any], str]] = [
            ({"media_storage_providers": [{"module": "nope.Backend"}]}, "module"),
            ({"media_storage_providers": [{"module": "file_system"}]}, "config.directory"),
            ({"media_storage_providers": [{"module": "s3", "config": {}}]}, "config.bucket"),
            ({"media_store_max_size": "1G"}, "media_store_max_size"),
            (
                {
                    "backup_media_store_path": "/b",
                    "media_storage_providers": [
                        {"module": "file_system", "config": {"directory": "/c"}}
                    ],
                },
                "backup_media_store_path",
            ),
        ]
        for extra, key in bad:
            with self.assertRaises(ConfigError) as raised:
                parse({"server_name": "example.org", **extra})
            self.assertIn(key, str(raised.exception))

    def test_server_names(self) -> None:
        for good in ("example.org", "localhost:8448", "1.2.3.4", "[::1]:8448", "a-b.c"):
            self.assertTrue(is_valid_server_name(good), good)
        for bad in ("", "exa mple.org", "example.org:", "example.org:99999", "[::1", "../x"):
            self.assertFalse(is_valid_server_name(bad), bad)

    def test_bad_values_name_their_key(self) -> None:
        cases: list[tuple[dict[str, Any], str]] = [
            ({}, "server_name"),
            ({"server_name": "bad name"}, "server_name"),
            ({"max_upload_size": "lots"}, "max_upload_size"),
            ({"enable_authenticated_media": "yes"}, "enable_authenticated_media"),
            ({"database": {"name": "mysql"}}, "database.name"),
            ({"database": {"args": {"cp_min": 5, "cp_max": 2}}}, "database.args.cp_min"),
            ({"listeners": [{"port": "x"}]}, "listeners[0].port"),
            ({"listeners": [{"port": 1, "resources": [{"names": ["nope"]}]}]}, "names"),
            ({"media_store_path": 5}, "media_store_path"),
            ({"media_upload_limits": [{"time_period": "1h"}]}, "media_upload_limits[0].max_size"),
            (
                {"media_upload_limits": [{"time_period": "0s", "max_size": "1M"}]},
                "media_upload_limits[0].time_period",
            ),
        ]
        for extra, key in cases:
            data = {"server_name": "example.org", **extra} if extra else extra
            with self.assertRaises(ConfigError) as raised:
                parse(data)
            self.assertIn(key, str(raised.exception))
            self.assertNotIn("\n", str(raised.exception))

    def test_housekeeping_and_retention(self) -> None:
        config = parse({"server_name": "example.org"})
        self.assertEqual(config.media_housekeeping_interval_ms, 3_600_000)
        self.assertIsNone(config.admin_contact)
        self.assertIsNone(config.local_media_lifetime_ms)
        config = parse(
            {
                "server_name": "example.org",
                "admin_contact": "mailto:ops@example.org",
                "media_housekeeping_interval": "5m",
                "media_retention": {"local_media_lifetime": "5m", "remote_media_lifetime": "7d"},
            }
        )
        self.assertEqual(config.admin_contact, "mailto:ops@example.org")
        self.assertEqual(config.media_housekeeping_interval_ms, 300_000)
        self.assertEqual(config.local_media_lifetime_ms, 300_000)
        self.assertEqual(config.remote_media_lifetime_ms, 7 * 86_400_000)
        # A lifetime that would purge media read moments ago stops start-up.
        for key in ("local_media_lifetime", "remote_media_lifetime"):
            for lifetime in (0, "0s", "30s", "4m", 299_999):
                with self.assertRaises(ConfigError) as raised:
                    parse({"server_name": "example.org", "media_retention": {key: lifetime}})
                self.assertIn(f"media_retention.{key}", str(raised.exception))
                self.assertIn("minimum is 5 minutes", str(raised.exception))
        for interval in (0, "0s", 999):
            with self.assertRaises(ConfigError) as raised:
                parse({"server_name": "example.org", "media_housekeeping_interval": interval})
            self.assertIn("media_housekeeping_interval", str(raised.exception))

    def test_thumbnail_pixel_budget(self) -> None:
        self.assertEqual(parse({"server_name": "example.org"}).thumbnail_pixel_budget, 32 * 1024**2)
        config = parse({"server_name": "example.org", "thumbnail_pixel_budget": "64M"})
        self.assertEqual(config.thumbnail_pixel_budget, 64 * 1024**2)
        for bad in (0, "0", "lots"):
            with self.assertRaises(ConfigError) as raised:
                parse({"server_name": "example.org", "thumbnail_pixel_budget": bad})
            self.assertIn("thumbnail_pixel_budget", str(raised.exception))

    def test_thumbnail_formats(self) -> None:
        all_formats = {"heic", "avif", "bmp", "tiff", "video"}
        self.assertEqual(parse({"server_name": "example.org"}).thumbnail_formats, all_formats)
        config = parse(
            {"server_name": "example.org", "thumbnail_formats": {"video": False, "tiff": False}}
        )
        self.assertEqual(config.thumbnail_formats, {"heic", "avif", "bmp"})
        for bad in ({"jxl": True}, {"video": "no"}, ["video"]):
            with self.assertRaises(ConfigError) as raised:
                parse({"server_name": "example.org", "thumbnail_formats": bad})
            self.assertIn("thumbnail_formats", str(raised.exception))

    def test_proxy_keys_then_environment(self) -> None:
        base = {"server_name": "example.org"}
        self.assertIsNone(parse_config(base, "/etc/matrix", environ={}).proxy)
        environ = {"https_proxy": "http://env:3128", "no_proxy": "a.test,b.test"}
        from_env = parse_config(base, "/etc/matrix", environ=environ).proxy
        self.assertEqual(
            from_env, ProxySettings(https_proxy="http://env:3128", no_proxy=("a.test", "b.test"))
        )
        keys = {**base, "https_proxy": "http://conf:8080", "no_proxy_hosts": ["c.test"]}
        from_keys = parse_config(keys, "/etc/matrix", environ=environ).proxy
        self.assertEqual(
            from_keys, ProxySettings(https_proxy="http://conf:8080", no_proxy=("c.test",))
        )
        for key in ("http_proxy", "https_proxy"):
            with self.assertRaises(ConfigError) as raised:
                parse_config({**base, key: "socks5://p:1"}, "/etc/matrix", environ={})
            self.assertIn(key, str(raised.exception))

    def test_unreadable_and_invalid_files(self) -> None:
        with self.assertRaises(ConfigError):
            load_config("/nonexistent/homeserver.yaml")
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("server_name: [unclosed\n")
        with self.assertRaises(ConfigError):
            load_config(path)


# A Synapse media worker's file, as Synapse's worker documentation has them.
MEDIA_WORKER_FILE = """\
worker_app: synapse.app.media_repository
worker_name: media1
worker_listeners:
  - type: http
    port: 8085
    bind_addresses: ['127.0.0.1']
    x_forwarded: true
    resources:
      - names: [media]
worker_log_config: /etc/matrix-synapse/media1.log.config
worker_pid_file: /run/matrix-synapse/media1.pid
"""


class SynapseStyleConfigFilesTests(unittest.TestCase):
    """Several -c files (and directories) merged as Synapse merges them."""

    def write(self, directory: str, name: str, text: str) -> str:
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, name)
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        return path

    def setUp(self) -> None:
        self.dir = self.mktemp()
        import yaml

        self.homeserver = self.write(self.dir, "homeserver.yaml", yaml.safe_dump(SYNAPSE_CONFIG))

    def test_worker_file_selects_worker_listeners_and_log_config(self) -> None:
        worker = self.write(os.path.join(self.dir, "workers"), "media1.yaml", MEDIA_WORKER_FILE)
        config = load_config([self.homeserver, worker])
        # Synapse's own listeners (8008, the metrics port) are the main process's.
        self.assertEqual([listener.port for listener in config.listeners], [8085])
        self.assertEqual(config.listeners[0].place, "worker_listeners[0]")
        self.assertTrue(config.listeners[0].x_forwarded)
        self.assertEqual(config.log_config, "/etc/matrix-synapse/media1.log.config")
        self.assertEqual(config.pid_file, "/run/matrix-synapse/media1.pid")
        self.assertEqual(config.worker_app, "synapse.app.media_repository")
        self.assertEqual(config.instance_name, "media1")
        # Everything else still comes from homeserver.yaml.
        self.assertEqual(config.database.engine, "psycopg2")
        self.assertEqual(config.max_upload_size, 100 * 1024 * 1024)
        self.assertEqual(config.sources["worker_listeners"], worker)
        self.assertEqual(config.sources["database"], self.homeserver)

    def test_without_worker_app_the_shared_listeners_are_used(self) -> None:
        config = load_config(self.homeserver)
        self.assertEqual([listener.port for listener in config.listeners], [8008, 9092])
        self.assertEqual(config.log_config, "/data/example.org.log.config")
        self.assertIsNone(config.worker_app)
        self.assertEqual(config.instance_name, "master")
        self.assertIsNone(config.pid_file)

    def test_generic_worker_without_worker_log_config_logs_to_stderr(self) -> None:
        worker = self.write(
            self.dir,
            "generic.yaml",
            "worker_app: synapse.app.generic_worker\nworker_listeners: []\n",
        )
        config = load_config([self.homeserver, worker])
        self.assertIsNone(config.log_config)
        self.assertEqual(config.instance_name, "synapse.app.generic_worker")
        self.assertEqual(config.listeners, ())

    def test_other_workers_are_refused(self) -> None:
        worker = self.write(self.dir, "fs.yaml", "worker_app: synapse.app.federation_sender\n")
        with self.assertRaises(ConfigError) as raised:
            load_config([self.homeserver, worker])
        self.assertEqual(raised.exception.key, "worker_app")
        self.assertIn("fs.yaml", str(raised.exception))

    def test_later_files_replace_whole_top_level_keys(self) -> None:
        override = self.write(
            self.dir, "override.yaml", "database:\n  name: sqlite3\n  args: {database: x.db}\n"
        )
        config = load_config([self.homeserver, override])
        self.assertEqual(config.database.engine, "sqlite3")
        # Replaced whole, not merged: the earlier pool bounds are gone.
        self.assertEqual((config.database.cp_min, config.database.cp_max), (5, 10))
        config = load_config([override, self.homeserver])
        self.assertEqual(config.database.engine, "psycopg2")

    def test_directory_gives_its_yaml_files_in_sorted_order(self) -> None:
        conf_d = os.path.join(self.dir, "conf.d")
        self.write(conf_d, "20-size.yaml", "max_upload_size: 20M\n")
        self.write(conf_d, "10-size.yaml", "max_upload_size: 10M\nmax_image_pixels: 1M\n")
        self.write(conf_d, "30-ignored.yml", "max_upload_size: 30M\n")
        os.makedirs(os.path.join(conf_d, "sub.yaml"))
        config = load_config([self.homeserver, conf_d])
        self.assertEqual(config.max_upload_size, 20 * 1024 * 1024)
        self.assertEqual(config.max_image_pixels, 1024 * 1024)
        # A directory without *.yaml files is an error, not an empty config.
        with self.assertRaises(ConfigError):
            load_config([os.path.join(self.dir, "empty.d")])

    def test_errors_name_the_file_the_key_came_from(self) -> None:
        bad = self.write(
            self.dir, "bad.yaml", "worker_app: synapse.app.media_repository\n"
            "worker_listeners:\n  - port: 99999\n"
        )  # fmt: skip
        with self.assertRaises(ConfigError) as raised:
            load_config([self.homeserver, bad])
        self.assertEqual(
            str(raised.exception), f"worker_listeners[0].port in {bad}: expected a port number"
        )

    def test_listen_failures_name_the_listener_and_file(self) -> None:
        import errno

        worker = self.write(os.path.join(self.dir, "workers"), "media1.yaml", MEDIA_WORKER_FILE)
        config = load_config([self.homeserver, worker])
        error = config.listeners[0].cannot_listen(
            "127.0.0.1", OSError(errno.EADDRINUSE, "Address already in use")
        )
        self.assertEqual(
            str(config.locate(error)),
            f"worker_listeners[0] in {worker}: 127.0.0.1:8085 is already in use",
        )
        error = config.listeners[0].cannot_listen("::1", OSError(errno.EACCES, "Permission denied"))
        self.assertEqual(
            str(config.locate(error)),
            f"worker_listeners[0] in {worker}: cannot listen on [::1]:8085: Permission denied",
        )

    def test_background_jobs_follow_media_instance_running_background_jobs(self) -> None:
        worker = self.write(self.dir, "media1.yaml", MEDIA_WORKER_FILE)
        cases = [
            ("", True),  # unset: every instance runs them
            ("media_instance_running_background_jobs: media1\n", True),
            ("media_instance_running_background_jobs: media2\n", False),
        ]
        for extra, runs in cases:
            shared = self.write(self.dir, "jobs.yaml", extra or "{}\n")
            config = load_config([self.homeserver, shared, worker])
            self.assertEqual(config.runs_background_jobs, runs, extra)
        shared = self.write(
            self.dir, "jobs.yaml", "media_instance_running_background_jobs: master\n"
        )
        self.assertTrue(load_config([self.homeserver, shared]).runs_background_jobs)

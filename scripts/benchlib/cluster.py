"""Several mediarepo instances on this machine as several hosts would run
them: each with its own ``media_store_path`` (a local cache), all on one
PostgreSQL database and one S3 bucket (a moto server), behind one address
(nginx, round robin). Each instance is pinned to its share of the cores
(see :func:`core_plan`), so that 1, 2 and 3 instances get the same total.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field

from benchlib.scenarios import Target
from benchlib.servers import (
    BENCH_USER,
    SERVER_NAME,
    Cleanup,
    ManagedServer,
    Postgres,
    _die_with_parent,
    dump_yaml,
    free_port,
    load_yaml,
    log,
    make_workdir,
    nginx_version,
    run,
    stop_process,
    write_nginx_config,
)
from benchlib.wrk import install_debian_package

# The instance that runs background jobs (media_instance_running_background_jobs).
FIRST_INSTANCE = "media1"
# moto's defaults: it checks no signature, but boto3 must sign with something.
S3_ACCESS_KEY = "bench-access-key"
S3_SECRET_KEY = "bench-secret-key"
S3_REGION = "us-east-1"


def core_plan(instances: int, cores: list[int]) -> list[list[int]]:
    """The cores each instance may run on, the same total for any count:
    the cores split evenly where they divide (1 instance: all; 2 on 2
    cores: one each), otherwise every instance on all of them, the kernel
    sharing them out (3 on 2 cores: two thirds of the machine each, on average)."""
    if len(cores) % instances == 0:
        share = len(cores) // instances
        return [cores[i * share : (i + 1) * share] for i in range(instances)]
    return [list(cores) for _ in range(instances)]


def _cpu_list(cores: list[int]) -> str:
    return ",".join(str(c) for c in cores)


class MotoS3:
    """A moto server (S3 in server mode) on a loopback port."""

    def __init__(self, python: str, workdir: str) -> None:
        self.python = python
        self.port = free_port()
        self.log_path = os.path.join(workdir, "moto.log")
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, cleanup: Cleanup) -> None:
        with open(self.log_path, "ab") as out:
            self.proc = subprocess.Popen(
                [self.python, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        proc = self.proc
        cleanup.add(f"moto pid {proc.pid}", lambda: stop_process(proc, "moto"))
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(self.endpoint_url + "/moto-api/", timeout=2).close()
                break
            except OSError as e:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        f"moto did not start ({e}); is moto[server] installed in "
                        f"{self.python}? see {self.log_path}"
                    ) from None
                time.sleep(0.1)
        log(f"moto (S3) is up (pid {proc.pid}) at {self.endpoint_url}")

    def create_bucket(self, bucket: str) -> None:
        request = urllib.request.Request(f"{self.endpoint_url}/{bucket}", method="PUT")
        try:
            urllib.request.urlopen(request, timeout=30).close()
        except urllib.error.HTTPError as e:
            raise RuntimeError(f"creating bucket {bucket} answered {e.code}") from e

    def provider_entry(self, bucket: str) -> dict[str, object]:
        """The ``media_storage_providers`` entry of the Synapse S3 module's
        format: synchronous (the bytes are in the bucket before the upload
        is answered), redirects presigned."""
        return {
            "module": "s3_storage_provider.S3StorageProviderBackend",
            "store_local": True,
            "store_remote": True,
            "store_synchronous": True,
            "config": {
                "bucket": bucket,
                "endpoint_url": self.endpoint_url,
                "region_name": S3_REGION,
                "access_key_id": S3_ACCESS_KEY,
                "secret_access_key": S3_SECRET_KEY,
                "download_redirect": "presigned",
            },
        }


@dataclass
class Cluster:
    """``instances`` mediarepo processes behind one nginx."""

    label: str
    instances: list[ManagedServer]
    balancer: ManagedServer
    cores: list[list[int]]
    token: str
    info: dict[str, object] = field(default_factory=dict)

    def start(self, cleanup: Cleanup) -> None:
        for server in self.instances:
            server.start(cleanup)
        self.balancer.start(cleanup)

    def stop(self) -> None:
        self.balancer.stop()
        for server in self.instances:
            server.stop()

    def target(self) -> Target:
        """The one address clients use (the balancer)."""
        return Target(
            label=self.label,
            base_url=self.balancer.base_url,
            server_name=SERVER_NAME,
            token=self.token,
            info=dict(self.info),
        )

    def instance_targets(self) -> list[Target]:
        """Each instance by itself (to fill every local cache)."""
        return [
            Target(label=s.label, base_url=s.base_url, server_name=SERVER_NAME, token=self.token)
            for s in self.instances
        ]

    def drop_local_copies(self) -> None:
        """Empty every instance's local cache of our media and thumbnails
        (the rows and the bucket keep them): the next read of each is cold."""
        for server in self.instances:
            store = str(server.info["media_store_path"])
            for part in ("local_content", "local_thumbnails"):
                shutil.rmtree(os.path.join(store, part), ignore_errors=True)


def setup_cluster(
    cleanup: Cleanup,
    *,
    python: str,
    postgres: Postgres,
    moto: MotoS3,
    instances: int,
    keep: bool,
) -> Cluster:
    """Configure (not start) ``instances`` instances on a fresh database and
    bucket, and nginx in front of them."""
    label = f"hosts{instances}"
    workdir = make_workdir(cleanup, label, keep)
    base_path = os.path.join(workdir, "homeserver.yaml")
    run(
        [python, "-m", "mediarepo", "--generate-config", "-c", base_path,
         "--server-name", SERVER_NAME, "--port", str(free_port())],
        timeout=120,
    )  # fmt: skip
    dbname = postgres.create_database(cleanup, "bench_ours")
    bucket = f"bench-{label}-{os.getpid()}"
    moto.create_bucket(bucket)
    config = load_yaml(base_path)
    config.update(
        {
            "database": {"name": "psycopg2", "args": postgres.args(dbname)},
            "media_storage_providers": [moto.provider_entry(bucket)],
            "media_instance_running_background_jobs": FIRST_INSTANCE,
            "max_upload_size": "100M",
            "max_pending_media_uploads": 10000,
            "rc_media_create": {"per_second": 100000, "burst_count": 1000000},
            "enable_authenticated_media": True,
            "dynamic_thumbnails": False,
        }
    )
    dump_yaml(base_path, config)
    registered = run(
        [python, "-m", "mediarepo", "register-user", "-c", base_path,
         f"@{BENCH_USER}:{SERVER_NAME}"],
        timeout=120,
    )  # fmt: skip
    token = registered.stdout.strip().splitlines()[-1].strip()

    available = sorted(os.sched_getaffinity(0))
    plan = core_plan(instances, available)
    servers: list[ManagedServer] = []
    for index, cores in enumerate(plan, start=1):
        name = f"media{index}"
        port = free_port()
        store = os.path.join(workdir, f"store-{name}")
        data = dict(config)
        data["worker_name"] = name
        data["media_store_path"] = store
        data["listeners"] = [
            {**listener, "port": port, "bind_addresses": ["127.0.0.1"]}
            for listener in config.get("listeners", [])
        ]
        path = os.path.join(workdir, f"{name}.yaml")
        dump_yaml(path, data)
        servers.append(
            ManagedServer(
                label=f"{label}-{name}",
                workdir=workdir,
                config_path=path,
                port=port,
                command=["taskset", "-c", _cpu_list(cores), python, "-m", "mediarepo", "-c", path],
                info={"media_store_path": store, "cores": _cpu_list(cores)},
                token=token,
                start_timeout=90,
            )
        )
    balancer = _nginx_balancer(cleanup, keep, label, [s.port for s in servers])
    info: dict[str, object] = {
        "server": "mediarepo",
        "database": "postgresql",
        "instances": instances,
        "cores": " | ".join(_cpu_list(c) for c in plan),
        "balancer": f"nginx {balancer.info.get('version', '')}".strip(),
    }
    log(f"{label}: {instances} instance(s) on cores {info['cores']}, bucket {bucket}")
    return Cluster(label, servers, balancer, plan, token, info)


def _nginx_balancer(cleanup: Cleanup, keep: bool, label: str, ports: list[int]) -> ManagedServer:
    """nginx passing every request to the instances in turn (round robin),
    bodies streamed both ways, on keep-alive connections to them."""
    binary = install_debian_package("nginx", "nginx-light")
    if binary is None:
        raise RuntimeError("nginx is not installed (apt-get install nginx-light)")
    workdir = make_workdir(cleanup, f"nginx-{label}", keep)
    port = free_port()
    upstreams = "\n".join(f"        server 127.0.0.1:{p};" for p in ports)
    config_path = write_nginx_config(
        workdir,
        1,
        f"""\
    upstream media {{
{upstreams}
        keepalive 64;
    }}
    server {{
        listen 127.0.0.1:{port};
        client_max_body_size 100m;
        location / {{
            proxy_pass http://media;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $host;
            proxy_request_buffering off;
            proxy_buffering off;
            proxy_redirect off;
        }}
    }}
""",
    )
    return ManagedServer(
        label=f"{label}-nginx",
        workdir=workdir,
        config_path=config_path,
        port=port,
        command=[binary, "-c", config_path, "-p", workdir],
        info={"server": "nginx", "version": nginx_version(binary)},
        start_timeout=30,
    )


def python_has_moto(python: str) -> bool:
    return subprocess.run([python, "-c", "import moto.server"], capture_output=True).returncode == 0


def require_moto(python: str) -> None:
    if not python_has_moto(python):
        raise RuntimeError(
            f"{python} has no moto server: {python} -m pip install 'moto[server]' "
            "(the several-hosts benchmark runs one as the S3 store)"
        )

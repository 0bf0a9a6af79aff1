"""Starting and stopping the servers under test: ours, a stock Synapse from
PyPI, and (optionally) nginx serving the same files statically.

Everything started here is registered with :class:`Cleanup`, which stops
it on exit (normal, exception, SIGTERM/SIGINT via KeyboardInterrupt, atexit).
"""

from __future__ import annotations

import atexit
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from benchlib.origin import OriginInfo, start_origin
from benchlib.populate import Population, clone_media_store
from benchlib.scenarios import Target
from benchlib.wrk import install_debian_package

SYNAPSE_PIN = "1.163.2"
SERVER_NAME = "bench.test"
# URL previews on (the preview scenario's pages are served on 127.0.0.1,
# which this blacklist lets through; nothing else is reached).
PREVIEW_CONFIG = {
    "url_preview_enabled": True,
    "url_preview_ip_range_blacklist": ["10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16"],
}
BENCH_USER = "bench"


def log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def cache_base() -> str:
    return os.environ.get("MEDIAREPO_BENCH_CACHE") or os.path.expanduser("~/.cache/mediarepo-bench")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run(
    args: list[str], *, timeout: float = 600, **kwargs: Any
) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(args, capture_output=True, text=True, timeout=timeout, **kwargs)
    if result.returncode != 0:
        raise RuntimeError(
            f"{' '.join(args)} exited with {result.returncode}:\n{result.stdout}\n{result.stderr}"
        )
    return result


def load_yaml(path: str) -> dict[str, Any]:
    import yaml

    with open(path, encoding="utf-8") as f:
        data = yaml.safe_load(f)
    assert isinstance(data, dict)
    return data


def dump_yaml(path: str, data: dict[str, Any]) -> None:
    import yaml

    with open(path, "w", encoding="utf-8") as f:
        yaml.safe_dump(data, f, sort_keys=False)


class Cleanup:
    """Stops processes, drops databases and removes directories, last first."""

    def __init__(self) -> None:
        self._actions: list[tuple[str, Callable[[], None]]] = []
        atexit.register(self.run)

    def add(self, what: str, action: Callable[[], None]) -> None:
        self._actions.append((what, action))

    def run(self) -> None:
        while self._actions:
            what, action = self._actions.pop()
            try:
                action()
            except Exception as e:  # cleanup goes on whatever one step did
                log(f"cleanup of {what} failed: {e}")


def install_signal_handlers() -> None:
    def on_signal(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_signal)


def _die_with_parent() -> None:
    """In the child before exec: get SIGTERM when the process that started
    it dies, even by SIGKILL, so no server outlives the benchmark."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def stop_process(proc: subprocess.Popen[bytes], name: str, *, grace: float = 20.0) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        log(f"{name} (pid {proc.pid}) did not stop within {grace:.0f} s of SIGTERM; killing it")
        proc.kill()
        proc.wait(timeout=10)


def http_status(url: str, token: str | None = None, timeout: float = 10.0) -> int:
    """The status of a GET of ``url`` (any body, JSON or not)."""
    request = urllib.request.Request(url)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            response.read()
            return int(response.status)
    except urllib.error.HTTPError as e:
        return int(e.code)


def http_json(
    url: str,
    *,
    method: str = "GET",
    body: dict[str, Any] | None = None,
    token: str | None = None,
    timeout: float = 10.0,
) -> tuple[int, dict[str, Any]]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        request.add_header("Content-Type", "application/json")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as e:
        try:
            payload = json.loads(e.read() or b"{}")
        except ValueError:
            payload = {}
        return e.code, payload


# -- PostgreSQL ----------------------------------------------------------------


@dataclass
class Postgres:
    host: str = "127.0.0.1"
    port: int = 5432
    user: str = "postgres"

    def _psql(self, sql: str) -> None:
        run(
            [
                "psql", "-h", self.host, "-p", str(self.port), "-U", self.user,
                "-d", "postgres", "-v", "ON_ERROR_STOP=1", "-qc", sql,
            ],
            timeout=120,
        )  # fmt: skip

    def checkpoint(self) -> None:
        """Write PostgreSQL's dirty buffers out now, not in the middle of
        the next measurement."""
        self._psql("CHECKPOINT")

    def create_database(self, cleanup: Cleanup, prefix: str, template: str | None = None) -> str:
        """A new database, dropped on cleanup; a copy of ``template`` if given."""
        if shutil.which("psql") is None:
            raise RuntimeError("psql is not installed; it is needed to create the databases")
        name = f"{prefix}_{os.getpid()}_{secrets.token_hex(3)}"
        if template is None:
            self.create_empty(name)
        else:
            self._psql(f"CREATE DATABASE {name} TEMPLATE {template}")
        cleanup.add(f"database {name}", lambda: self.drop(name))
        return name

    def create_empty(self, name: str) -> None:
        self._psql(
            f"CREATE DATABASE {name} ENCODING 'UTF8' LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0"
        )

    def drop(self, name: str) -> None:
        self._psql(f"DROP DATABASE IF EXISTS {name}")

    def exists(self, name: str) -> bool:
        listed = run(
            ["psql", "-h", self.host, "-p", str(self.port), "-U", self.user, "-d", "postgres",
             "-Atc", f"SELECT 1 FROM pg_database WHERE datname = '{name}'"],
            timeout=60,
        )  # fmt: skip
        return listed.stdout.strip() == "1"

    def dsn(self) -> dict[str, Any]:
        return {"host": self.host, "port": self.port, "user": self.user}

    def sweep_stale(self) -> None:
        """Drop databases left by a run that was killed (its pid is in the name)."""
        try:
            listed = run(
                ["psql", "-h", self.host, "-p", str(self.port), "-U", self.user, "-d", "postgres",
                 "-Atc", "SELECT datname FROM pg_database WHERE datname LIKE 'bench\\_%'"],
                timeout=60,
            ).stdout.split()  # fmt: skip
        except (RuntimeError, OSError, subprocess.TimeoutExpired):
            return
        for name in listed:
            match = re.fullmatch(r"bench_(?:ours|synapse)_(\d+)_[0-9a-f]{6}", name)
            if match and not _pid_alive(int(match.group(1))):
                log(f"dropping database {name} left by a killed run")
                self._psql(f"DROP DATABASE IF EXISTS {name}")

    def args(self, dbname: str) -> dict[str, Any]:
        return {
            "user": self.user,
            "host": self.host,
            "port": self.port,
            "dbname": dbname,
            "cp_min": 5,
            "cp_max": 10,
        }


# -- a server process ----------------------------------------------------------------


@dataclass
class Phase:
    """A server configuration the scenarios of one phase need."""

    name: str
    dynamic_thumbnails: bool
    enable_authenticated_media: bool


@dataclass
class ManagedServer:
    label: str
    workdir: str
    config_path: str
    port: int
    command: list[str]
    info: dict[str, Any] = field(default_factory=dict)
    token: str = ""
    proc: subprocess.Popen[bytes] | None = None
    log_path: str = ""
    ready_path: str = "/_matrix/client/v1/media/config"
    start_timeout: float = 180.0
    configure_hook: Callable[[Phase], None] | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def configure(self, phase: Phase) -> None:
        if self.configure_hook is not None:
            self.configure_hook(phase)
        self.info["phase"] = phase.name
        self.info["dynamic_thumbnails"] = phase.dynamic_thumbnails
        self.info["enable_authenticated_media"] = phase.enable_authenticated_media

    def start(self, cleanup: Cleanup) -> None:
        self.log_path = os.path.join(self.workdir, f"{self.label}-stdout.log")
        out = open(self.log_path, "ab")  # closed once the child has it
        log(f"starting {self.label}: {' '.join(self.command)}")
        self.proc = subprocess.Popen(
            self.command,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=self.workdir,
            start_new_session=True,  # our Ctrl-C is not its Ctrl-C: we stop it ourselves
            # Tied to the starting thread: servers are started from the main thread.
            preexec_fn=_die_with_parent,
        )
        out.close()
        proc = self.proc
        cleanup.add(f"{self.label} pid {proc.pid}", lambda: stop_process(proc, self.label))
        self._wait_ready()

    def _wait_ready(self) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + self.start_timeout
        last = ""
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                tail = self.log_tail()
                last = tail.strip().splitlines()[-1] if tail.strip() else ""
                raise RuntimeError(
                    f"{self.label} exited with {self.proc.returncode} while starting "
                    f"({last}); its log ends:\n{tail}"
                )
            try:
                status = http_status(
                    self.base_url + self.ready_path, token=self.token or None, timeout=5
                )
                if status in (200, 401):  # listening and answering
                    log(f"{self.label} is up (pid {self.proc.pid}) at {self.base_url}")
                    return
                last = f"HTTP {status}"
            except OSError as e:
                last = str(e)
            time.sleep(0.25)
        raise RuntimeError(f"{self.label} not ready after {self.start_timeout:.0f} s ({last})")

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, self.label)
            log(f"{self.label} stopped (exit status {self.proc.returncode})")
            self.proc = None

    def log_tail(self, lines: int = 30) -> str:
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as f:
                return "".join(f.readlines()[-lines:])
        except OSError:
            return "(no log)"

    def target(self) -> Target:
        assert self.proc is not None
        return Target(
            label=self.label,
            base_url=self.base_url,
            server_name=SERVER_NAME,
            token=self.token,
            pid=self.proc.pid,
            info=dict(self.info),
            # A supervisor with workers: their CPU and memory count too.
            include_children=int(self.info.get("workers", 1)) > 1,
        )


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_stale_workdirs() -> None:
    """Remove temp dirs left by a run that was killed (its pid is in the name)."""
    tmp = tempfile.gettempdir()
    for entry in os.listdir(tmp):
        match = re.fullmatch(
            r"bench-(?:ours|synapse|nginx|origin|rawsink|hosts\d+|nginx-hosts\d+|moto)-(\d+)-\w+",
            entry,
        )
        if match and not _pid_alive(int(match.group(1))):
            log(f"removing {os.path.join(tmp, entry)} left by a killed run")
            shutil.rmtree(os.path.join(tmp, entry), ignore_errors=True)


def make_workdir(cleanup: Cleanup, label: str, keep: bool) -> str:
    workdir = tempfile.mkdtemp(prefix=f"bench-{label}-{os.getpid()}-")
    if keep:
        log(f"{label}: keeping {workdir}")
    else:
        cleanup.add(f"directory {workdir}", lambda: shutil.rmtree(workdir, ignore_errors=True))
    return workdir


# -- ours ----------------------------------------------------------------


def setup_ours(
    cleanup: Cleanup,
    *,
    python: str,
    postgres: Postgres | None,
    keep: bool,
    label: str = "ours",
    workers: int = 1,
    population: Population | None = None,
    extra_config: dict[str, Any] | None = None,
) -> ManagedServer:
    workdir = make_workdir(cleanup, label, keep)
    config_path = os.path.join(workdir, "homeserver.yaml")
    port = free_port()
    run(
        [python, "-m", "mediarepo", "--generate-config", "-c", config_path,
         "--server-name", SERVER_NAME, "--port", str(port)],
        timeout=120,
    )  # fmt: skip
    config = load_yaml(config_path)
    info: dict[str, Any] = {"server": "mediarepo", "database": "sqlite", "workers": workers}
    if postgres is not None:
        template = population.template_db if population else None
        dbname = postgres.create_database(cleanup, "bench_ours", template=template)
        config["database"] = {"name": "psycopg2", "args": postgres.args(dbname)}
        info["database"] = "postgresql"
    if population is not None:
        config["media_store_path"] = use_population(population, workdir, info)
    config["max_upload_size"] = "100M"
    config["max_pending_media_uploads"] = 10000
    config["rc_media_create"] = {"per_second": 100000, "burst_count": 1000000}
    config.update(PREVIEW_CONFIG)
    config.update(extra_config or {})
    dump_yaml(config_path, config)
    version = run([python, "-c", "import mediarepo; print(mediarepo.__version__)"], timeout=60)
    info["version"] = version.stdout.strip()

    def configure(phase: Phase) -> None:
        data = load_yaml(config_path)
        data["dynamic_thumbnails"] = phase.dynamic_thumbnails
        data["enable_authenticated_media"] = phase.enable_authenticated_media
        dump_yaml(config_path, data)

    server = ManagedServer(
        label=label,
        workdir=workdir,
        config_path=config_path,
        port=port,
        command=[python, "-m", "mediarepo", "-c", config_path, "--workers", str(workers)],
        info=info,
        configure_hook=configure,
        # On a populated database the first start builds our indexes.
        start_timeout=600 if population is not None else 90,
    )
    if population is not None:
        server.token = population.bench_token
    else:
        registered = run(
            [python, "-m", "mediarepo", "register-user", "-c", config_path,
             f"@{BENCH_USER}:{SERVER_NAME}"],
            timeout=120,
        )  # fmt: skip
        server.token = registered.stdout.strip().splitlines()[-1].strip()
    log(f"{label}: mediarepo {info['version']} on {info['database']}, config {config_path}")
    return server


# -- Synapse ----------------------------------------------------------------


def ensure_synapse(venv: str) -> str:
    """The Python of a virtualenv with matrix-synapse[postgres,url-preview] (pinned if available);
    creates it on first use."""
    python = os.path.join(venv, "bin", "python")
    probe = [
        python,
        "-c",
        "import synapse, psycopg2; from synapse.util.check_dependencies import"
        " check_requirements; check_requirements('url-preview'); print(synapse.__version__)",
    ]
    if os.path.exists(python) and subprocess.run(probe, capture_output=True).returncode == 0:
        return python
    log(f"installing matrix-synapse[postgres] into {venv} (once)")
    if not os.path.exists(python):
        run([sys.executable, "-m", "venv", venv], timeout=300)
    pip = [python, "-m", "pip", "install", "-q"]
    try:
        run([*pip, f"matrix-synapse[postgres,url-preview]=={SYNAPSE_PIN}"], timeout=1800)
    except RuntimeError as e:
        log(f"matrix-synapse=={SYNAPSE_PIN} could not be installed ({e}); trying the latest")
        run([*pip, "matrix-synapse[postgres,url-preview]"], timeout=1800)
    return python


def use_population(population: Population, workdir: str, info: dict[str, Any]) -> str:
    """A hard-linked copy of the population's media store in ``workdir``; its path."""
    media_store = os.path.join(workdir, "media_store_populated")
    clone_media_store(population, media_store)
    info["populated"] = population.n
    return media_store


def setup_synapse(
    cleanup: Cleanup,
    *,
    venv: str,
    postgres: Postgres,
    keep: bool,
    label: str = "synapse",
    population: Population | None = None,
    extra_config: dict[str, Any] | None = None,
) -> ManagedServer:
    python = ensure_synapse(venv)
    version = run([python, "-c", "import synapse; print(synapse.__version__)"]).stdout.strip()
    workdir = make_workdir(cleanup, label, keep)
    config_path = os.path.join(workdir, "homeserver.yaml")
    port = free_port()
    generate_synapse_config(python, workdir, config_path)
    template = population.template_db if population else None
    dbname = postgres.create_database(cleanup, "bench_synapse", template=template)
    shared_secret = secrets.token_hex(16)
    config = load_yaml(config_path)
    raised = {"per_second": 100000, "burst_count": 1000000}
    config.update(
        {
            "listeners": [
                {
                    "port": port,
                    "tls": False,
                    "type": "http",
                    "x_forwarded": False,
                    "bind_addresses": ["127.0.0.1"],
                    "resources": [{"names": ["client", "federation"], "compress": False}],
                }
            ],
            "database": {"name": "psycopg2", "args": postgres.args(dbname)},
            "media_store_path": os.path.join(workdir, "media_store"),
            "max_upload_size": "100M",
            "registration_shared_secret": shared_secret,
            "report_stats": False,
            "trusted_key_servers": [],
            "suppress_key_server_warning": True,
            "rc_message": raised,
            "rc_registration": raised,
            "rc_login": {"address": raised, "account": raised, "failed_attempts": raised},
            "rc_media_create": raised,
            "max_pending_media_uploads": 10000,
            **PREVIEW_CONFIG,
            **(extra_config or {}),
        }
    )
    dump_yaml(config_path, config)
    info: dict[str, Any] = {"server": "synapse", "version": version, "database": "postgresql"}
    if population is not None:
        config["media_store_path"] = use_population(population, workdir, info)
        dump_yaml(config_path, config)

    def configure(phase: Phase) -> None:
        data = load_yaml(config_path)
        data["dynamic_thumbnails"] = phase.dynamic_thumbnails
        data["enable_authenticated_media"] = phase.enable_authenticated_media
        dump_yaml(config_path, data)

    server = ManagedServer(
        label=label,
        workdir=workdir,
        config_path=config_path,
        port=port,
        command=[python, "-m", "synapse.app.homeserver", "-c", config_path],
        info=info,
        configure_hook=configure,
        ready_path="/_matrix/client/versions",
        start_timeout=300,
    )
    if population is not None:
        server.token = population.bench_token
    log(f"{label}: Synapse {version} on PostgreSQL, config {config_path}")
    return server


def generate_synapse_config(python: str, workdir: str, config_path: str) -> None:
    """Synapse's own generated homeserver.yaml (and signing key) in ``workdir``."""
    run(
        [python, "-m", "synapse.app.homeserver", "--server-name", SERVER_NAME,
         "--config-path", config_path, "--data-directory", workdir,
         "--generate-config", "--report-stats=no"],
        cwd=workdir, timeout=300,
    )  # fmt: skip


def make_synapse_schema(venv: str, postgres: Postgres, dbname: str) -> None:
    """Let Synapse create its whole schema in ``dbname`` and run its
    background updates, as a new Synapse deployment would have it."""
    python = ensure_synapse(venv)
    workdir = tempfile.mkdtemp(prefix=f"bench-synapse-{os.getpid()}-schema")
    try:
        config_path = os.path.join(workdir, "homeserver.yaml")
        generate_synapse_config(python, workdir, config_path)
        config = load_yaml(config_path)
        config["database"] = {"name": "psycopg2", "args": postgres.args(dbname)}
        dump_yaml(config_path, config)
        run(
            [python, "-m", "synapse._scripts.update_synapse_database",
             "--database-config", config_path, "--run-background-updates"],
            cwd=workdir, timeout=600,
        )  # fmt: skip
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def register_synapse_user(server: ManagedServer) -> None:
    """Register the bench user with the shared secret and log in for a token."""
    python = server.command[0]
    password = secrets.token_hex(12)
    script = os.path.join(os.path.dirname(python), "register_new_matrix_user")
    run(
        [script, "-c", server.config_path, "-u", BENCH_USER, "-p", password, "--no-admin",
         server.base_url],
        timeout=120,
    )  # fmt: skip
    status, body = http_json(
        server.base_url + "/_matrix/client/v3/login",
        method="POST",
        body={
            "type": "m.login.password",
            "identifier": {"type": "m.id.user", "user": BENCH_USER},
            "password": password,
        },
        timeout=60,
    )
    if status != 200 or "access_token" not in body:
        raise RuntimeError(f"Synapse login answered {status}: {body}")
    server.token = body["access_token"]


# -- the federation origin ----------------------------------------------------


def setup_origin(cleanup: Cleanup, *, keep: bool) -> OriginInfo:
    """The bench's signed origin on loopback TLS (see benchlib.origin), started."""
    workdir = make_workdir(cleanup, "origin", keep)
    origin = start_origin(workdir, preexec=_die_with_parent)
    proc = origin.proc
    cleanup.add(f"origin pid {proc.pid}", lambda: stop_process(proc, "origin", grace=5))
    log(f"origin {origin.server_name} is up (pid {proc.pid})")
    return origin


# -- the machine's limit for uploads ----------------------------------------------


def setup_rawsink(cleanup: Cleanup, *, keep: bool) -> ManagedServer:
    """The raw upload sink (see benchlib.rawsink), not yet started."""
    workdir = make_workdir(cleanup, "rawsink", keep)
    files = os.path.join(workdir, "files")
    os.makedirs(files)
    port = free_port()
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "rawsink.py")
    return ManagedServer(
        label="limit",
        workdir=workdir,
        config_path="",
        port=port,
        command=[sys.executable, script, files, str(port)],
        info={"server": "raw sink (receive, write, fsync)"},
        ready_path="/",
        start_timeout=30,
    )


# -- nginx ----------------------------------------------------------------


def setup_nginx(
    cleanup: Cleanup, *, keep: bool, small: bytes, large: bytes
) -> ManagedServer | None:
    """nginx (2 workers, sendfile) serving a 4 KiB and a 20 MiB file; None if absent."""
    binary = install_debian_package("nginx", "nginx-light")
    if binary is None:
        return None
    workdir = make_workdir(cleanup, "nginx", keep)
    www = os.path.join(workdir, "www")
    os.makedirs(www)
    with open(os.path.join(www, "small"), "wb") as f:
        f.write(small)
    with open(os.path.join(www, "large"), "wb") as f:
        f.write(large)
    port = free_port()
    config_path = write_nginx_config(
        workdir,
        2,
        f"""\
    sendfile on;
    tcp_nopush on;
    default_type application/octet-stream;
    server {{
        listen 127.0.0.1:{port};
        root {www};
    }}
""",
    )
    server = ManagedServer(
        label="nginx",
        workdir=workdir,
        config_path=config_path,
        port=port,
        command=[binary, "-c", config_path, "-p", workdir],
        info={"server": "nginx", "version": nginx_version(binary)},
        ready_path="/small",
        start_timeout=30,
    )
    return server


def write_nginx_config(workdir: str, workers: int, http_block: str) -> str:
    """Write an nginx.conf for a foreground nginx keeping everything under
    ``workdir``, with ``http_block`` inside its ``http`` block; its path."""
    config_path = os.path.join(workdir, "nginx.conf")
    with open(config_path, "w", encoding="utf-8") as f:
        f.write(
            f"""\
daemon off;
user root;
worker_processes {workers};
pid {workdir}/nginx.pid;
error_log {workdir}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    keepalive_requests 1000000;
    client_body_temp_path {workdir}/client_body;
    proxy_temp_path {workdir}/proxy;
    fastcgi_temp_path {workdir}/fastcgi;
    uwsgi_temp_path {workdir}/uwsgi;
    scgi_temp_path {workdir}/scgi;
{http_block}}}
"""
        )
    return config_path


def nginx_version(binary: str) -> str:
    result = subprocess.run([binary, "-v"], capture_output=True, text=True)
    return (result.stderr or result.stdout).strip().rpartition("/")[2]

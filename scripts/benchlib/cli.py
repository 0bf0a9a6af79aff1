"""Command line of scripts/bench: parse, launch what was asked, run, report."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import sys
import textwrap
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING

from benchlib.bootstrap import ensure_modules
from benchlib.registry import (
    NEEDS_AV,
    NEEDS_HEIF,
    NEEDS_ORIGIN,
    NEEDS_PILLOW,
    SCENARIOS,
    run_scenario,
)
from benchlib.results import (
    JSON_PREFIX,
    LOG_PREFIX,
    RATIO_PREFIX,
    Result,
    print_ratios,
    print_summary,
    print_table,
    ratio_rows,
)
from benchlib.scenarios import Options, Target
from benchlib.scenarios_scale import (
    SYNAPSE_PURGE_ROWS,
    print_population_table,
    tag_population,
    with_purge_plans,
)

if TYPE_CHECKING:
    # For annotations only: the functions below import it where they use it.
    from benchlib import servers


REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Scenarios that need dynamic_thumbnails: true or enable_authenticated_media:
# false; launched servers are restarted with that config for them.
PHASE2 = ("thumbnail_dynamic", "thumbnail_cold", "download_small_legacy")

DESCRIPTION = """\
Benchmark a running Matrix media repository (ours or Synapse) over HTTP, or
start ours (and a stock Synapse, and nginx) and benchmark them side by side.
"""

EPILOG = f"""\
modes:
  scripts/bench --base-url http://127.0.0.1:8008 --server-name NAME --token TOKEN [--pid PID]
      drive a server that is already running (any server: ours or Synapse).
  scripts/bench --start-ours [--postgres]
      generate a config for our server in a temp dir (SQLite, or a fresh PostgreSQL
      database with --postgres), register a user, start it, run, stop it, clean up.
  scripts/bench --compare-synapse
      also install matrix-synapse[postgres]=={"1.163.2"} (or the latest if that pin is
      not available) into its own venv (--synapse-venv), start it on a fresh PostgreSQL
      database with the baseline's settings (cp_min 5, cp_max 10, max_upload_size 100M,
      rate limits raised, max_pending_media_uploads 10000), start ours (on PostgreSQL too,
      unless --ours-sqlite), run every scenario on both, alternating, and print ours/Synapse
      for each figure. --nginx adds nginx serving the same 4 KiB and 20 MiB files (skipped
      if nginx is not installed).

  scripts/bench --hosts 1,2,3 [--hosts-s3-media N]
      for each count: that many instances of ours (each its own media_store_path and
      worker_name) on one fresh PostgreSQL database and one moto S3 server (needs
      moto[server] in --python), behind nginx (round robin), pinned with taskset to
      the same total cores (all cores split evenly where they divide, else all on
      all); runs upload_small, download_small, download_s3 (cold and warm) and
      download_redirect (direct, 307, followed), and prints req/s and p50 against
      one instance.

  Launched servers run in two phases: first with dynamic_thumbnails: false and
  enable_authenticated_media: true (Synapse's defaults) for every scenario except
  {", ".join(PHASE2)}; then restarted (same database and media) with
  dynamic_thumbnails: true and enable_authenticated_media: false for those.
  With upload_large they also run a raw sink ("limit": receive, write, fsync,
  answer; no hashing, no database): the machine's own rate for the same uploads.

scenarios (default: all, in this order):
  upload_small           POST /_matrix/media/v3/upload, 4 KiB unique bodies, 16 connections
  upload_large           the same with 20 MiB bodies (16 random bytes differ), 4 connections; MB/s
  download_small         wrk: GET /_matrix/client/v1/media/download/... of a 4 KiB file, 16 conns
  download_small_legacy  wrk: GET /_matrix/media/v3/download/... (skipped if it answers 404,
                         i.e. the server has enable_authenticated_media: true)
  download_large         wrk: a 20 MiB file, 4 connections; MB/s
  thumbnail_upload       sequential uploads of distinct 3000x2000 JPEGs (~1.5 MB): latency until
                         the upload answered (p50/p95/p99) and until its 320x240 scale thumbnail
                         is served ("ready", polled right after the upload answers)
  thumbnail_dynamic      first GET of a 320x240 scale (and, for other media, crop) thumbnail,
                         sequential; needs dynamic_thumbnails: true on the server
  thumbnail_cached       wrk: the same 320x240 thumbnail (scale, then crop), 16 connections
  thumbnail_cold         200 distinct 3000x2000 JPEGs uploaded, then 16 clients at once each GET
                         the first 176x144 crop thumbnail of the next one (made on demand):
                         thumbnails/s, p50/p95/p99; needs dynamic_thumbnails: true
  remote_fetch           first fetch over federation of media of the bench's origin (loopback
                         TLS, a CA both servers trust): 200 x 4 KiB (8 clients), 50 x 1 MiB and
                         12 x 20 MiB (4 clients), each media asked once: fetches/s, p50/p99, MB/s;
                         needs --start-ours or --compare-synapse
  create_put             POST /_matrix/media/v1/create then PUT 4 KiB, 16 connections: pairs/s,
                         p50 of each step (skipped if /create answers 404/405/M_UNRECOGNIZED)
  preview                GET /_matrix/client/v1/media/preview_url of pages this tool serves on
                         127.0.0.1 (Open Graph tags, prose, a 1200x630 JPEG): [uncached] a new
                         page each request, 4 connections; [cached] one page previewed before,
                         16 connections (skipped if previews are off)
  with --populate only:
  download_populated     GET 4 KiB media, each request another of 10,000 populated ones, 16 conns
  admin_user_media       admin listing of a user's media, pages of 100 at random offsets:
                         newest first, the deepest tenth, by size; 4 conns. First a user with
                         1,000 media at every N (the p99 ratio between populations), then
                         [heavy_*] one with min(100k, N/10) media
  purge_stale            POST media/delete then purge_media_cache of min(100k, N/10) stale local
                         and remote media each (Synapse: 2,000 of them; it deletes one at a
                         time): rows/s, and downloads (8 connections) meanwhile

populated databases:
  scripts/bench --compare-synapse --populate 10000,1000000
      builds once per N (kept in PostgreSQL as the template database benchpop_nN, and a
      media store under the cache directory; rebuilt only when its format changes) N local
      media, N cached remote media, their thumbnails and N/10 users with access tokens, in
      the schema Synapse itself creates; every server of a run gets its own copy of it
      (CREATE DATABASE ... TEMPLATE, a hard-linked media store). Every scenario runs at each
      N, and a table sets each scenario's req/s and p99 at every N side by side.

output:
  a table per server, one line per scenario prefixed "{JSON_PREFIX.strip()} " with every
  figure as JSON (also written to --json-out), and with --compare-synapse the ratios, also
  as "{RATIO_PREFIX.strip()} " lines; a launched server's log errors as "{LOG_PREFIX.strip()} ".
  Errors are non-2xx answers plus connection errors (for wrk: status >= 400 and socket
  errors). Server figures come from /proc/PID (--pid):
  CPU seconds (utime+stime delta), the largest VmRSS sampled every 50 ms during the scenario,
  and VmHWM (the lifetime peak). "gen CPU" is the load generator's own CPU (this process and
  its wrk children) per wall second: 100% is one core; the machine's core count is printed.
  "PG" is the CPU of every PostgreSQL process and "other" that of everything else on the
  machine (kernel I/O threads, and other jobs: noise), both per wall second. Before each
  measured part the tool waits (up to 30 s) until the server is idle. After a launched
  server stops, the ERROR lines and exceptions in its log are counted and printed.

  Launched servers get SIGTERM on exit (also if this tool is killed: PR_SET_PDEATHSIG);
  temp dirs and databases of a killed run are removed by the next launching run.
  All traffic goes to 127.0.0.1; every loop is bounded by --duration and --timeout.

  JPEGs are made once with Pillow and cached under ~/.cache/mediarepo-bench (or
  $MEDIAREPO_BENCH_CACHE); if the running Python lacks Pillow or PyYAML the tool makes a
  venv of its own there and re-runs itself in it.
"""


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = _parser()
    args = parser.parse_args(argv)
    args.scenario_list = _scenario_list(parser, args.scenarios)
    if args.hosts:
        args.host_counts = _host_counts(parser, args)
    launching = args.start_ours or args.compare_synapse or args.hosts
    if not launching and not (args.base_url and args.server_name and args.token):
        parser.error(
            "give --base-url, --server-name and --token for a running server, "
            "or --start-ours / --compare-synapse"
        )
    if not 1 <= args.duration <= 600:
        parser.error("--duration must be between 1 and 600 seconds")
    if args.connections is not None and not 1 <= args.connections <= 1000:
        parser.error("--connections must be between 1 and 1000")
    if not 1 <= args.thumb_count <= 500:
        parser.error("--thumb-count must be between 1 and 500")
    if args.purge_rows is not None and args.purge_rows < 1:
        parser.error("--purge-rows must be at least 1")
    args.populations = _populations(parser, args) if args.populate else []
    if args.populate and args.explain:
        args.scenario_list = []
    return args


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="scripts/bench",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    target = parser.add_argument_group("a running server")
    target.add_argument("--base-url", help="e.g. http://127.0.0.1:8008")
    target.add_argument("--server-name", help="the server_name in its mxc:// URIs")
    target.add_argument("--token", help="an access token of a user on it")
    target.add_argument(
        "--pid",
        type=int,
        help="its process id, for CPU and memory figures (its child processes included)",
    )
    target.add_argument("--label", default="server", help="its name in the output")

    launch = parser.add_argument_group("launching servers")
    launch.add_argument("--start-ours", action="store_true", help="start our server and run")
    launch.add_argument("--postgres", action="store_true", help="ours on PostgreSQL, not SQLite")
    launch.add_argument(
        "--ours-workers",
        type=int,
        default=1,
        help="run ours with --workers N (server figures sum the worker processes)",
    )
    launch.add_argument(
        "--compare-synapse",
        action="store_true",
        help="start Synapse and ours (on PostgreSQL), run both, print ratios",
    )
    launch.add_argument(
        "--ours-sqlite", action="store_true", help="with --compare-synapse: ours on SQLite"
    )
    launch.add_argument("--nginx", action="store_true", help="also nginx serving static files")
    launch.add_argument(
        "--hosts",
        help="instance counts, e.g. 1,2,3: that many instances on one PostgreSQL and one "
        "moto S3 behind nginx, the cores split between them (see docs/deployment.rst)",
    )
    launch.add_argument(
        "--hosts-s3-media",
        type=int,
        default=1500,
        help="with --hosts: media read once each in download_s3 (%(default)s)",
    )
    launch.add_argument(
        "--python",
        help="Python with mediarepo installed (default: .venv/bin/python of the repo, "
        "else /work/venv/bin/python, else this Python)",
    )
    launch.add_argument(
        "--synapse-venv",
        default=os.path.join(
            os.environ.get("MEDIAREPO_BENCH_CACHE")
            or os.path.expanduser("~/.cache/mediarepo-bench"),
            "synapse-venv",
        ),
        help="virtualenv for Synapse, made if absent (default: %(default)s)",
    )
    launch.add_argument("--pg-host", default="127.0.0.1")
    launch.add_argument("--pg-port", type=int, default=5432)
    launch.add_argument("--pg-user", default="postgres")
    launch.add_argument("--keep", action="store_true", help="keep the servers' temp dirs")

    run = parser.add_argument_group("what to run")
    run.add_argument(
        "--scenarios",
        default="all",
        help="comma-separated scenario names (see below), default all",
    )
    run.add_argument(
        "--duration", type=float, default=10.0, help="seconds per throughput scenario (10)"
    )
    run.add_argument("--connections", type=int, help="override every scenario's connection count")
    run.add_argument("--wrk-threads", type=int, default=2, help="wrk threads (2)")
    run.add_argument(
        "--thumb-count",
        type=int,
        default=20,
        help="JPEGs per thumbnail_upload run and per thumbnail_dynamic method (20)",
    )
    run.add_argument("--timeout", type=float, default=60.0, help="per-request timeout, s (60)")
    run.add_argument("--json-out", help="also write the JSON lines to this file")
    run.add_argument(
        "--explain",
        action="store_true",
        help="with --populate: print EXPLAIN ANALYZE of the storage queries on a copy of "
        "each populated database (with our indexes) instead of running scenarios",
    )
    run.add_argument(
        "--populate",
        help="comma-separated row counts N: run every scenario on a database populated "
        "with N media (see below); needs --compare-synapse or --start-ours --postgres",
    )
    run.add_argument(
        "--purge-rows",
        type=int,
        help="with --populate: purge_stale takes at most this many of the stale media of "
        "each kind from ours (default: all of them, min(100k, N/10)) and from Synapse "
        f"(default {SYNAPSE_PURGE_ROWS})",
    )
    return parser


def _scenario_list(parser: argparse.ArgumentParser, scenarios: str) -> list[str]:
    """The scenarios named, in SCENARIOS' order."""
    if scenarios == "all":
        return list(SCENARIOS)
    named = [s.strip() for s in scenarios.split(",") if s.strip()]
    unknown = [s for s in named if s not in SCENARIOS]
    if unknown:
        parser.error(f"unknown scenarios: {', '.join(unknown)}; known: {', '.join(SCENARIOS)}")
    return [s for s in SCENARIOS if s in named]


def _host_counts(parser: argparse.ArgumentParser, args: argparse.Namespace) -> list[int]:
    try:
        counts = [int(n) for n in args.hosts.split(",")]
    except ValueError:
        parser.error("--hosts takes instance counts such as 1,2,3")
    if not all(1 <= n <= 8 for n in counts) or not 1 <= args.hosts_s3_media <= 20000:
        parser.error("--hosts counts must be 1 to 8, --hosts-s3-media 1 to 20000")
    return counts


def _populations(parser: argparse.ArgumentParser, args: argparse.Namespace) -> list[int]:
    try:
        populations = [int(n) for n in args.populate.split(",")]
    except ValueError:
        parser.error("--populate takes comma-separated row counts, e.g. 10000,1000000")
    if not all(1000 <= n <= 10_000_000 for n in populations):
        parser.error("--populate counts must be between 1,000 and 10,000,000")
    if not (args.compare_synapse and not args.ours_sqlite) and not (
        args.start_ours and args.postgres
    ):
        parser.error("--populate needs PostgreSQL: --compare-synapse or --start-ours --postgres")
    return populations


def default_python() -> str:
    for candidate in (os.path.join(REPO, ".venv", "bin", "python"), "/work/venv/bin/python"):
        if os.path.exists(candidate):
            return candidate
    return sys.executable


class Output:
    def __init__(self, json_out: str | None) -> None:
        self.results: list[Result] = []
        self._file: IO[str] | None = open(json_out, "w", encoding="utf-8") if json_out else None

    def add(self, results: list[Result]) -> None:
        for result in results:
            self.results.append(result)
            line = JSON_PREFIX + result.to_json()
            print(line, flush=True)
            if self._file is not None:
                print(line, file=self._file, flush=True)
            summary = (
                f"{result.rps:.1f} req/s, p50 {result.p50_ms} ms, errors {result.errors}"
                if result.status == "ok" and result.rps is not None
                else f"{result.status}: {result.reason}"
            )
            print(f"[bench] {result.server} {result.key}: {summary}", file=sys.stderr, flush=True)

    def write_raw(self, line: str) -> None:
        print(line, flush=True)
        if self._file is not None:
            print(line, file=self._file, flush=True)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


def log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


async def run_on_targets(
    scenarios: Sequence[str], targets: Sequence[Target], opts: Options, output: Output
) -> None:
    """Each scenario on every target, alternating which target goes first."""
    for index, name in enumerate(scenarios):
        order = list(targets) if index % 2 == 0 else list(reversed(targets))
        for target in order:
            if target.static_paths and name not in ("download_small", "download_large"):
                continue
            if target.only_scenarios is not None and name not in target.only_scenarios:
                continue
            log(f"{target.label}: {name}")
            output.add(tag_population(await run_scenario(name, target, opts), opts.population))


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    launching = args.start_ours or args.compare_synapse or args.hosts
    ensure_modules(_needed_modules(args, launching))

    opts = Options(
        duration=args.duration,
        connections=args.connections,
        wrk_threads=args.wrk_threads,
        thumb_count=args.thumb_count,
        request_timeout=args.timeout,
        log=log,
    )
    log(
        f"{os.cpu_count()} cores, {platform.python_implementation()} {platform.python_version()}, "
        f"load average {os.getloadavg()[0]:.2f}; "
        + (
            f"instances: {args.hosts} (see benchlib/scenarios_hosts.py)"
            if args.hosts
            else f"scenarios: {', '.join(args.scenario_list)}"
        )
    )
    if args.nginx and not launching:
        log("--nginx is used only with --start-ours or --compare-synapse; ignored")
    output = Output(args.json_out)
    try:
        asyncio.run(_run(args, launching, opts, output))
    except KeyboardInterrupt:
        log("interrupted; stopping")
        return 130
    except RuntimeError as e:
        log(f"error: {e}")
        return 2
    finally:
        report(output, args)
        output.close()
    failed = [r for r in output.results if r.status == "failed"]
    return 1 if failed else 0


def _needed_modules(args: argparse.Namespace, launching: bool) -> list[str]:
    """The modules this run imports that the running Python may lack."""
    scenarios = set(args.scenario_list)
    wanted = {
        "yaml": launching,
        "PIL": bool(scenarios & (NEEDS_PILLOW | NEEDS_HEIF | NEEDS_AV)),
        "pillow_heif": bool(scenarios & NEEDS_HEIF),
        "av": bool(scenarios & NEEDS_AV),
        "psycopg2": bool(args.populations),
        "cryptography": bool(launching and scenarios & NEEDS_ORIGIN),
    }
    return [module for module, needed in wanted.items() if needed]


async def _run(args: argparse.Namespace, launching: bool, opts: Options, output: Output) -> None:
    """Several instances (--hosts), servers launched here, or the one given."""
    if args.hosts:
        from benchlib.scenarios_hosts import run_hosts
        from benchlib.servers import Postgres

        await run_hosts(
            args.host_counts,
            python=args.python or default_python(),
            postgres=Postgres(args.pg_host, args.pg_port, args.pg_user),
            keep=args.keep,
            opts=opts,
            s3_count=args.hosts_s3_media,
            emit=output.add,
        )
    elif launching:
        await run_launched(args, opts, output)
    else:
        target = Target(
            label=args.label,
            base_url=args.base_url,
            server_name=args.server_name,
            token=args.token,
            pid=args.pid,
            # A server's child processes are its workers.
            include_children=True,
        )
        await run_on_targets(args.scenario_list, [target], opts, output)


async def run_launched(args: argparse.Namespace, opts: Options, output: Output) -> None:
    from benchlib import servers

    servers.install_signal_handlers()
    for n in args.populations or [None]:
        # Each population's servers, databases and media stores go before the next.
        cleanup = servers.Cleanup()
        try:
            if n is not None:
                opts.population = await asyncio.to_thread(populated, args, n)
            if args.explain:
                await asyncio.to_thread(explain_population, args, opts.population, cleanup)
                continue
            await _run_launched(args, opts, output, cleanup)
        finally:
            await asyncio.to_thread(cleanup.run)


def explain_population(args: argparse.Namespace, population: object, cleanup: object) -> None:
    from benchlib import explain, servers

    assert isinstance(population, servers.Population) and isinstance(cleanup, servers.Cleanup)
    postgres = servers.Postgres(args.pg_host, args.pg_port, args.pg_user)
    dbname = postgres.create_database(cleanup, "bench_ours", template=population.template_db)
    explain.create_our_indexes(postgres.dsn(), dbname)
    print(f"\n== EXPLAIN ANALYZE at {population.n} rows", flush=True)
    explain.print_explained(explain.explain(postgres.dsn(), dbname, population))


def populated(args: argparse.Namespace, n: int) -> object:
    from benchlib import populate, servers

    postgres = servers.Postgres(args.pg_host, args.pg_port, args.pg_user)
    population = populate.populate(
        n=n,
        cache=servers.cache_base(),
        psql_dsn=postgres.dsn(),
        make_synapse_schema=lambda db: servers.make_synapse_schema(args.synapse_venv, postgres, db),
        create_database=postgres.create_empty,
        drop_database=postgres.drop,
        database_exists=postgres.exists,
    )
    return with_purge_plans(population, postgres.dsn(), args.purge_rows)


@dataclass
class _Launched:
    """The servers one population's run launched (and how to stop them)."""

    cleanup: servers.Cleanup
    postgres: servers.Postgres
    managed: list[servers.ManagedServer]
    # nginx serving static files beside the servers' downloads, if asked for.
    nginx: servers.ManagedServer | None
    # The machine's own limit for 20 MiB uploads, beside the servers' figures.
    rawsink: servers.ManagedServer | None


async def _run_launched(
    args: argparse.Namespace, opts: Options, output: Output, cleanup: object
) -> None:
    from benchlib import servers

    assert isinstance(cleanup, servers.Cleanup)
    launched = await _launch(args, opts, output, cleanup)
    phases = [
        (
            servers.Phase("defaults", dynamic_thumbnails=False, enable_authenticated_media=True),
            [s for s in args.scenario_list if s not in PHASE2],
        ),
        (
            servers.Phase("dynamic", dynamic_thumbnails=True, enable_authenticated_media=False),
            [s for s in args.scenario_list if s in PHASE2],
        ),
    ]
    for phase, scenarios in phases:
        if scenarios:
            await _run_phase(phase, scenarios, launched, args, opts, output)
    for server in launched.managed:
        server.stop()
        errors = scan_log_for_errors(server)
        output.write_raw(LOG_PREFIX + json.dumps({"server": server.label, "log_errors": errors}))
        if errors:
            log(f"{server.label}: errors in its log (counted, IDs masked):")
            for line in errors[:15]:
                print(f"    {line}", file=sys.stderr)


async def _launch(
    args: argparse.Namespace, opts: Options, output: Output, cleanup: servers.Cleanup
) -> _Launched:
    """Synapse (with --compare-synapse) and ours, the origin peer, nginx and
    the raw upload sink, as the scenarios need them; not started yet."""
    from benchlib import servers
    from benchlib.scenarios import LARGE_SIZE, SMALL_SIZE

    postgres = servers.Postgres(args.pg_host, args.pg_port, args.pg_user)
    servers.sweep_stale_workdirs()
    if args.compare_synapse or args.postgres:
        postgres.sweep_stale()
    peer_settings: dict[str, object] = {}
    if set(args.scenario_list) & NEEDS_ORIGIN:
        origin = servers.setup_origin(cleanup, keep=args.keep)
        opts.origin = origin.server_name
        peer_settings = origin.peer_settings()
    managed: list[servers.ManagedServer] = []
    population = opts.population
    assert population is None or isinstance(population, servers.Population)
    if args.compare_synapse:
        synapse = await asyncio.to_thread(
            servers.setup_synapse, cleanup, venv=args.synapse_venv, postgres=postgres,
            keep=args.keep, population=population, extra_config=peer_settings,
        )  # fmt: skip
        managed.append(synapse)
    ours_on_pg = args.postgres or (args.compare_synapse and not args.ours_sqlite)
    ours = await asyncio.to_thread(
        servers.setup_ours, cleanup, python=args.python or default_python(),
        postgres=postgres if ours_on_pg else None, keep=args.keep, workers=args.ours_workers,
        population=population, extra_config=peer_settings,
    )  # fmt: skip
    managed.append(ours)

    nginx: servers.ManagedServer | None = None
    wants_downloads = {"download_small", "download_large"} & set(args.scenario_list)
    if args.nginx and wants_downloads:
        nginx = servers.setup_nginx(
            cleanup, keep=args.keep, small=os.urandom(SMALL_SIZE), large=os.urandom(LARGE_SIZE)
        )
        if nginx is None:
            output.add(
                [
                    Result("nginx", name, status="skipped", reason="nginx is not installed")
                    for name in sorted(wants_downloads)
                ]
            )
    rawsink = (
        servers.setup_rawsink(cleanup, keep=args.keep)
        if "upload_large" in args.scenario_list
        else None
    )
    return _Launched(cleanup, postgres, managed, nginx, rawsink)


async def _run_phase(
    phase: servers.Phase,
    scenarios: list[str],
    launched: _Launched,
    args: argparse.Namespace,
    opts: Options,
    output: Output,
) -> None:
    """The scenarios of one phase, on every server restarted with its config."""
    log(
        f"phase {phase.name}: dynamic_thumbnails {phase.dynamic_thumbnails}, "
        f"enable_authenticated_media {phase.enable_authenticated_media}: {', '.join(scenarios)}"
    )
    targets = await _start_servers(phase, scenarios, launched, args, output)
    cleanup, nginx, rawsink = launched.cleanup, launched.nginx, launched.rawsink
    if nginx is not None and phase.name == "defaults":
        nginx.start(cleanup)
        static = nginx.target()
        static.include_children = True
        static.static_paths = {"small": "/small", "large": "/large"}
        targets.append(static)
    if rawsink is not None and phase.name == "defaults":
        rawsink.start(cleanup)
        limit = rawsink.target()
        limit.only_scenarios = frozenset({"upload_large"})
        targets.append(limit)
    await run_on_targets(scenarios, targets, opts, output)
    if nginx is not None:
        nginx.stop()
    if rawsink is not None:
        rawsink.stop()
    for server in launched.managed:
        if server.proc is not None and server.proc.poll() is not None:
            log(f"{server.label} DIED (exit {server.proc.returncode}):\n{server.log_tail()}")


async def _start_servers(
    phase: servers.Phase,
    scenarios: list[str],
    launched: _Launched,
    args: argparse.Namespace,
    output: Output,
) -> list[Target]:
    """The launched servers restarted with the phase's config, as targets;
    one that does not start has the phase's scenarios failed."""
    from benchlib import servers

    targets: list[Target] = []
    for server in launched.managed:
        server.stop()
        server.configure(phase)
        try:
            server.start(launched.cleanup)  # from the main thread: see _die_with_parent
            if not server.token and server.info.get("server") == "synapse":
                await asyncio.to_thread(servers.register_synapse_user, server)
        except RuntimeError as e:
            log(f"{server.label} could not be started: {e}")
            server.stop()
            reason = f"server did not start: {str(e).splitlines()[0]}"
            output.add([Result(server.label, s, status="failed", reason=reason)
                        for s in scenarios])  # fmt: skip
            continue
        target = server.target()
        if args.compare_synapse or args.postgres:
            target.settle = launched.postgres.checkpoint
        targets.append(target)
    return targets


def scan_log_for_errors(server: object) -> list[str]:
    """ERROR/CRITICAL log lines and the exceptions of tracebacks in a server's
    logs, with media IDs and numbers masked, counted: "N x message"."""
    from benchlib.servers import ManagedServer

    assert isinstance(server, ManagedServer)
    paths = [server.log_path, os.path.join(server.workdir, "homeserver.log")]
    counts: Counter[str] = Counter()
    for path in paths:
        try:
            with open(path, encoding="utf-8", errors="replace") as f:
                lines = f.read().splitlines()
        except OSError:
            continue
        in_traceback = False
        for line in lines:
            if line.startswith("Traceback"):
                in_traceback = True
                continue
            if in_traceback:
                if line.startswith((" ", "\t")) or not line.strip():
                    continue
                in_traceback = False
                counts[f"exception: {_mask(line)}"] += 1
            for level in (" ERROR ", " CRITICAL "):
                if level in line:
                    counts[f"{level.strip()}: {_mask(line.split(level, 1)[1])}"] += 1
    return [f"{n} x {message}" for message, n in counts.most_common()]


def _mask(text: str) -> str:
    text = re.sub(r"/[A-Za-z]{24}\b", "/{media_id}", text)
    text = re.sub(r"\b\d+\b", "N", text)
    return text.strip(" -")[:300]


def report(output: Output, args: argparse.Namespace) -> None:
    results = output.results
    if not results:
        return
    out = sys.stdout
    labels = list(dict.fromkeys(r.server for r in results))
    for label in labels:
        rows = [r for r in results if r.server == label]
        info = next((r.server_info for r in rows if r.server_info), {})
        described = ", ".join(
            f"{k} {v}" for k, v in info.items() if k in ("server", "version", "database")
        )
        print_table(f"{label} ({described})" if described else label, rows, out)
    print_population_table(results, out)
    _report_generator_cpu(results, out)
    if "ours" in labels:
        for other in labels:
            if other != "ours":
                _report_ratios(output, other, out)
    if args.hosts:
        from benchlib.scenarios_hosts import print_scaling

        print_scaling(results, out)
    _report_not_run(results, out)


def _report_generator_cpu(results: list[Result], out: IO[str]) -> None:
    ok = [r for r in results if r.status == "ok" and r.gen_cpu_share is not None]
    if ok:
        worst = max(ok, key=lambda r: r.gen_cpu_share or 0.0)
        print(
            f"\nload generator CPU: at most {(worst.gen_cpu_share or 0) * 100:.0f}% of one core "
            f"({worst.server} {worst.key}) on a {os.cpu_count()}-core machine",
            file=out,
        )


def _report_ratios(output: Output, other: str, out: IO[str]) -> None:
    """Ours against ``other``: the summary, every figure's ratio, and those
    ratios as JSON lines."""
    ours = [r for r in output.results if r.server == "ours"]
    theirs = [r for r in output.results if r.server == other]
    rows_ratio = ratio_rows(ours, theirs)
    if not rows_ratio:
        return
    print_summary(ours, theirs, other, out)
    print_ratios(f"every figure: ours / {other}", rows_ratio, other, out)
    for row in rows_ratio:
        output.write_raw(RATIO_PREFIX + json.dumps({"vs": other, **row}))


def _report_not_run(results: list[Result], out: IO[str]) -> None:
    """What was skipped or failed, and samples of the errors seen."""
    skipped = [r for r in results if r.status != "ok"]
    if skipped:
        print("\nnot run:", file=out)
        for r in skipped:
            print(f"  {r.server} {r.key}: {r.status}: {r.reason}", file=out)
    samples = [r for r in results if r.error_samples]
    if samples:
        print("\nerror samples:", file=out)
        for r in samples:
            for sample in r.error_samples:
                print(textwrap.shorten(f"  {r.server} {r.key}: {sample}", 400), file=out)

"""A populated database for ``scripts/bench --populate N``: N local media,
N cached remote media, their thumbnails, users with access tokens, in
Synapse's own schema on PostgreSQL, and a media store holding files for the
rows the scenarios touch.

It is built once per N into a template database (``benchpop_nN``) and a
media store directory under the cache; each run then clones the database
(``CREATE DATABASE ... TEMPLATE``) and hard-links the media store for every
server it starts, so no run re-populates and no run sees another's changes.

Rows are written with COPY. Sizes in the rows are realistic (photos of
50 KB-3 MB, videos up to 50 MB, ...); files on disk are few distinct small
ones hard-linked many times (Synapse's layout allows it), and exist only
for the rows scenarios read or delete: the stale media a purge takes and a
sample of fresh media that is downloaded.
"""

from __future__ import annotations

import io
import json
import os
import random
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

# Bumped whenever what is populated changes: an older template is rebuilt.
FORMAT = 4
DAY_MS = 86_400_000
SERVER_NAME = "bench.test"
BENCH_USER = f"@bench:{SERVER_NAME}"
HEAVY_USER = f"@heavy:{SERVER_NAME}"
# A user with the same number of media at every population, spread over the
# table as an ordinary user's uploads are: how the admin listing's time
# follows the table's size alone (the heavy user's media grow with N).
LISTED_USER = f"@listed:{SERVER_NAME}"
LISTED_COUNT = 1000
# Fresh media with files on disk and an exact small size in its row, for downloads.
SAMPLE_SIZE = 10_000
SAMPLE_LENGTH = 4096
# Thumbnails each image has (Synapse's default thumbnail_sizes, but 800x600).
THUMBNAIL_SIZES = ((32, 32, "crop"), (96, 96, "crop"), (320, 240, "scale"), (640, 480, "scale"))
# Distinct files each kind of hard link points at: ext4 allows 65,000
# links to one inode, and the template and every clone add theirs.
LINK_SOURCES = 256
CHUNK_ROWS = 50_000

_LETTERS = bytes(
    (b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz" * 5)[:256]
)  # byte -> letter, 256 entries


def log(message: str) -> None:
    print(f"[bench] populate: {message}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Population:
    """What a populated template holds, as the scenarios need to know it."""

    n: int
    format: int
    template_db: str
    media_store: str
    now_ms: int
    # Media not read since this is stale: what a purge takes.
    stale_before_ts: int
    stale_local: int
    stale_remote: int
    heavy_user: str
    heavy_count: int
    listed_user: str
    listed_count: int
    users: int
    bench_token: str
    sample_media: list[str]
    populate_seconds: float
    # Set for each run (not stored): server label -> its purge plan.
    purge_plans: dict[str, PurgePlan] | None = None

    @property
    def sample_path(self) -> str:
        return os.path.join(os.path.dirname(self.media_store), "population.json")


def population_dir(cache: str, n: int) -> str:
    return os.path.join(cache, "populated", f"n{n}")


def _ids(rng: random.Random, count: int, length: int = 24) -> list[str]:
    raw = rng.randbytes(count * length).translate(_LETTERS).decode("ascii")
    return [raw[i * length : (i + 1) * length] for i in range(count)]


def _split(file_id: str) -> tuple[str, str, str]:
    return file_id[0:2], file_id[2:4], file_id[4:]


def _log_uniform(rng: random.Random, low: int, high: int) -> int:
    return int(low * (high / low) ** rng.random())


# (media type, share, smallest and largest length, has thumbnails)
_MEDIA_KINDS = (
    ("image/jpeg", 0.50, 50_000, 3_000_000, True),
    ("image/png", 0.15, 5_000, 2_000_000, True),
    ("video/mp4", 0.10, 500_000, 50_000_000, False),
    ("application/pdf", 0.10, 20_000, 10_000_000, False),
    ("application/octet-stream", 0.15, 1_000, 5_000_000, False),
)


def _kind(rng: random.Random) -> tuple[str, int, bool]:
    x = rng.random()
    for media_type, share, low, high, thumbs in _MEDIA_KINDS:
        if x < share:
            return media_type, _log_uniform(rng, low, high), thumbs
        x -= share
    media_type, _, low, high, thumbs = _MEDIA_KINDS[-1]
    return media_type, _log_uniform(rng, low, high), thumbs


class _CopyBuffer:
    """Rows gathered as COPY text and sent ``CHUNK_ROWS`` at a time."""

    def __init__(self, cursor: Any, table: str, columns: tuple[str, ...]) -> None:
        self._cursor = cursor
        self._sql = f"COPY {table} ({', '.join(columns)}) FROM STDIN"
        self._lines: list[str] = []
        self.rows = 0

    def add(self, *values: object) -> None:
        self.add_line("\t".join(_copy_value(v) for v in values))

    def add_line(self, line: str) -> None:
        """A row already in COPY's text format (the hot loops build their own)."""
        self._lines.append(line)
        if len(self._lines) >= CHUNK_ROWS:
            self.flush()

    def flush(self) -> None:
        if self._lines:
            self._cursor.copy_expert(self._sql, io.StringIO("\n".join(self._lines) + "\n"))
            self.rows += len(self._lines)
            self._lines = []


def _copy_value(value: object) -> str:
    if value is None:
        return "\\N"
    if value is True:
        return "t"
    if value is False:
        return "f"
    return str(value)


@dataclass
class _Files:
    """Hard links to a few distinct files: content and thumbnails."""

    root: str
    links: int = 0

    def __post_init__(self) -> None:
        sources = os.path.join(self.root, "..", "sources")
        os.makedirs(sources, exist_ok=True)
        self._content: list[str] = []
        self._thumbs: list[str] = []
        for i in range(LINK_SOURCES):
            for kind, size, into in (
                ("c", SAMPLE_LENGTH, self._content),
                ("t", 2048, self._thumbs),
            ):
                path = os.path.abspath(os.path.join(sources, f"{kind}{i}"))
                if not os.path.exists(path):
                    with open(path, "wb") as f:
                        f.write(os.urandom(size))
                into.append(path)
        self._made_dirs: set[str] = set()

    def _link(self, source: str, relative: str) -> None:
        path = os.path.join(self.root, relative)
        parent = os.path.dirname(path)
        if parent not in self._made_dirs:
            os.makedirs(parent, exist_ok=True)
            self._made_dirs.add(parent)
        os.link(source, path)
        self.links += 1

    def content(self, relative: str) -> None:
        self._link(self._content[self.links % LINK_SOURCES], relative)

    def thumbnail(self, relative: str) -> None:
        self._link(self._thumbs[self.links % LINK_SOURCES], relative)


def _thumb_name(width: int, height: int, method: str) -> str:
    return f"{width}-{height}-image-jpeg-{method}"


def populate(
    *,
    n: int,
    cache: str,
    psql_dsn: dict[str, Any],
    make_synapse_schema: Callable[[str], None],
    create_database: Callable[[str], None],
    drop_database: Callable[[str], None],
    database_exists: Callable[[str], bool],
) -> Population:
    """The population of ``n`` rows: the existing template if it is complete
    and of this format, else a new one built now."""
    directory = population_dir(cache, n)
    meta_path = os.path.join(directory, "population.json")
    template_db = f"benchpop_n{n}"
    try:
        with open(meta_path, encoding="utf-8") as f:
            found = Population(**json.load(f))
        if found.format == FORMAT and database_exists(template_db):
            made = f"made in {found.populate_seconds:.0f} s"
            log(f"reusing {template_db} and {found.media_store} ({made})")
            return found
    except (OSError, ValueError, TypeError):
        pass
    start = time.monotonic()
    building = f"benchpop_build_{os.getpid()}"
    drop_database(building)
    drop_database(template_db)
    shutil.rmtree(directory, ignore_errors=True)
    media_store = os.path.join(directory, "media_store")
    os.makedirs(media_store)
    create_database(building)
    log(f"Synapse creates its schema in {building}")
    make_synapse_schema(building)
    t_schema = time.monotonic()
    import psycopg2

    conn = psycopg2.connect(**psql_dsn, dbname=building)
    try:
        with conn.cursor() as cursor:
            # COPY into tables without their indexes, which are then built
            # once (from Synapse's own definitions): several times faster.
            indexes = _secondary_indexes(cursor)
            for name, _ in indexes:
                cursor.execute(f"DROP INDEX {name}")
            population = _fill(cursor, n, template_db, media_store)
            log(f"rows copied in {time.monotonic() - t_schema:.0f} s; building the indexes")
            for _, definition in indexes:
                cursor.execute(definition)
        conn.commit()
    finally:
        conn.close()
    t_rows = time.monotonic()
    log(f"rows and indexes in {t_rows - t_schema:.0f} s; VACUUM ANALYZE")
    conn = psycopg2.connect(**psql_dsn, dbname=building)
    try:
        conn.autocommit = True
        with conn.cursor() as cursor:
            cursor.execute("VACUUM ANALYZE")
            cursor.execute("CHECKPOINT")
    finally:
        conn.close()
    rename = psycopg2.connect(**psql_dsn, dbname="postgres")
    try:
        rename.autocommit = True
        with rename.cursor() as cursor:
            cursor.execute(f"ALTER DATABASE {building} RENAME TO {template_db}")
    finally:
        rename.close()
    elapsed = time.monotonic() - start
    population = Population(**{**asdict(population), "populate_seconds": elapsed})
    with open(meta_path, "w", encoding="utf-8") as f:
        json.dump({**asdict(population), "purge_plans": None}, f)
    log(
        f"{n} rows populated in {elapsed:.0f} s (Synapse's schema {t_schema - start:.0f} s,"
        f" rows, files and indexes {t_rows - t_schema:.0f} s,"
        f" VACUUM ANALYZE {time.monotonic() - t_rows:.0f} s)"
    )
    return population


_FILLED_TABLES = (
    "users",
    "access_tokens",
    "local_media_repository",
    "local_media_repository_thumbnails",
    "remote_media_cache",
    "remote_media_cache_thumbnails",
)


def _secondary_indexes(cursor: Any) -> list[tuple[str, str]]:
    """(name, CREATE statement) of the indexes of the filled tables that
    back no constraint."""
    cursor.execute(
        "SELECT i.indexname, i.indexdef FROM pg_indexes AS i WHERE i.schemaname = 'public'"
        " AND i.tablename = ANY(%s)"
        " AND NOT EXISTS (SELECT 1 FROM pg_constraint AS c WHERE c.conname = i.indexname)",
        (list(_FILLED_TABLES),),
    )
    return [(row[0], row[1]) for row in cursor.fetchall()]


def _content_hash(rng: random.Random, hashes: list[str]) -> str:
    """A new media's SHA-256: now and then a copy of earlier content
    (forwarded images, stickers), among the first 10,000 ``hashes``."""
    if hashes and rng.random() < 0.05:
        return rng.choice(hashes)
    sha256 = rng.randbytes(32).hex()
    if len(hashes) < 10_000:
        hashes.append(sha256)
    return sha256


def _fill_remote(
    cursor: Any, rng: random.Random, n: int, stale_count: int, stale_before: int, files: _Files
) -> None:
    """``n`` cached remote media, the first ``stale_count`` of them stale
    and with files on disk, and their thumbnails."""
    remote = _CopyBuffer(
        cursor,
        "remote_media_cache",
        ("media_origin", "media_id", "media_type", "created_ts", "upload_name", "media_length",
         "filesystem_id", "last_access_ts", "quarantined_by", "authenticated", "sha256"),
    )  # fmt: skip
    remote_thumbs = _CopyBuffer(
        cursor,
        "remote_media_cache_thumbnails",
        ("media_origin", "media_id", "thumbnail_width", "thumbnail_height", "thumbnail_method",
         "thumbnail_type", "thumbnail_length", "filesystem_id"),
    )  # fmt: skip
    origins = [f"remote{k}.test" for k in range(max(10, n // 500))]
    remote_ids = _ids(rng, n)
    filesystem_ids = _ids(rng, n)
    for i in range(n):
        stale = i < stale_count
        origin = origins[int(rng.random() ** 2 * len(origins))]
        if stale:
            created = stale_before - rng.randrange(6 * DAY_MS, 300 * DAY_MS)
        else:
            created = stale_before + rng.randrange(1, 690 * DAY_MS)
        last_access = created + rng.randrange(0, 5 * DAY_MS)
        media_type, length, thumbs = _kind(rng)
        filesystem_id = filesystem_ids[i]
        remote.add_line(
            f"{origin}\t{remote_ids[i]}\t{media_type}\t{created}\t\\N\t{length}"
            f"\t{filesystem_id}\t{last_access}\t\\N\tt\t{rng.randbytes(32).hex()}"
        )
        if stale:
            files.content(os.path.join("remote_content", origin, *_split(filesystem_id)))
        if thumbs:
            for width, height, method in THUMBNAIL_SIZES:
                remote_thumbs.add_line(
                    f"{origin}\t{remote_ids[i]}\t{width}\t{height}\t{method}\timage/jpeg"
                    f"\t{_log_uniform(rng, 800, 60_000)}\t{filesystem_id}"
                )
                if stale:
                    name = _thumb_name(width, height, method)
                    files.thumbnail(
                        os.path.join("remote_thumbnail", origin, *_split(filesystem_id), name)
                    )
    remote.flush()
    remote_thumbs.flush()
    log(
        f"{remote.rows} remote media, {remote_thumbs.rows} remote thumbnails;"
        f" {files.links} files linked"
    )


class _Owners:
    """Who made the i-th local media, and when: the stale media first (by
    anyone), then the heavy user's, then the rest, among which the listed
    user's every stride-th row."""

    def __init__(
        self,
        rng: random.Random,
        user_ids: list[str],
        stale_count: int,
        heavy_count: int,
        stale_before: int,
        n: int,
    ) -> None:
        self._rng = rng
        self._user_ids = user_ids
        self._stale_count = stale_count
        self._stale_before = stale_before
        self._listed_first = stale_count + heavy_count
        self._listed_stride = max(1, (n - self._listed_first) // LISTED_COUNT)
        self._listed_count = 0

    def of(self, i: int) -> tuple[int, str]:
        """(created_ts, user ID) of the i-th media, i counting up from 0."""
        rng = self._rng
        if i < self._stale_count:
            return self._stale_before - rng.randrange(6 * DAY_MS, 300 * DAY_MS), self._anyone()
        created = self._stale_before + rng.randrange(1, 690 * DAY_MS)
        if i < self._listed_first:
            return created, HEAVY_USER
        listed_turn = (i - self._listed_first) % self._listed_stride == 0
        if listed_turn and self._listed_count < LISTED_COUNT:
            self._listed_count += 1
            return created, LISTED_USER
        return created, self._anyone()

    @property
    def listed_count(self) -> int:
        """How many of the media so far are the listed user's."""
        return self._listed_count

    def _anyone(self) -> str:
        # A few users make most media (a cube of a uniform variable).
        return self._user_ids[int(self._rng.random() ** 3 * len(self._user_ids))]


def _fill(cursor: Any, n: int, template_db: str, media_store: str) -> Population:
    rng = random.Random(n)
    now_ms = int(time.time() * 1000)
    stale_before = now_ms - 700 * DAY_MS
    stale_count = min(100_000, n // 10)
    heavy_count = min(100_000, n // 10)
    user_count = max(100, n // 10)
    files = _Files(media_store)

    users = _CopyBuffer(
        cursor, "users", ("name", "creation_ts", "admin", "is_guest", "deactivated")
    )
    tokens = _CopyBuffer(cursor, "access_tokens", ("id", "user_id", "token"))
    bench_token = "syt_bench_" + _ids(rng, 1, 30)[0]
    user_ids = [f"@user{i}:{SERVER_NAME}" for i in range(user_count)]
    for index, (user_id, admin) in enumerate(
        [(BENCH_USER, 1), (HEAVY_USER, 0), (LISTED_USER, 0)] + [(u, 0) for u in user_ids]
    ):
        users.add(user_id, now_ms // 1000 - 1000 * 86400, admin, 0, 0)
        token = bench_token if user_id == BENCH_USER else f"syt_pop_{index}_{_ids(rng, 1, 20)[0]}"
        tokens.add(index + 1, user_id, token)
    users.flush()
    tokens.flush()
    log(f"{users.rows} users with access tokens")

    local = _CopyBuffer(
        cursor,
        "local_media_repository",
        ("media_id", "media_type", "media_length", "created_ts", "upload_name", "user_id",
         "quarantined_by", "last_access_ts", "safe_from_quarantine", "authenticated", "sha256"),
    )  # fmt: skip
    local_thumbs = _CopyBuffer(
        cursor,
        "local_media_repository_thumbnails",
        ("media_id", "thumbnail_width", "thumbnail_height", "thumbnail_type",
         "thumbnail_method", "thumbnail_length"),
    )  # fmt: skip
    media_ids = _ids(rng, n)
    hashes: list[str] = []
    sample: list[str] = []
    owners = _Owners(rng, user_ids, stale_count, heavy_count, stale_before, n)
    for i, media_id in enumerate(media_ids):
        stale = i < stale_count
        created, user = owners.of(i)
        media_type, length, thumbs = _kind(rng)
        in_sample = (
            not stale
            and user not in (HEAVY_USER, LISTED_USER)
            and len(sample) < SAMPLE_SIZE
            and i % 7 == 0
        )
        if in_sample:
            sample.append(media_id)
            length = SAMPLE_LENGTH
        read = rng.random() < 0.6
        last_access = created + rng.randrange(0, 5 * DAY_MS) if read else None
        sha256 = _content_hash(rng, hashes)
        quarantine = rng.random() < 0.001 and not in_sample
        quarantined = f"@admin:{SERVER_NAME}" if quarantine else None
        local.add_line(
            f"{media_id}\t{media_type}\t{length}\t{created}\tfile{i}\t{user}"
            f"\t{_copy_value(quarantined)}\t{_copy_value(last_access)}\tf"
            f"\t{'f' if stale else 't'}\t{sha256}"
        )
        has_files = stale or in_sample
        if has_files:
            files.content(os.path.join("local_content", *_split(media_id)))
        if thumbs:
            for width, height, method in THUMBNAIL_SIZES:
                local_thumbs.add_line(
                    f"{media_id}\t{width}\t{height}\timage/jpeg\t{method}"
                    f"\t{_log_uniform(rng, 800, 60_000)}"
                )
                if has_files:
                    name = _thumb_name(width, height, method)
                    files.thumbnail(os.path.join("local_thumbnails", *_split(media_id), name))
        if i % 200_000 == 0 and i:
            log(f"{i} local media")
    local.flush()
    local_thumbs.flush()
    log(f"{local.rows} local media, {local_thumbs.rows} local thumbnails")

    _fill_remote(cursor, rng, n, stale_count, stale_before, files)
    return Population(
        n=n,
        format=FORMAT,
        template_db=template_db,
        media_store=media_store,
        now_ms=now_ms,
        stale_before_ts=stale_before,
        stale_local=stale_count,
        stale_remote=stale_count,
        heavy_user=HEAVY_USER,
        heavy_count=heavy_count,
        listed_user=LISTED_USER,
        listed_count=owners.listed_count,
        users=users.rows,
        bench_token=bench_token,
        sample_media=sample,
        populate_seconds=0.0,
    )


@dataclass(frozen=True)
class PurgePlan:
    """Cut-offs that make a purge take exactly the ``local_rows`` stale local
    media and ``remote_rows`` stale cached remote media read (or, never
    read, made) longest ago."""

    local_before_ts: int
    local_rows: int
    remote_before_ts: int
    remote_rows: int


def purge_plan(psql_dsn: dict[str, Any], population: Population, rows: int) -> PurgePlan:
    """The plan purging ``rows`` of the population's stale media of each kind
    (all of them if there are fewer), read from its template database."""
    import psycopg2

    conn = psycopg2.connect(**psql_dsn, dbname=population.template_db)
    try:
        with conn.cursor() as cursor:
            # What purges take: no quarantined media, no reservations.
            # A purge takes media last read (never read: made) before its cut-off.
            cursor.execute(
                "SELECT COALESCE(last_access_ts, created_ts) AS read_ts"
                " FROM local_media_repository WHERE created_ts < %s"
                " AND quarantined_by IS NULL AND media_length > 0 ORDER BY read_ts",
                (population.stale_before_ts,),
            )
            local = [row[0] for row in cursor.fetchall()][:rows]
            cursor.execute(
                "SELECT last_access_ts FROM remote_media_cache WHERE last_access_ts < %s"
                " AND quarantined_by IS NULL ORDER BY last_access_ts",
                (population.stale_before_ts,),
            )
            remote = [row[0] for row in cursor.fetchall()][:rows]
    finally:
        conn.close()
    return PurgePlan(
        local_before_ts=local[-1] + 1 if local else population.stale_before_ts,
        local_rows=len(local),
        remote_before_ts=remote[-1] + 1 if remote else population.stale_before_ts,
        remote_rows=len(remote),
    )


def clone_media_store(population: Population, into: str) -> None:
    """A copy of the populated media store at ``into`` made of hard links
    (``into`` must not exist)."""
    subprocess.run(["cp", "-al", population.media_store, into], check=True)


def iter_sample(population: Population, rng: random.Random) -> Iterator[str]:
    """Sample media IDs in a random order, endlessly."""
    ids = list(population.sample_media)
    while True:
        rng.shuffle(ids)
        yield from ids

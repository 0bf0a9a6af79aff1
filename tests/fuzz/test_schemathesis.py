"""schemathesis over the spec's client-server media OpenAPI
(``../shared/openapi/media-cs.json``), against a real server with a real
access token, on SQLite and on PostgreSQL.

The server has an image, an animated GIF and a text file uploaded, and
async-upload reservations made, before the run; half of the generated
server names and media IDs are drawn from those, so the generated requests
reach real downloads, thumbnails and PUTs, not only 404s. Reservations are
offered to PUTs only: a download of media not uploaded yet waits up to its
``timeout_ms`` (20 s unless asked otherwise, as the spec says), longer than
the run's request timeout. The server
federates with no one (``federation_domain_whitelist``): tests reach only
loopback, and the spec's examples name matrix.org.

The run fails on any 5xx, a response that does not match the spec, an
error that is not a Matrix error, a request over the timeout, or the run
itself over its time limit. What is relaxed, and why, is in
``schemathesis.toml`` and ``schemathesis_hooks.py`` beside this file.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from twisted.internet.threads import deferToThread

from tests import images
from tests.utils import SERVER_NAME, ServerTestCase

HERE = Path(__file__).resolve().parent
CONFIG_TEMPLATE = HERE / "schemathesis.toml"
HOOKS = HERE / "schemathesis_hooks.py"
SPEC_NAME = Path("openapi") / "media-cs.json"

# Test cases per operation and phase: the 13 operations make about 1,100
# requests in all (on each database) under the default profile, and twenty
# times as many under the ``thorough`` one (see tests/fuzz/__init__.py).
MAX_EXAMPLES = 1000 if os.environ.get("MEDIAREPO_HYPOTHESIS_PROFILE") == "thorough" else 50
# A request slower than this fails the run (as a hang would).
REQUEST_TIMEOUT_SECONDS = 10
# The whole run, killed and failed past this.
RUN_TIMEOUT_SECONDS = 150


def checkout_root() -> Path:
    return HERE.parent.parent


def find_spec() -> Path:
    """``shared/openapi/media-cs.json`` beside the checkout (CI clones the
    repository with ``shared/`` next to it), or beside the main checkout
    when this one is a git worktree."""
    root = checkout_root()
    candidates = [root.parent / "shared" / SPEC_NAME]
    git = root / ".git"
    if git.is_file():
        # A worktree: ".git" names its directory inside the main checkout's.
        gitdir = Path(git.read_text().removeprefix("gitdir:").strip())
        common = (gitdir / (gitdir / "commondir").read_text().strip()).resolve()
        candidates.append(common.parent.parent / "shared" / SPEC_NAME)
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise AssertionError(
        "the spec's media OpenAPI is missing: looked for "
        + ", ".join(str(c) for c in candidates)
        + " (CI places a copy of shared/ beside the checkout)"
    )


def schemathesis_command() -> list[str]:
    """The CLI installed beside this interpreter (the tox env's)."""
    path = Path(sys.executable).parent / "schemathesis"
    if not path.exists():
        raise AssertionError(f"schemathesis is not installed beside {sys.executable}")
    return [str(path)]


def toml_strings(values: list[str]) -> str:
    return "[" + ", ".join(json.dumps(v) for v in values) + "]"


class SchemathesisTests(ServerTestCase):
    timeout = RUN_TIMEOUT_SECONDS + 60
    extra_config = {
        # Tests reach only loopback: no fetching from the names generated.
        "federation_domain_whitelist": [SERVER_NAME],
        # Room for the run's /create requests, so they reach the logic
        # behind the limits (which tests/http covers) rather than all 429.
        "max_pending_media_uploads": 10_000,
        "rc_media_create": {"per_second": 10_000, "burst_count": 10_000},
    }

    async def _prepare(self, token: str) -> tuple[list[str], list[str]]:
        """Media for the run to find: uploads, and reservations to PUT to."""
        media_ids = [
            await self.upload(token, images.png(64, 48), "image/png", "red.png"),
            await self.upload(token, images.animated_gif(40, 30), "image/gif", "moving.gif"),
            await self.upload(token, b"hello\n", "text/plain", "h\u00e9llo w\u00f6rld.txt"),
        ]
        reserved = []
        for _ in range(3):
            r = await self.request("POST", "/_matrix/media/v1/create", token=token)
            self.assertEqual(r.code, 200, r.body)
            reserved.append(r.json()["content_uri"].rsplit("/", 1)[1])
        return media_ids, reserved

    def _config(self, media_ids: list[str], reserved: list[str]) -> Path:
        path = Path(self.workdir) / "schemathesis.toml"
        path.write_text(
            CONFIG_TEMPLATE.read_text()
            + "\n[dictionaries.server_names]\n"
            + f"values = {toml_strings([SERVER_NAME])}\n"
            + "\n[dictionaries.media_ids]\n"
            + f"values = {toml_strings(media_ids)}\n"
            + "\n[dictionaries.reserved_ids]\n"
            + f"values = {toml_strings(reserved)}\n"
        )
        return path

    async def test_media_client_server_api(self) -> None:
        spec = find_spec()
        token = await self.register()
        config = self._config(*await self._prepare(token))
        command = [
            *schemathesis_command(),
            "--no-color",
            "--config-file", str(config),
            "run", str(spec),
            # The spec's servers entry is an absolute localhost:8008.
            "--url", self.base_url,
            "--header", f"Authorization: Bearer {token}",
            "--max-examples", str(MAX_EXAMPLES),
            "--request-timeout", str(REQUEST_TIMEOUT_SECONDS),
            "--workers", "1",
        ]  # fmt: skip
        env = dict(os.environ, SCHEMATHESIS_HOOKS=str(HOOKS))
        started = time.monotonic()
        try:
            result = await deferToThread(
                subprocess.run,
                command,
                cwd=self.workdir,
                env=env,
                capture_output=True,
                text=True,
                timeout=RUN_TIMEOUT_SECONDS,
                check=False,
            )
        except subprocess.TimeoutExpired as e:
            # What it wrote before it was killed (bytes, whatever text= said).
            partial = b"".join(
                out if isinstance(out, bytes) else out.encode()
                for out in (e.stdout, e.stderr)
                if out
            )
            raise AssertionError(
                f"schemathesis ran over {RUN_TIMEOUT_SECONDS} s:\n"
                + partial.decode("utf-8", "replace")
            ) from e
        elapsed = time.monotonic() - started
        output = result.stdout + result.stderr
        self.assertEqual(result.returncode, 0, f"schemathesis failed:\n{output}")
        cases = re.search(r"(\d+) generated", output)
        self.assertIsNotNone(cases, output)
        assert cases is not None
        # A run that tested nothing would pass too.
        self.assertGreater(int(cases.group(1)), 13 * MAX_EXAMPLES // 2, output)
        print(
            f"\n[schemathesis {self.engine}] {cases.group(1)} cases in {elapsed:.1f} s",
            file=sys.stderr,
        )


class SchemathesisPostgresTests(SchemathesisTests):
    engine = "psycopg2"

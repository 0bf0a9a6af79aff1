"""Third-party modules of the tool (Pillow, PyYAML, pillow-heif, PyAV,
cryptography) come from the running
Python if it has them; otherwise from a virtualenv of the tool's own, made
once under the cache directory, and the tool re-executes itself there."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

_REEXEC_FLAG = "MEDIAREPO_BENCH_REEXEC"
PACKAGES = {
    "PIL": "pillow",
    "yaml": "pyyaml",
    "pillow_heif": "pillow-heif",
    "av": "av",
    "psycopg2": "psycopg2-binary",
    "cryptography": "cryptography",
}


def _cache_base() -> str:
    return os.environ.get("MEDIAREPO_BENCH_CACHE") or os.path.expanduser("~/.cache/mediarepo-bench")


def missing(modules: list[str]) -> list[str]:
    return [m for m in modules if importlib.util.find_spec(m) is None]


def ensure_modules(modules: list[str]) -> None:
    """Return if ``modules`` import here; otherwise re-exec under the tool's venv."""
    absent = missing(modules)
    if not absent:
        return
    if os.environ.get(_REEXEC_FLAG):
        raise SystemExit(f"bench: {', '.join(absent)} still missing in {sys.executable}")
    venv = os.path.join(_cache_base(), "bench-venv")
    python = os.path.join(venv, "bin", "python")
    if not os.path.exists(python):
        print(f"[bench] creating the tool's virtualenv {venv}", file=sys.stderr, flush=True)
        subprocess.run([sys.executable, "-m", "venv", venv], check=True)
    wanted = [PACKAGES[m] for m in PACKAGES]
    check = subprocess.run(
        [python, "-c", "import " + ", ".join(PACKAGES)], capture_output=True
    ).returncode
    if check != 0:
        print(f"[bench] pip install {' '.join(wanted)} into {venv}", file=sys.stderr, flush=True)
        subprocess.run([python, "-m", "pip", "install", "-q", *wanted], check=True)
    os.environ[_REEXEC_FLAG] = "1"
    script = os.path.abspath(sys.argv[0])
    os.execv(python, [python, script, *sys.argv[1:]])

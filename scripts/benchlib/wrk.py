"""Running wrk and reading its figures.

wrk's own summary has no 95th percentile, so a Lua script with only a
``done()`` hook (which costs nothing per request, unlike ``response()``)
prints every figure on one line that is easy to parse.
"""

from __future__ import annotations

import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Mapping
from dataclasses import dataclass

_DONE_SCRIPT = """\
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "BENCHWRK requests=%d duration_us=%d bytes=%d connect=%d read=%d write=%d status=%d timeout=%d",
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout))
  for _, p in ipairs({50, 90, 95, 99, 99.9}) do
    io.write(string.format(" p%s=%d", tostring(p), latency:percentile(p)))
  end
  io.write(string.format(" mean_us=%f max_us=%d\\n", latency.mean, latency.max))
end
"""


class WrkMissing(Exception):
    pass


@dataclass
class WrkResult:
    requests: int
    duration_s: float
    bytes: int
    errors_connect: int
    errors_read: int
    errors_write: int
    errors_status: int  # responses with status >= 400 (wrk does not count 3xx)
    errors_timeout: int
    percentiles_ms: dict[str, float]
    mean_ms: float
    max_ms: float
    usage: resource.struct_rusage
    raw_output: str

    @property
    def errors(self) -> int:
        return (
            self.errors_connect
            + self.errors_read
            + self.errors_write
            + self.errors_status
            + self.errors_timeout
        )

    @property
    def rps(self) -> float:
        return self.requests / self.duration_s if self.duration_s else 0.0


def install_debian_package(binary: str, package: str) -> str | None:
    """``binary``'s path, installing Debian's ``package`` first if it is
    missing and this is a Debian system where we are root; ``None`` if it
    still cannot be found."""
    found = _find(binary)
    if found is not None or os.geteuid() != 0 or shutil.which("apt-get") is None:
        return found
    print(f"[bench] installing {package} (apt-get)", file=sys.stderr, flush=True)
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    install = ["apt-get", "install", "-y", "-q", package]
    if subprocess.run(install, capture_output=True, env=env).returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], capture_output=True, env=env)
        subprocess.run(install, capture_output=True, env=env)
    return _find(binary)


def _find(binary: str) -> str | None:
    # /usr/sbin is not on every PATH (nginx lives there).
    candidates = (f"/usr/sbin/{binary}", f"/usr/bin/{binary}")
    return shutil.which(binary) or next((p for p in candidates if os.path.exists(p)), None)


def wrk_path() -> str:
    path = install_debian_package("wrk", "wrk")
    if path is None:
        raise WrkMissing("wrk is not installed (apt-get install -y wrk)")
    return path


def parse_wrk_line(output: str) -> dict[str, float]:
    for line in output.splitlines():
        if line.startswith("BENCHWRK "):
            values: dict[str, float] = {}
            for item in line.split()[1:]:
                key, _, value = item.partition("=")
                values[key] = float(value)
            return values
    raise ValueError(f"no BENCHWRK line in wrk's output:\n{output}")


def run_wrk(
    url: str,
    *,
    connections: int,
    threads: int,
    duration: float,
    headers: Mapping[str, str] | None = None,
    timeout: float = 30.0,
) -> WrkResult:
    """Run wrk for ``duration`` seconds; bounded by a watchdog at duration + 60 s."""
    binary = wrk_path()
    threads = max(1, min(threads, connections))
    with tempfile.TemporaryDirectory(prefix="bench-wrk-") as tmp:
        script = os.path.join(tmp, "done.lua")
        with open(script, "w", encoding="ascii") as f:
            f.write(_DONE_SCRIPT)
        args = [
            binary,
            f"-t{threads}",
            f"-c{connections}",
            f"-d{max(1, round(duration))}s",
            f"--timeout={max(1, round(timeout))}s",
            "--latency",
            "-s",
            script,
        ]
        for name, value in (headers or {}).items():
            args += ["-H", f"{name}: {value}"]
        args.append(url)
        out_path = os.path.join(tmp, "out.txt")
        with open(out_path, "w+b") as out:
            proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT)
            watchdog = threading.Timer(duration + 60, lambda: os.kill(proc.pid, signal.SIGKILL))
            watchdog.start()
            try:
                # wait4 gives this child's own rusage (wrk's CPU seconds).
                _, status, usage = os.wait4(proc.pid, 0)
            finally:
                watchdog.cancel()
            proc.returncode = os.waitstatus_to_exitcode(status)
            out.seek(0)
            output = out.read().decode("utf-8", "replace")
    if proc.returncode != 0:
        raise RuntimeError(f"wrk exited with {proc.returncode}:\n{output}")
    values = parse_wrk_line(output)
    percentiles: dict[str, float] = {
        key: values[key] / 1000.0 for key in ("p50", "p90", "p95", "p99", "p99.9") if key in values
    }
    return WrkResult(
        requests=int(values["requests"]),
        duration_s=values["duration_us"] / 1e6,
        bytes=int(values["bytes"]),
        errors_connect=int(values["connect"]),
        errors_read=int(values["read"]),
        errors_write=int(values["write"]),
        errors_status=int(values["status"]),
        errors_timeout=int(values["timeout"]),
        percentiles_ms=percentiles,
        mean_ms=values.get("mean_us", 0.0) / 1000.0,
        max_ms=values.get("max_us", 0.0) / 1000.0,
        usage=usage,
        raw_output=output,
    )

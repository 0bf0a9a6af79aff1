"""What a scenario cost: the server's CPU and memory (from /proc), and the
load generator's own CPU, so a reader can tell the generator was not the
bottleneck."""

from __future__ import annotations

import os
import resource
import threading
import time
from dataclasses import dataclass

_CLK_TCK = os.sysconf("SC_CLK_TCK")
_MIB = 1024 * 1024


def _stat_fields(pid: int) -> list[str]:
    with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
        text = f.read()
    # The command name (field 2) may hold spaces and parentheses: split after the last ')'.
    return text[text.rindex(")") + 2 :].split()


def process_cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), in seconds."""
    fields = _stat_fields(pid)
    # After the name: state(3) ppid(4) ... utime(14) stime(15), so indexes 11 and 12 here.
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


def children_of(pid: int) -> list[int]:
    """The descendants of ``pid`` now alive (nginx workers, for instance)."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            ppid = int(_stat_fields(int(entry))[1])
        except (OSError, ValueError, IndexError):
            continue
        parents.setdefault(ppid, []).append(int(entry))
    found: list[int] = []
    todo = [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _status_kib(pid: int, key: str) -> int:
    with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1])
    return 0


def is_alive(pid: int) -> bool:
    try:
        fields = _stat_fields(pid)
    except OSError:
        return False
    return fields[0] != "Z"


def cpu_idle_wait(pid: int | None, *, max_wait: float = 30.0, threshold: float = 0.03) -> float:
    """Wait until ``pid`` uses less than ``threshold`` of a core over 0.3 s
    (background work of the previous scenario done); at most ``max_wait``
    seconds. Returns the seconds waited."""
    start = time.monotonic()
    if pid is None:
        time.sleep(0.5)
        return time.monotonic() - start
    window = 0.3
    while time.monotonic() - start < max_wait:
        try:
            before = process_cpu_seconds(pid)
            time.sleep(window)
            used = process_cpu_seconds(pid) - before
        except OSError:
            break
        if used <= threshold * window + 1.0 / _CLK_TCK:
            break
    return time.monotonic() - start


@dataclass
class ServerUsage:
    cpu_s: float
    rss_start_mib: float
    rss_peak_mib: float  # the largest VmRSS sampled during the scenario
    vmhwm_mib: float  # VmHWM at the end: the peak over the process's whole life
    samples: int
    died: bool


class ServerMonitor:
    """Samples a server's VmRSS every ``interval`` seconds in a thread, and
    takes its CPU seconds at start and stop. With ``include_children`` the
    figures are summed over the process and its descendants (taken at start)."""

    def __init__(self, pid: int, *, interval: float = 0.05, include_children: bool = False) -> None:
        self.pid = pid
        self.interval = interval
        self.pids = [pid] + (children_of(pid) if include_children else [])
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._peak_kib = 0
        self._samples = 0
        self._cpu_start = 0.0
        self._rss_start_kib = 0
        self._died = False

    def _rss_kib(self) -> int:
        total = 0
        for pid in self.pids:
            try:
                total += _status_kib(pid, "VmRSS:")
            except OSError:
                if pid == self.pid:
                    self._died = True
        return total

    def _cpu(self) -> float:
        total = 0.0
        for pid in self.pids:
            try:
                total += process_cpu_seconds(pid)
            except OSError:
                if pid == self.pid:
                    self._died = True
        return total

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            rss = self._rss_kib()
            self._samples += 1
            self._peak_kib = max(self._peak_kib, rss)

    def start(self) -> None:
        self._cpu_start = self._cpu()
        self._rss_start_kib = self._peak_kib = self._rss_kib()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self._thread.start()

    def stop(self) -> ServerUsage:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        rss = self._rss_kib()
        self._peak_kib = max(self._peak_kib, rss)
        cpu = self._cpu() - self._cpu_start
        hwm = 0
        for pid in self.pids:
            try:
                hwm += _status_kib(pid, "VmHWM:")
            except OSError:
                pass
        return ServerUsage(
            cpu_s=max(cpu, 0.0),
            rss_start_mib=self._rss_start_kib / 1024,
            rss_peak_mib=self._peak_kib / 1024,
            vmhwm_mib=hwm / 1024,
            samples=self._samples,
            died=self._died or not is_alive(self.pid),
        )


def _rusage_cpu(usage: resource.struct_rusage) -> float:
    return usage.ru_utime + usage.ru_stime


@dataclass
class GeneratorUsage:
    cpu_s: float
    wall_s: float

    @property
    def share(self) -> float:
        """CPU seconds per wall second: 1.0 is one whole core."""
        return self.cpu_s / self.wall_s if self.wall_s > 0 else 0.0


class GeneratorMeter:
    """This process's CPU (all threads) plus that of child processes such as
    wrk, reported by :meth:`add_child` from ``os.wait4``'s rusage."""

    def __init__(self) -> None:
        self._self_start = 0.0
        self._wall_start = 0.0
        self._children_cpu = 0.0

    def start(self) -> None:
        self._self_start = _rusage_cpu(resource.getrusage(resource.RUSAGE_SELF))
        self._wall_start = time.monotonic()
        self._children_cpu = 0.0

    def add_child(self, usage: resource.struct_rusage) -> None:
        self._children_cpu += _rusage_cpu(usage)

    def stop(self) -> GeneratorUsage:
        wall = time.monotonic() - self._wall_start
        own = _rusage_cpu(resource.getrusage(resource.RUSAGE_SELF)) - self._self_start
        return GeneratorUsage(cpu_s=own + self._children_cpu, wall_s=wall)


def machine_busy_seconds() -> float:
    """CPU seconds all cores spent not idle since boot (from /proc/stat)."""
    with open("/proc/stat", encoding="ascii") as f:
        fields = f.readline().split()[1:]
    values = [int(v) for v in fields[:8]]
    # user nice system idle iowait irq softirq steal: idle and iowait are not busy,
    # steal is time the hypervisor gave to others.
    busy = values[0] + values[1] + values[2] + values[5] + values[6]
    return busy / _CLK_TCK


def postgres_cpu_seconds() -> float:
    """CPU seconds of every process named ``postgres`` now alive (server and backends)."""
    total = 0.0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="ascii", errors="replace") as f:
                text = f.read()
        except OSError:
            continue
        name = text[text.find("(") + 1 : text.rfind(")")]
        if name == "postgres" or name.startswith("postgres:"):
            fields = text[text.rindex(")") + 2 :].split()
            total += (int(fields[11]) + int(fields[12])) / _CLK_TCK
    return total

"""Scenario results: the record, percentiles, the tables and the JSON lines."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, TextIO

JSON_PREFIX = "BENCH "
RATIO_PREFIX = "BENCH_RATIO "
LOG_PREFIX = "BENCH_LOG "


def percentile(values: Sequence[float], pct: float) -> float | None:
    """Linear interpolation between closest ranks; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    rank = (len(ordered) - 1) * pct / 100.0
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def ms_percentiles(seconds: Sequence[float], prefix: str = "") -> dict[str, float]:
    out: dict[str, float] = {}
    for pct in (50, 95, 99):
        value = percentile(seconds, pct)
        if value is not None:
            out[f"{prefix}p{pct}_ms"] = round(value * 1000, 3)
    return out


@dataclass
class Result:
    server: str
    scenario: str
    variant: str = ""
    status: str = "ok"  # ok, skipped or failed
    reason: str = ""
    tool: str = ""  # wrk or asyncio
    connections: int = 0
    requests: int = 0
    errors: int = 0
    error_kinds: dict[str, int] = field(default_factory=dict)
    error_samples: list[str] = field(default_factory=list)
    duration_s: float = 0.0
    rps: float | None = None
    p50_ms: float | None = None
    p95_ms: float | None = None
    p99_ms: float | None = None
    mb_s: float | None = None
    bytes: int = 0
    extra: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    server_cpu_s: float | None = None
    server_cpu_share: float | None = None
    server_cpu_ms_per_request: float | None = None
    rss_start_mib: float | None = None
    rss_peak_mib: float | None = None
    vmhwm_mib: float | None = None
    gen_cpu_s: float | None = None
    gen_cpu_share: float | None = None
    # CPU of all PostgreSQL processes (ours or not), and of everything else on the
    # machine (kernel I/O work, other jobs: noise), per wall second.
    postgres_cpu_share: float | None = None
    other_cpu_share: float | None = None
    loadavg_1m: float | None = None
    server_info: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return f"{self.scenario}[{self.variant}]" if self.variant else self.scenario

    def to_json(self) -> str:
        data = asdict(self)
        for name, value in list(data.items()):
            if isinstance(value, float):
                data[name] = round(value, 4)
        return json.dumps(data, sort_keys=False)


def _fmt(value: float | None, digits: int = 1) -> str:
    if value is None:
        return "-"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.{digits}f}"


def _notes(result: Result) -> str:
    parts: list[str] = []
    extra = result.extra
    if "ready_p50_ms" in extra:
        parts.append(
            f"thumb ready p50/p95/p99 {_fmt(extra['ready_p50_ms'])}/"
            f"{_fmt(extra.get('ready_p95_ms'))}/{_fmt(extra.get('ready_p99_ms'))} ms"
        )
    if "get_p50_ms" in extra:
        parts.append(f"thumb GET p50 {_fmt(extra['get_p50_ms'])} ms")
    if "polls_mean" in extra:
        parts.append(f"polls/img {extra['polls_mean']:.1f}")
    if "create_p50_ms" in extra:
        parts.append(
            f"create p50 {_fmt(extra['create_p50_ms'])} ms, "
            f"PUT p50 {_fmt(extra.get('put_p50_ms'))} ms"
        )
    parts.extend(result.notes)
    if result.error_kinds:
        kinds = ", ".join(f"{k}: {v}" for k, v in sorted(result.error_kinds.items()))
        parts.append(f"errors {kinds}")
    if result.status != "ok":
        parts.insert(0, f"{result.status.upper()}: {result.reason}")
    return "; ".join(parts)


_COLUMNS = [
    ("scenario", 26),
    ("conns", 5),
    ("req/s", 8),
    ("p50 ms", 8),
    ("p95 ms", 8),
    ("p99 ms", 8),
    ("errors", 6),
    ("MB/s", 7),
    ("RSS peak", 8),
    ("VmHWM", 7),
    ("srv CPU s", 9),
    ("srv CPU", 7),
    ("gen CPU", 7),
    ("PG", 4),
    ("other", 5),
]


def print_table(title: str, results: Iterable[Result], out: TextIO) -> None:
    rows = list(results)
    print(f"\n== {title}", file=out)
    header = " ".join(name.rjust(width) if i else name.ljust(width)
                      for i, (name, width) in enumerate(_COLUMNS))  # fmt: skip
    print(header + "  notes", file=out)
    for r in rows:
        ok = r.status == "ok"

        def pct(share: float | None) -> str:
            return "-" if share is None else f"{share * 100:.0f}%"

        cells = [
            r.key,
            str(r.connections) if r.connections else "-",
            _fmt(r.rps) if ok else "-",
            _fmt(r.p50_ms, 2) if ok else "-",
            _fmt(r.p95_ms, 2) if ok else "-",
            _fmt(r.p99_ms, 2) if ok else "-",
            str(r.errors) if ok else "-",
            _fmt(r.mb_s) if ok else "-",
            _fmt(r.rss_peak_mib, 0) if ok else "-",
            _fmt(r.vmhwm_mib, 0) if ok else "-",
            _fmt(r.server_cpu_s, 2) if ok else "-",
            pct(r.server_cpu_share) if ok else "-",
            pct(r.gen_cpu_share) if ok else "-",
            pct(r.postgres_cpu_share) if ok else "-",
            pct(r.other_cpu_share) if ok else "-",
        ]
        line = " ".join(
            cell.rjust(width) if i else cell.ljust(width)
            for i, (cell, (_, width)) in enumerate(zip(cells, _COLUMNS, strict=True))
        )
        print(f"{line}  {_notes(r)}", file=out)
    print(
        "   RSS peak: largest VmRSS sampled every 50 ms during the scenario (MiB); VmHWM: the\n"
        "   process's lifetime peak (MiB); srv CPU: server CPU s / wall s (100% = one core);\n"
        "   gen CPU: the load generator's own CPU (this process + wrk) / wall s; PG: CPU of all\n"
        "   PostgreSQL processes / wall s; other: CPU of everything else on the machine (kernel\n"
        "   I/O threads, other jobs = noise) / wall s.",
        file=out,
    )


# (metric, label, higher_is_better)
_RATIO_METRICS: list[tuple[str, str, bool]] = [
    ("rps", "req/s", True),
    ("mb_s", "MB/s", True),
    ("p50_ms", "p50 ms", False),
    ("p95_ms", "p95 ms", False),
    ("p99_ms", "p99 ms", False),
    ("ready_p50_ms", "thumb ready p50 ms", False),
    ("get_p50_ms", "thumb GET p50 ms", False),
    ("create_p50_ms", "create p50 ms", False),
    ("put_p50_ms", "PUT p50 ms", False),
    ("server_cpu_ms_per_request", "srv CPU ms/req", False),
    ("rss_peak_mib", "RSS peak MiB", False),
]


def _metric(result: Result, name: str) -> float | None:
    if name in result.extra:
        return result.extra[name]
    value = getattr(result, name, None)
    return value if isinstance(value, int | float) else None


def ratio_rows(ours: Sequence[Result], theirs: Sequence[Result]) -> list[dict[str, Any]]:
    by_key = {r.key: r for r in theirs if r.status == "ok"}
    rows: list[dict[str, Any]] = []
    for mine in ours:
        other = by_key.get(mine.key)
        if mine.status != "ok" or other is None:
            continue
        for metric, label, higher_better in _RATIO_METRICS:
            a, b = _metric(mine, metric), _metric(other, metric)
            if a is None or b is None or a <= 0 or b <= 0:
                continue
            ratio = a / b
            if higher_better:
                verdict = f"{ratio:.2f}x {'more' if ratio >= 1 else 'of theirs'}"
            else:
                better = b / a
                verdict = f"{better:.2f}x faster" if better >= 1 else f"{1 / better:.2f}x slower"
                if metric in ("rss_peak_mib", "server_cpu_ms_per_request"):
                    verdict = f"{better:.2f}x less" if better >= 1 else f"{1 / better:.2f}x more"
            rows.append(
                {
                    "scenario": mine.key,
                    "metric": label,
                    "ours": a,
                    "theirs": b,
                    "ratio": round(ratio, 4),
                    "better": "higher" if higher_better else "lower",
                    "verdict": verdict,
                }
            )
    return rows


def print_ratios(title: str, rows: Sequence[dict[str, Any]], theirs: str, out: TextIO) -> None:
    print(f"\n== {title}", file=out)
    print(
        f"{'scenario':26} {'metric':20} {'ours':>10} {theirs:>10} {'ours/' + theirs:>14}  "
        "verdict (which is better)",
        file=out,
    )
    for row in rows:
        print(
            f"{row['scenario']:26} {row['metric']:20} {_fmt(row['ours'], 2):>10} "
            f"{_fmt(row['theirs'], 2):>10} {row['ratio']:>14.2f}  {row['verdict']} "
            f"({row['better']} is better)",
            file=out,
        )


def print_summary(ours: Sequence[Result], theirs: Sequence[Result], name: str, out: TextIO) -> None:
    """One line per scenario: the headline figures side by side, with ratios."""
    by_key = {r.key: r for r in theirs if r.status == "ok"}
    print(f"\n== summary: ours vs {name} (ratio = ours/{name})", file=out)
    print(
        f"{'scenario':26} {'req/s ours':>10} {name:>9} {'ratio':>6}   "
        f"{'p50 ms ours':>11} {name:>9} {'':16} {'MB/s ratio':>10} "
        f"{'CPU/req ratio':>13} {'RSS ratio':>9}",
        file=out,
    )
    for mine in ours:
        other = by_key.get(mine.key)
        if mine.status != "ok" or other is None:
            continue
        p50_name = "p50_ms"
        if "ready_p50_ms" in mine.extra and "ready_p50_ms" in other.extra:
            p50_name = "ready_p50_ms"  # thumbnail_upload: until the thumbnail exists

        def ratio(a: float | None, b: float | None) -> str:
            return f"{a / b:.2f}" if a and b else "-"

        a50, b50 = _metric(mine, p50_name), _metric(other, p50_name)
        speed = "-"
        if a50 and b50:
            speed = f"{b50 / a50:.2f}x faster" if b50 >= a50 else f"{a50 / b50:.2f}x slower"
        label = mine.key + (" (ready)" if p50_name != "p50_ms" else "")
        print(
            f"{label:26} {_fmt(mine.rps):>10} {_fmt(other.rps):>9} "
            f"{ratio(mine.rps, other.rps):>6}   {_fmt(a50, 1):>11} {_fmt(b50, 1):>9} "
            f"{speed:16} {ratio(mine.mb_s, other.mb_s):>10} "
            f"{ratio(mine.server_cpu_ms_per_request, other.server_cpu_ms_per_request):>13} "
            f"{ratio(mine.rss_peak_mib, other.rss_peak_mib):>9}",
            file=out,
        )
    print(
        "   req/s and MB/s: higher is better; p50: lower is better (shown as faster/slower);\n"
        "   CPU/req (server CPU ms per request) and RSS (peak sampled): lower is better.",
        file=out,
    )

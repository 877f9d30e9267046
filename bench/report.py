"""What a bench run prints: rows, percentiles, the machine, wrk's output, and the final table.

Pure functions only (no I/O but reading ``/proc``), so ``tests/unit/test_bench_report.py`` can
check them without services.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field


@dataclass
class Row:
    """One line of the table: a rate, its ratio to a base row, and optionally latency and notes."""

    name: str
    rate: float | None  # per second, of ``unit``
    unit: str = "starts/s"
    ratio: float | None = None
    base: str = ""  # what the ratio is to: "ceiling", "bare", "1 serve"
    p50: float | None = None  # seconds
    p99: float | None = None
    notes: list[str] = field(default_factory=list)

    def against(self, base: Row | None, label: str) -> Row:
        """Set the ratio of this row's rate to ``base``'s (when both have one)."""
        if base is not None and base.rate and self.rate is not None:
            self.ratio = self.rate / base.rate
            self.base = label
        return self


def pct(values: list[float], q: float) -> float:
    """The ``q`` quantile (0..1) by the nearest-rank method: the smallest value with at least
    ``q`` of the values at or below it. NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, math.ceil(q * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def _num(value: float | None, width: int, digits: int = 1) -> str:
    if value is None or math.isnan(value):
        return f"{'-':>{width}}"
    return f"{value:{width}.{digits}f}"


def _ms(value: float | None) -> str:
    return _num(None if value is None else value * 1000, 9)


HEADER = f"{'row':<52} {'rate':>9} {'unit':<9} {'ratio':>6} {'to':<8} {'p50 ms':>9} {'p99 ms':>9}  notes"


def line(row: Row) -> str:
    ratio = _num(row.ratio, 6, 2)
    return (
        f"{row.name:<52} {_num(row.rate, 9)} {row.unit:<9} {ratio} {row.base:<8} {_ms(row.p50)} {_ms(row.p99)}"
        f"  {'; '.join(row.notes)}"
    ).rstrip()


def table(rows: list[Row], context: list[str]) -> str:
    rule = "-" * len(HEADER)
    return "\n".join([*context, rule, HEADER, rule, *(line(r) for r in rows), rule])


# --- the machine ----------------------------------------------------------------------------------


def cpu_model(cpuinfo: str) -> str:
    """The first ``model name`` in /proc/cpuinfo's text (some ARM kernels only have ``Hardware``)."""
    for key in ("model name", "Hardware", "Processor", "cpu model"):
        m = re.search(rf"^{key}\s*:\s*(.+)$", cpuinfo, re.MULTILINE)
        if m:
            return m.group(1).strip()
    return "unknown CPU"


def mem_total_gib(meminfo: str) -> float | None:
    m = re.search(r"^MemTotal:\s+(\d+)\s*kB", meminfo, re.MULTILINE)
    return int(m.group(1)) / (1024 * 1024) if m else None


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


def machine() -> str:
    ram = mem_total_gib(_read("/proc/meminfo"))
    ram_text = f"{ram:.1f} GiB RAM" if ram is not None else "RAM unknown"
    return (
        f"{os.cpu_count()} CPUs (nproc {len(os.sched_getaffinity(0))}), {cpu_model(_read('/proc/cpuinfo'))}, {ram_text}"
    )


def peak_rss_mib(status: str) -> float | None:
    """VmHWM (the peak resident set) from the text of /proc/PID/status, in MiB."""
    m = re.search(r"^VmHWM:\s+(\d+)\s*kB", status, re.MULTILINE)
    return int(m.group(1)) / 1024 if m else None


def process_peak_rss_mib(pid: int) -> float | None:
    return peak_rss_mib(_read(f"/proc/{pid}/status"))


# --- wrk ------------------------------------------------------------------------------------------


@dataclass
class WrkResult:
    requests: int = 0
    seconds: float = 0.0
    rps: float = 0.0
    statuses: dict[int, int] = field(default_factory=dict)  # from bench/events.lua's "status" lines
    non_2xx: int = 0  # wrk's own count (non-2xx or 3xx)
    socket_errors: dict[str, int] = field(default_factory=dict)  # connect, read, write, timeout
    p50: float | None = None  # seconds, from bench/events.lua
    p99: float | None = None

    def count(self, low: int, high: int) -> int:
        return sum(n for code, n in self.statuses.items() if low <= code < high)

    @property
    def accepted(self) -> int:
        """Requests answered 202 (every event of them held). A 207 batch is partly refused."""
        return self.statuses.get(202, 0)

    @property
    def not_accepted(self) -> int:
        """Requests not answered 202: other statuses (a 503 overloaded too) and socket errors."""
        answered = sum(self.statuses.values())
        return answered - self.accepted + self.socket_errors.get("timeout", 0)


_DURATION = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_wrk(text: str) -> WrkResult:
    """wrk's summary plus the lines ``bench/events.lua`` prints in ``done``."""
    out = WrkResult()
    m = re.search(r"(\d+) requests in ([\d.]+)(us|ms|s|m|h)", text)
    if m:
        out.requests = int(m.group(1))
        out.seconds = float(m.group(2)) * _DURATION[m.group(3)]
    m = re.search(r"Requests/sec:\s+([\d.]+)", text)
    if m:
        out.rps = float(m.group(1))
    m = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", text)
    if m:
        out.non_2xx = int(m.group(1))
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    if m:
        out.socket_errors = dict(zip(("connect", "read", "write", "timeout"), map(int, m.groups()), strict=True))
    for code, n in re.findall(r"^status (\d+) (\d+)$", text, re.MULTILINE):
        out.statuses[int(code)] = out.statuses.get(int(code), 0) + int(n)
    latency = dict(re.findall(r"^latency p(\d+) ([\d.]+) ms$", text, re.MULTILINE))
    out.p50 = float(latency["50"]) / 1000 if "50" in latency else None
    out.p99 = float(latency["99"]) / 1000 if "99" in latency else None
    return out


def status_summary(result: WrkResult) -> str:
    """``202: 1200, 503: 3`` plus socket errors when there were any."""
    parts = [f"{code}: {n}" for code, n in sorted(result.statuses.items())]
    errors = {k: v for k, v in result.socket_errors.items() if v}
    if errors:
        parts.append("socket errors " + ", ".join(f"{k} {v}" for k, v in errors.items()))
    return ", ".join(parts) or "no answers"

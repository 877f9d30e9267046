"""What a bench run measures and prints: one row per path, timed against the server's clock."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from datetime import UTC, datetime

from temporalio.client import Client


@dataclass
class Row:
    name: str
    events: int
    seconds: float
    latencies: list[float]

    @property
    def rate(self) -> float:
        return self.events / self.seconds if self.seconds else 0.0


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def now() -> float:
    return datetime.now(UTC).timestamp()


async def start_times(client: Client, queue: str, n: int, timeout: float = 600) -> dict[str, datetime]:
    """Wait until ``n`` runs exist on ``queue``; their ids → start times (server clock)."""
    deadline = time.monotonic() + timeout
    while (await client.count_workflows(f'TaskQueue="{queue}"')).count < n:
        if time.monotonic() > deadline:
            raise TimeoutError(f"fewer than {n} runs on {queue} after {timeout}s")
        await asyncio.sleep(0.2)
    return {w.id: w.start_time async for w in client.list_workflows(f'TaskQueue="{queue}"')}


def adapter_row(name: str, n: int, began: float, acked: dict[str, float], started: dict[str, datetime]) -> Row:
    """Rate from the first send to the last start; latency from each ack to its target's start."""
    last = max(started.values()).timestamp()
    lat = [max(0.0, started[wid].timestamp() - t) for wid, t in acked.items() if wid in started]
    return Row(name, n, last - began, lat)


def line(row: Row, base: Row) -> str:
    latency = (
        f"p50 {pct(row.latencies, 0.5) * 1000:7.1f} ms  p99 {pct(row.latencies, 0.99) * 1000:7.1f} ms"
        if row.latencies
        else "latency n/a (published before the rate was timed)"
    )
    return f"{row.name:<44} {row.rate:8.1f} starts/s  ratio {row.rate / base.rate:5.2f}  {latency}"

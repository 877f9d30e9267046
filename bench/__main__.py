"""Throughput of the doors against the ceiling, all against one Temporal server in one run.

    python -m bench [--events N] [--concurrency C] [--doors http,kafka,amqp] [--temporal ADDR]

(a) ceiling: N direct ``client.start_workflow`` calls of the target the doors start;
(b) per door and dispatcher start mode: N events in → N targets started, with p50/p99 latency
    from the door's acknowledgement (HTTP 202; broker publish confirm) to the target's start time.
Targets run on a task queue no worker polls, so only starting is measured. Ratios are b/a.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from temporalio.client import Client

from bench import doors
from bridge.runtime.embedded import EmbeddedTemporal


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


async def ceiling(client: Client, n: int, concurrency: int) -> Row:
    queue = f"bench-direct-{uuid.uuid4().hex[:8]}"
    sem = asyncio.Semaphore(concurrency)
    latencies: list[float] = []

    async def one(i: int) -> None:
        async with sem:
            t0 = time.perf_counter()
            await client.start_workflow("Noop", {"i": i}, id=f"{queue}-{i}", task_queue=queue)
            latencies.append(time.perf_counter() - t0)

    began = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(n)))
    return Row("direct start_workflow (ceiling)", n, time.perf_counter() - began, latencies)


async def start_times(client: Client, queue: str, n: int, timeout: float = 600) -> dict[str, datetime]:
    """Wait until ``n`` runs exist on ``queue``; their ids → start times (server clock)."""
    deadline = time.monotonic() + timeout
    while (await client.count_workflows(f'TaskQueue="{queue}"')).count < n:
        if time.monotonic() > deadline:
            raise TimeoutError(f"fewer than {n} runs on {queue} after {timeout}s")
        await asyncio.sleep(0.2)
    return {w.id: w.start_time async for w in client.list_workflows(f'TaskQueue="{queue}"')}


def door_row(name: str, n: int, began: float, acked: dict[str, float], started: dict[str, datetime]) -> Row:
    """Rate from the first send to the last start; latency from each ack to its target's start."""
    last = max(started.values()).timestamp()
    lat = [max(0.0, started[wid].timestamp() - t) for wid, t in acked.items() if wid in started]
    return Row(name, n, last - began, lat)


def now() -> float:
    return datetime.now(UTC).timestamp()


async def main() -> int:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    p.add_argument("--events", type=int, default=1000)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--doors", default="http")
    p.add_argument("--modes", default="child,activity")
    p.add_argument("--temporal", default=None, help="address; default: a fresh embedded dev server")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    for noisy in ("temporalio", "bridge", "adapters", "dispatcher", "httpx", "aiokafka", "aio_pika"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    server = None
    address = args.temporal
    if not address:
        server = EmbeddedTemporal(tempfile.mkdtemp(prefix="bench-"), ui=False)
        address = await server.start()
    try:
        client = await Client.connect(address)
        n, c = args.events, args.concurrency
        print(f"signal-bridge bench: {n} events, concurrency {c}, Temporal {address}", flush=True)
        base = await ceiling(client, n, c)
        rows = [base]
        _print(base, base)
        runners: dict[str, Callable[..., Awaitable[Row]]] = {
            "http": doors.http,
            "kafka": doors.kafka,
            "amqp": doors.amqp,
        }
        for door in args.doors.split(","):
            for mode in args.modes.split(","):
                row = await runners[door](client, address, n, c, mode)
                rows.append(row)
                _print(row, base)
    finally:
        if server:
            server.stop()
    return 0


def _print(row: Row, base: Row) -> None:
    latency = (
        f"p50 {pct(row.latencies, 0.5) * 1000:7.1f} ms  p99 {pct(row.latencies, 0.99) * 1000:7.1f} ms"
        if row.latencies
        else "latency n/a (published before the rate was timed)"
    )
    print(f"{row.name:<44} {row.rate:8.1f} starts/s  ratio {row.rate / base.rate:5.2f}  {latency}", flush=True)


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))

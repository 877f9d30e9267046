"""One function per door: push N events through it and time the targets' starts."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import httpx
from temporalio.client import Client

from bench.__main__ import Row, door_row, now, start_times
from bridge.app import Bridge
from bridge.config import parse_config
from bridge.event import event_digest, target_workflow_id

TOKEN = "bench-token"


def bench_config(address: str, mode: str, **doors: Any) -> tuple[Any, str]:
    queue = f"bench-idle-{uuid.uuid4().hex[:8]}"
    cfg = parse_config(
        {
            "project": f"bench-{uuid.uuid4().hex[:8]}",
            "temporal": {"address": address},
            "dispatcher": {"start_mode": mode},
            "http": {"port": 0, "auth": {"tokens": [TOKEN]}},
            "workflows": [{"id": "t", "workflow_type": "Noop", "task_queue": queue, "triggers": [{"name": "tick"}]}],
            **doors,
        },
        origin="bench",
    )
    return cfg, queue


async def http(client: Client, address: str, n: int, concurrency: int, mode: str) -> Row:
    cfg, queue = bench_config(address, mode)
    bridge = Bridge(cfg, client=client)
    await bridge.start()
    acked: dict[str, float] = {}
    sem = asyncio.Semaphore(concurrency)
    url = f"http://127.0.0.1:{bridge.http_port}/api/v1/events"
    try:
        async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=concurrency)) as h:

            async def one(i: int) -> None:
                key = f"ev-{i}"
                async with sem:
                    resp = await h.post(
                        url,
                        json={"name": "tick", "payload": {"i": i}},
                        headers={"Authorization": f"Bearer {TOKEN}", "Idempotency-Key": key},
                    )
                assert resp.status_code == 202, resp.text
                acked[target_workflow_id("t", event_digest("http", key))] = now()

            began = now()
            t0 = time.perf_counter()
            await asyncio.gather(*(one(i) for i in range(n)))
            ingest = time.perf_counter() - t0
            started = await start_times(client, queue, n)
    finally:
        await bridge.stop()
    row = door_row(f"http -> targets ({mode})", n, began, acked, started)
    print(f"  http door acknowledged {n} events in {ingest:.1f}s = {n / ingest:.1f} events/s", flush=True)
    return row


async def kafka(client: Client, address: str, n: int, concurrency: int, mode: str) -> Row:
    raise SystemExit("the kafka door bench needs the kafka door (adapters/kafka.py)")


async def amqp(client: Client, address: str, n: int, concurrency: int, mode: str) -> Row:
    raise SystemExit("the amqp door bench needs the amqp door (adapters/amqp.py)")

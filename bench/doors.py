"""One function per door: push N events through it and time the targets' starts."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Any

import httpx
from temporalio.client import Client

from bench.__main__ import Row, door_row, now, start_times
from bridge.config import parse_config
from bridge.event import event_digest, target_workflow_id
from bridge.runtime.app import Bridge

TOKEN = "bench-token"


def bench_config(address: str, mode: str, **doors: Any) -> tuple[Any, str]:
    """A target on a queue no worker polls; its id is unique per run since run ids are namespace-wide."""
    queue = f"bench-idle-{uuid.uuid4().hex[:8]}"
    cfg = parse_config(
        {
            "project": f"bench-{uuid.uuid4().hex[:8]}",
            "temporal": {"address": address},
            "dispatcher": {"start_mode": mode},
            "http": {"port": 0, "auth": {"tokens": [TOKEN]}},
            "workflows": [{"id": queue, "workflow_type": "Noop", "task_queue": queue, "triggers": [{"name": "tick"}]}],
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
                acked[target_workflow_id(queue, event_digest("http", key))] = now()

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


async def _run_queue_door(client: Client, cfg: Any, queue: str, n: int, name: str, publish: Any) -> Row:
    """Start a bridge with the consumer, publish N messages, time from the first publish to the
    last target start. Acks here are broker confirms, so no per-event latency is reported."""
    bridge = Bridge(cfg, client=client, insecure=True)
    await bridge.start()
    try:
        began = now()
        await publish()
        started = await start_times(client, queue, n)
    finally:
        await bridge.stop()
    return Row(name, n, max(started.values()).timestamp() - began, [])


async def kafka(client: Client, address: str, n: int, concurrency: int, mode: str) -> Row:
    """N envelopes already on a 3-partition topic, then the bridge drains them into targets."""
    from aiokafka import AIOKafkaProducer
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    from tests import services

    bootstrap = services.kafka_bootstrap()
    topic = f"bench-{uuid.uuid4().hex[:8]}"
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, num_partitions=3, replication_factor=1)])
    finally:
        await admin.close()
    cfg, queue = bench_config(
        address, mode, kafka=[{"bootstrap_servers": bootstrap, "topics": [topic], "event": {"format": "envelope"}}]
    )
    cfg.http.auth.tokens = []

    async def publish() -> None:
        producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
        await producer.start()
        try:
            futures = [
                await producer.send(topic, json.dumps({"name": "tick", "id": f"k-{i}", "payload": {"i": i}}).encode())
                for i in range(n)
            ]
            await asyncio.gather(*futures)
        finally:
            await producer.stop()

    return await _run_queue_door(client, cfg, queue, n, f"kafka -> targets ({mode})", publish)


async def amqp(client: Client, address: str, n: int, concurrency: int, mode: str) -> Row:
    """N persistent messages already in the queue, then the bridge drains them into targets."""
    import aio_pika

    from tests import services

    url = services.amqp_url()
    name = f"bench-{uuid.uuid4().hex[:8]}"
    cfg, queue = bench_config(
        address,
        mode,
        amqp=[
            {
                "url": url,
                "queue": name,
                "bindings": [{"exchange": name, "exchange_type": "topic", "routing_key": "#"}],
                "event": {"format": "envelope"},
            }
        ],
    )

    async def publish() -> None:
        conn = await aio_pika.connect_robust(url)
        async with conn:
            ch = await conn.channel(publisher_confirms=True)
            ex = await ch.get_exchange(name)  # declared, with the queue and binding, by the bridge
            for i in range(n):
                body = json.dumps({"name": "tick", "id": f"a-{i}", "payload": {"i": i}}).encode()
                await ex.publish(
                    aio_pika.Message(body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT, message_id=f"a-{i}"),
                    routing_key="tick",
                )

    return await _run_queue_door(client, cfg, queue, n, f"amqp -> targets ({mode})", publish)

"""One runner per path into Temporal: the direct ceiling, then each adapter (push N events, time the
targets' starts)."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import httpx
from temporalio.client import Client

from bench.report import Row, adapter_row, now, start_times
from bridge.config import BridgeConfig, parse_config
from bridge.event import run_digest, target_workflow_id
from bridge.runtime.app import Bridge

TOKEN = "bench-token"


@dataclass(frozen=True)
class Setup:
    """What every runner gets: the Temporal server, the sizes, and the brokers' endpoints."""

    client: Client
    address: str
    events: int
    concurrency: int
    kafka_bootstrap: str | None = None
    amqp_url: str | None = None


def bench_config(address: str, mode: str, **adapters: Any) -> tuple[BridgeConfig, str]:
    """A target on a queue no worker polls; its id is unique per run since run ids are namespace-wide."""
    queue = f"bench-idle-{uuid.uuid4().hex[:8]}"
    cfg = parse_config(
        {
            "project": f"bench-{uuid.uuid4().hex[:8]}",
            "temporal": {"address": address},
            "dispatcher": {"start_mode": mode},
            "http": {"port": 0, "auth": {"tokens": [TOKEN]}},
            "workflows": [{"id": queue, "workflow_type": "Noop", "task_queue": queue, "triggers": [{"name": "tick"}]}],
            **adapters,
        },
        origin="bench",
    )
    return cfg, queue


async def ceiling(setup: Setup) -> Row:
    """N direct ``client.start_workflow`` calls of the target the adapters start."""
    queue = f"bench-direct-{uuid.uuid4().hex[:8]}"
    sem = asyncio.Semaphore(setup.concurrency)
    latencies: list[float] = []

    async def one(i: int) -> None:
        async with sem:
            t0 = time.perf_counter()
            await setup.client.start_workflow("Noop", {"i": i}, id=f"{queue}-{i}", task_queue=queue)
            latencies.append(time.perf_counter() - t0)

    began = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(setup.events)))
    return Row("direct start_workflow (ceiling)", setup.events, time.perf_counter() - began, latencies)


async def http(setup: Setup, mode: str) -> Row:
    n = setup.events
    cfg, queue = bench_config(setup.address, mode)
    bridge = Bridge(cfg, client=setup.client)
    await bridge.start()
    acked: dict[str, float] = {}
    sem = asyncio.Semaphore(setup.concurrency)
    url = f"http://127.0.0.1:{bridge.http_port}/api/v1/events"
    try:
        limits = httpx.Limits(max_connections=setup.concurrency)
        async with httpx.AsyncClient(timeout=60, limits=limits) as h:

            async def one(i: int) -> None:
                key = f"ev-{i}"
                async with sem:
                    resp = await h.post(
                        url,
                        json={"name": "tick", "payload": {"i": i}},
                        headers={"Authorization": f"Bearer {TOKEN}", "Idempotency-Key": key},
                    )
                assert resp.status_code == 202, resp.text
                acked[target_workflow_id(queue, run_digest(cfg.project, "http:token-1", key))] = now()

            began = now()
            t0 = time.perf_counter()
            await asyncio.gather(*(one(i) for i in range(n)))
            ingest = time.perf_counter() - t0
            started = await start_times(setup.client, queue, n)
    finally:
        await bridge.stop()
    row = adapter_row(f"http -> targets ({mode})", n, began, acked, started)
    print(f"  http adapter acknowledged {n} events in {ingest:.1f}s = {n / ingest:.1f} events/s", flush=True)
    return row


async def _run_queue_adapter(
    setup: Setup, cfg: BridgeConfig, queue: str, name: str, publish: Callable[[], Awaitable[None]]
) -> Row:
    """Start a bridge with the consumer, publish N messages, time from the first publish to the
    last target start. Acks here are broker confirms, so no per-event latency is reported."""
    bridge = Bridge(cfg, client=setup.client)
    await bridge.start()
    try:
        began = now()
        await publish()
        started = await start_times(setup.client, queue, setup.events)
    finally:
        await bridge.stop()
    return Row(name, setup.events, max(started.values()).timestamp() - began, [])


async def kafka(setup: Setup, mode: str) -> Row:
    """N envelopes already on a 3-partition topic, then the bridge drains them into targets."""
    from aiokafka import AIOKafkaProducer
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    bootstrap = setup.kafka_bootstrap
    assert bootstrap, "KAFKA_BOOTSTRAP_SERVERS is not set"
    topic = f"bench-{uuid.uuid4().hex[:8]}"
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, num_partitions=3, replication_factor=1)])
    finally:
        await admin.close()
    cfg, queue = bench_config(
        setup.address,
        mode,
        kafka=[{"bootstrap_servers": bootstrap, "topics": [topic], "event": {"format": "envelope"}}],
    )

    async def publish() -> None:
        producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
        await producer.start()
        try:
            futures = [
                await producer.send(topic, json.dumps({"name": "tick", "id": f"k-{i}", "payload": {"i": i}}).encode())
                for i in range(setup.events)
            ]
            await asyncio.gather(*futures)
        finally:
            await producer.stop()

    return await _run_queue_adapter(setup, cfg, queue, f"kafka -> targets ({mode})", publish)


async def amqp(setup: Setup, mode: str) -> Row:
    """N persistent messages already in the queue, then the bridge drains them into targets."""
    import aio_pika

    url = setup.amqp_url
    assert url, "AMQP_URL is not set"
    name = f"bench-{uuid.uuid4().hex[:8]}"
    cfg, queue = bench_config(
        setup.address,
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
            for i in range(setup.events):
                body = json.dumps({"name": "tick", "id": f"a-{i}", "payload": {"i": i}}).encode()
                await ex.publish(
                    aio_pika.Message(body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT, message_id=f"a-{i}"),
                    routing_key="tick",
                )

    return await _run_queue_adapter(setup, cfg, queue, f"amqp -> targets ({mode})", publish)


RUNNERS: dict[str, Callable[[Setup, str], Awaitable[Row]]] = {"http": http, "kafka": kafka, "amqp": amqp}

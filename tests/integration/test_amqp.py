"""The RabbitMQ adapter against a real broker and a real Temporal: once per event, whatever restarts.

Every message is published persistent, with publisher confirms and ``mandatory`` (so a message
that reached no queue fails the test instead of vanishing). "Exactly once" is checked two ways:
the set of runner workflow ids on the project's task queue equals the set derived from the
published event ids, and the visibility count equals N.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import signal
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import aio_pika
import httpx
import pytest
import yaml
from temporalio.client import Client

from adapters.amqp import AmqpAdapter
from bridge.config import AmqpConsumer, project_slug
from bridge.event import EventSignal, run_digest, target_workflow_id
from bridge.pipeline import Pipeline
from bridge.routing import RouteTable
from bridge.runtime.app import Bridge
from bridge.runtime.embedded import free_port
from tests import services
from tests.helpers import (
    assert_eventually,
    config,
    count_workflows,
    dispatcher_stats,
    result_of,
    runner,
    unique,
    workflow_ids,
)

pytestmark = [pytest.mark.amqp, pytest.mark.temporal]
log = logging.getLogger(__name__)

Publish = tuple[str, bytes, dict[str, Any]]  # routing key, body, message properties


# --- helpers -------------------------------------------------------------------------------


def amqp_entry(url: str, queue: str, exchange: str, **extra: Any) -> dict[str, Any]:
    return {
        "url": url,
        "queue": queue,
        "bindings": [{"exchange": exchange, "exchange_type": "topic", "routing_key": "order.#"}],
        "prefetch": 50,
        "event": {"format": "raw", "name_from": "routing_key"},
        **extra,
    }


def orders(prefix: str, n: int, start: int = 0) -> list[Publish]:
    return [("order.created", b'{"n": %d}' % i, {"message_id": f"{prefix}-{i}"}) for i in range(start, start + n)]


async def publish(url: str, exchange: str, messages: Iterable[Publish]) -> None:
    """Persistent, confirmed, mandatory: returns only once the broker queued every message."""
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        target = await channel.get_exchange(exchange)
        pending = list(messages)
        for i in range(0, len(pending), 100):
            await asyncio.gather(
                *(
                    target.publish(
                        aio_pika.Message(body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT, **props),
                        routing_key=key,
                        mandatory=True,
                    )
                    for key, body, props in pending[i : i + 100]
                )
            )


async def depth(url: str, queue: str) -> tuple[int, int]:
    """(messages ready, consumers) of a queue; unacked deliveries are not in the first number."""
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        declared = await channel.declare_queue(queue, passive=True)
        result = declared.declaration_result
        return result.message_count, result.consumer_count


def idle_target(wf: str, task_queue: str, *names: str) -> dict[str, Any]:
    """A user workflow on a queue no worker polls: its runs start (what we count) and cost no work,
    so a volume test measures the adapter and the dispatcher, not the task runner."""
    return {"id": wf, "workflow_type": "Idle", "task_queue": task_queue, "triggers": [{"name": n} for n in names]}


def expected_runs(project: str, wf: str, source: str, ids: Iterable[str]) -> set[str]:
    return {target_workflow_id(wf, run_digest(project, source, i)) for i in ids}


def runner_query(project: str) -> str:
    return f'WorkflowType="SignalBridgeTasks" AND TaskQueue="{project_slug(project)}"'


async def assert_ran_once(client: Client, query: str, expected: set[str], timeout: float = 120.0) -> None:
    """Every expected run exists and nothing else does: the id set and the count both match."""

    async def all_there() -> bool:
        return await count_workflows(client, query) >= len(expected)

    await assert_eventually(all_there, timeout=timeout, interval=1.0, what=f"{len(expected)} runs")
    ids = await workflow_ids(client, query)
    assert len(ids) == len(set(ids))
    missing, extra = expected - set(ids), set(ids) - expected
    assert not missing and not extra, f"missing {len(missing)}, unexpected {len(extra)}"
    assert await count_workflows(client, query) == len(expected)


def accepted(bridge: Bridge) -> float:
    return bridge.metrics.registry.get_sample_value("signal_bridge_events_accepted_total", {"adapter": "amqp"}) or 0.0


async def duplicates(client: Client, project: str) -> int:
    """Redeliveries the dispatcher recognised (informational: a test cannot force them)."""
    return int((await dispatcher_stats(client, project))["duplicates"])


class ServeProcess:
    """``signal-bridge serve`` as a child process, so it can be SIGKILLed or run twice."""

    def __init__(self, workdir: Path, config: dict[str, Any]) -> None:
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.config_path = workdir / "bridge.yaml"
        self.config_path.write_text(yaml.safe_dump({**config, "http": {"port": self.port}}))
        self.log_path = workdir / "bridge.log"
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("SIGNAL_BRIDGE_")}
        with open(self.log_path, "ab") as out:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "bridge.runtime.cli", "serve", "--config", str(self.config_path), "--insecure",
                cwd=self.workdir, env=env, stdin=asyncio.subprocess.DEVNULL, stdout=out, stderr=out,
            )  # fmt: skip
        await assert_eventually(self._ready, timeout=60, interval=0.3, what=lambda: f"bridge ready; {self.log_tail()}")

    async def _ready(self) -> bool:
        assert self.proc is not None
        assert self.proc.returncode is None, f"bridge exited with {self.proc.returncode}: {self.log_tail()}"
        try:
            async with httpx.AsyncClient(timeout=5) as http:
                return (await http.get(f"http://127.0.0.1:{self.port}/readyz")).status_code == 200
        except httpx.HTTPError:
            return False

    async def accepted(self) -> float:
        async with httpx.AsyncClient(timeout=5) as http:
            text = (await http.get(f"http://127.0.0.1:{self.port}/metrics")).text
        match = re.search(r'^signal_bridge_events_accepted_total\{adapter="amqp"\} (\S+)$', text, re.M)
        return float(match.group(1)) if match else 0.0

    async def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        await self.proc.wait()

    async def stop(self) -> None:
        if self.proc is None or self.proc.returncode is not None:
            return
        self.proc.terminate()
        try:
            await asyncio.wait_for(self.proc.wait(), 30)
        except TimeoutError:
            await self.kill()

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


# Some volume tests start their targets from the dispatcher's activity (same ids, same dedupe):
# they test the adapter, and this keeps many runs quick on a 2-core CI machine. The others keep the
# default child mode; the SIGKILL test must, since a killed worker's start activity is only retried
# after its 60 s start-to-close timeout.
FAST_STARTS = {"start_mode": "activity"}


def serve_config(
    project: str, temporal_address: str, workflows: list[Any], amqp: dict[str, Any], **dispatcher: Any
) -> dict[str, Any]:
    return {
        "project": project,
        "temporal": {"address": temporal_address},
        "dispatcher": dispatcher,
        "workflows": workflows,
        "amqp": [amqp],
    }


# --- throughput ------------------------------------------------------------------------------


@pytest.mark.timeout(600)
async def test_2000_messages_start_exactly_2000_runs(bridge_factory, temporal_client, temporal_address, amqp_url):
    n = 2000
    project, queue, exchange, idle = unique("amqp-bulk"), unique("q"), unique("ex"), unique("idle")
    cfg = config(
        project,
        temporal_address,
        [idle_target("bulk", idle, "order.created")],
        amqp=[amqp_entry(amqp_url, queue, exchange, prefetch=200)],
        dispatcher=FAST_STARTS,
    )
    bridge = await bridge_factory(cfg)
    began = time.monotonic()
    await publish(amqp_url, exchange, orders("bulk", n))
    published = time.monotonic()
    await assert_eventually(lambda: accepted(bridge) == n, timeout=120, what="adapter accepted every message")
    adapter_done = time.monotonic()
    expected = expected_runs(project, "bulk", f"amqp:{queue}", (f"bulk-{i}" for i in range(n)))
    await assert_ran_once(temporal_client, f'TaskQueue="{idle}"', expected, timeout=420)
    log.warning(
        "amqp 2000: published in %.1fs, Temporal held all after %.1fs, all %d runs visible after %.1fs",
        published - began,
        adapter_done - began,
        n,
        time.monotonic() - began,
    )
    assert await depth(amqp_url, queue) == (0, 1)
    signals = bridge.metrics.registry.get_sample_value("signal_bridge_signals_sent_total") or 0
    assert signals < n / 10, f"{signals} signals for {n} events: the adapter is not batching"


# --- poison messages -------------------------------------------------------------------------


async def test_poison_messages_are_dead_lettered_and_good_ones_around_them_run(
    bridge_factory, temporal_client, temporal_address, amqp_url
):
    project, queue, exchange = unique("amqp-dlx"), unique("q"), unique("ex")
    dlx = f"{exchange}.dlx"
    typed = runner("typed", "order.created")
    typed["triggers"][0]["schema"] = {"type": "object", "required": ["n"]}
    entry = amqp_entry(amqp_url, queue, exchange, dead_letter_exchange=dlx, event={"format": "envelope"})
    bridge = await bridge_factory(config(project, temporal_address, [typed], amqp=[entry]))

    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        # The bridge declared its queue with x-dead-letter-exchange: an equal declaration succeeds,
        # any other would close the channel with PRECONDITION_FAILED.
        await channel.declare_queue(queue, durable=True, arguments={"x-dead-letter-exchange": dlx})
        dead = await channel.declare_queue(unique("dlq"), exclusive=True)
        await dead.bind(dlx, routing_key="")

        def env(name: str, payload: Any) -> bytes:
            return json.dumps({"name": name, "payload": payload}).encode()

        good = [("order.created", env("order.created", {"n": i}), {"message_id": f"good-{i}"}) for i in range(6)]
        poison = {
            "p-json": (b"{not json", "malformed"),
            "p-noname": (json.dumps({"payload": {"n": 1}}).encode(), "no_name"),
            "p-schema": (env("order.created", {"other": 1}), "schema_invalid"),
            "p-unroutable": (env("order.typo", {"n": 1}), "unroutable"),
        }
        bad = [("order.created", body, {"message_id": mid}) for mid, (body, _) in poison.items()]
        # Interleaved: good, poison, good, poison, ...
        mixed = [m for pair in zip(good, bad, strict=False) for m in pair] + good[len(bad) :]
        await publish(amqp_url, exchange, mixed)

        expected = expected_runs(project, "typed", f"amqp:{queue}", (f"good-{i}" for i in range(6)))
        await assert_ran_once(temporal_client, runner_query(project), expected)
        got = await result_of(
            temporal_client, target_workflow_id("typed", run_digest(project, f"amqp:{queue}", "good-3"))
        )
        assert got["tasks"]["render"] == "got 3"

        letters: dict[str, Any] = {}

        async def all_dead_lettered() -> bool:
            while (message := await dead.get(fail=False, no_ack=True)) is not None:
                letters[message.message_id or ""] = message
            return len(letters) >= len(poison)

        await assert_eventually(all_dead_lettered, what="poison messages in the dead-letter exchange")
        # Letters go on a connection of their own: RabbitMQ blocks a connection that publishes
        # during a memory or disk alarm and stops reading it, so on the consumer's one letter would
        # hold every ack of events Temporal already has.
        [adapter] = bridge.adapters
        assert isinstance(adapter, AmqpAdapter) and adapter._publisher is not None and adapter._channel is not None
        assert adapter._letters is not None and adapter._letters is not adapter._connection
        letters_side = (await adapter._publisher.get_underlay_channel()).connection
        assert letters_side is not (await adapter._channel.get_underlay_channel()).connection
    assert set(letters) == set(poison)
    for mid, (body, why) in poison.items():
        headers = letters[mid].headers
        assert letters[mid].body == body
        assert headers["x-dead-letter-reason"] == why, (mid, headers)
        assert headers["x-original-queue"] == queue and headers["x-original-exchange"] == exchange
    registry = bridge.metrics.registry
    for why in ("malformed", "no_name", "schema_invalid", "unroutable"):
        assert registry.get_sample_value("signal_bridge_events_rejected_total", {"adapter": "amqp", "reason": why}) == 1
    assert await depth(amqp_url, queue) == (0, 1)


class RecordingSink:
    """Stands in for Temporal where the point of the test is RabbitMQ's topology."""

    def __init__(self) -> None:
        self.ids: list[str] = []

    async def submit(self, events: Sequence[EventSignal]) -> None:
        self.ids.extend(e.id for e in events)


@pytest.mark.timeout(60)
async def test_existing_topology_with_other_arguments_is_used_as_it_is(amqp_url):
    """A queue declared without x-dead-letter-exchange and an exchange of another type: the bridge
    warns, consumes, and still dead-letters by republishing."""
    queue, exchange = unique("q"), unique("ex")
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        await channel.declare_exchange(exchange, aio_pika.ExchangeType.DIRECT, durable=False, auto_delete=True)
        await channel.declare_queue(queue, durable=True, auto_delete=True)
        entry = AmqpConsumer.model_validate(
            amqp_entry(amqp_url, queue, exchange, dead_letter_exchange=f"{exchange}.dlx")
            | {"bindings": [{"exchange": exchange, "exchange_type": "topic", "routing_key": "order.created"}]}
        )
        sink = RecordingSink()
        cfg = config(unique("topo"), "127.0.0.1:1", [runner("t", "order.created")])
        adapter = AmqpAdapter(entry, Pipeline(RouteTable.from_config(cfg), sink))
        await adapter.start()
        try:
            assert adapter.healthy()
            dead = await channel.declare_queue(exclusive=True)
            await dead.bind(f"{exchange}.dlx")
            await publish(amqp_url, exchange, [*orders("topo", 3), ("order.created", b"nope", {"message_id": "bad"})])
            await assert_eventually(lambda: sink.ids == ["topo-0", "topo-1", "topo-2"], timeout=20)
            letter = await assert_eventually(lambda: dead.get(fail=False, no_ack=True), timeout=20)
            assert letter.message_id == "bad" and letter.headers["x-dead-letter-reason"] == "malformed"
            assert await depth(amqp_url, queue) == (0, 1)
        finally:
            await adapter.stop()
            await channel.exchange_delete(f"{exchange}.dlx")


# --- CloudEvents -------------------------------------------------------------------------


async def test_cloudevents_over_amqp_route_by_type(bridge_factory, temporal_client, temporal_address, amqp_url):
    project, queue, exchange = unique("amqp-ce"), unique("q"), unique("ex")
    entry = amqp_entry(amqp_url, queue, exchange, event={"format": "cloudevents"})
    entry["bindings"][0]["routing_key"] = "#"
    workflows = [runner("created", "order.created"), runner("paid", "order.paid")]
    await bridge_factory(config(project, temporal_address, workflows, amqp=[entry]))
    source = "/shop/orders"  # the CloudEvent's own source: part of its event id, not its scope
    scope = f"amqp:{queue}"

    def binary(prefix: str, ce_id: str, ce_type: str, n: int) -> Publish:
        headers = {
            f"{prefix}specversion": "1.0",
            f"{prefix}id": ce_id,
            f"{prefix}source": source,
            f"{prefix}type": ce_type,
        }
        # The routing key says nothing about the event: the CloudEvents type routes it.
        return ("misc.key", json.dumps({"n": n}).encode(), {"headers": headers, "content_type": "application/json"})

    structured = {"specversion": "1.0", "id": "ce-3", "source": source, "type": "order.created", "data": {"n": 3}}
    await publish(
        amqp_url,
        exchange,
        [
            binary("cloudEvents_", "ce-1", "order.created", 1),
            binary("cloudEvents:", "ce-2", "order.paid", 2),
            ("other.key", json.dumps(structured).encode(), {"content_type": "application/cloudevents+json"}),
        ],
    )
    for wf, ce_id, n in (("created", "ce-1", 1), ("paid", "ce-2", 2), ("created", "ce-3", 3)):
        got = await result_of(temporal_client, target_workflow_id(wf, run_digest(project, scope, f"{source}#{ce_id}")))
        assert got["tasks"]["render"] == f"got {n}"
    expected = {
        target_workflow_id(wf, run_digest(project, scope, f"{source}#{i}"))
        for wf, i in (("created", "ce-1"), ("paid", "ce-2"), ("created", "ce-3"))
    }
    await assert_ran_once(temporal_client, runner_query(project), expected)


# --- crashes and restarts ------------------------------------------------------------------


async def test_bridge_sigkilled_mid_stream_then_restarted_runs_each_message_once(
    tmp_path, temporal_client, temporal_address, amqp_url
):
    n = 300
    project, queue, exchange, idle = unique("amqp-kill"), unique("q"), unique("ex"), unique("idle")
    cfg = serve_config(
        project,
        temporal_address,
        [idle_target("t", idle, "order.created")],
        amqp_entry(amqp_url, queue, exchange, prefetch=10),
    )
    first = ServeProcess(tmp_path / "first", cfg)
    second = ServeProcess(tmp_path / "second", cfg)
    try:
        await first.start()

        async def trickle() -> None:
            """A steady stream, so the kill lands while messages are still coming."""
            for i in range(0, n, 10):
                await publish(amqp_url, exchange, orders("k", 10, start=i))

        publisher = asyncio.create_task(trickle())
        await assert_eventually(lambda: _positive(first.accepted()), interval=0.05, what="first bridge took events")
        await first.kill()
        at_kill = (await depth(amqp_url, queue))[0]
        await publisher
        ready, consumers = await depth(amqp_url, queue)
        assert consumers == 0 and ready > 0, "the kill did not land mid-stream"
        log.warning("amqp sigkill: %d ready at the kill, %d after the stream; restarting", at_kill, ready)

        await second.start()
        await assert_ran_once(
            temporal_client,
            f'TaskQueue="{idle}"',
            expected_runs(project, "t", f"amqp:{queue}", (f"k-{i}" for i in range(n))),
        )
        await assert_eventually(lambda: _equals(depth(amqp_url, queue), (0, 1)), what="queue drained")
        log.warning("amqp sigkill: %d redeliveries deduplicated", await duplicates(temporal_client, project))
    finally:
        await first.stop()
        await second.stop()


async def test_two_bridge_processes_compete_and_run_each_event_once(
    tmp_path, temporal_client, temporal_address, amqp_url
):
    n = 400
    project, queue, exchange, idle = unique("amqp-two"), unique("q"), unique("ex"), unique("idle")
    cfg = serve_config(
        project,
        temporal_address,
        [idle_target("t", idle, "order.created")],
        amqp_entry(amqp_url, queue, exchange, prefetch=20),
        **FAST_STARTS,
    )
    bridges = [ServeProcess(tmp_path / f"b{k}", cfg) for k in range(2)]
    try:
        await asyncio.gather(*(b.start() for b in bridges))
        await assert_eventually(lambda: _equals(depth(amqp_url, queue), (0, 2)), what="two consumers on the queue")
        await publish(amqp_url, exchange, orders("two", n))
        await assert_ran_once(
            temporal_client,
            f'TaskQueue="{idle}"',
            expected_runs(project, "t", f"amqp:{queue}", (f"two-{i}" for i in range(n))),
        )
        shares = [await b.accepted() for b in bridges]
        assert all(s > 0 for s in shares), f"one bridge took nothing: {shares}"
        assert sum(shares) == n, shares
    finally:
        await asyncio.gather(*(b.stop() for b in bridges))


async def test_rabbitmq_restart_mid_stream_consumer_recovers_by_itself(temporal_client, temporal_address):
    rabbit = services.LocalRabbitMQ()
    await asyncio.to_thread(rabbit.start)
    project, queue, exchange, idle = unique("amqp-rmq"), unique("q"), unique("ex"), unique("idle")
    cfg = config(
        project,
        temporal_address,
        [idle_target("t", idle, "order.created")],
        amqp=[amqp_entry(rabbit.url, queue, exchange, prefetch=20)],
        dispatcher=FAST_STARTS,
    )
    bridge = Bridge(cfg, client=temporal_client)
    try:
        await bridge.start()
        [adapter] = bridge.adapters
        await publish(rabbit.url, exchange, orders("r", 200))
        # Restart while the adapter is still working through the first 200.
        await asyncio.to_thread(rabbit.restart)
        at_restart = accepted(bridge)
        assert at_restart < 200, "the restart came after the first 200 were all taken: not mid-stream"
        await assert_eventually(adapter.healthy, timeout=60, what="consumer reconnected by itself")
        await publish(rabbit.url, exchange, orders("r", 200, start=200))
        await assert_ran_once(
            temporal_client,
            f'TaskQueue="{idle}"',
            expected_runs(project, "t", f"amqp:{queue}", (f"r-{i}" for i in range(400))),
        )
        await assert_eventually(lambda: _equals(depth(rabbit.url, queue), (0, 1)), what="queue drained")
        log.warning(
            "amqp rabbitmq restart: %d accepted before the restart, %d in all, %d duplicates",
            at_restart,
            accepted(bridge),
            await duplicates(temporal_client, project),
        )
    finally:
        await bridge.stop()
        await asyncio.to_thread(rabbit.close)


async def test_a_deleted_queue_turns_readyz_red_until_the_consumer_is_back(
    bridge_factory, temporal_client, temporal_address, amqp_url
):
    """RabbitMQ cancels the consumer of a queue that is deleted. A queue the operator declared (with
    arguments of their own: the adapter uses it as it is, passively) is not declared again, so
    aio-pika's tries to consume again fail, at DEBUG, for as long as it is gone: /readyz stayed
    green all that time while nothing was read. Once the queue is back, it runs on."""
    project, queue, exchange, idle = unique("amqp-del"), unique("q"), unique("ex"), unique("idle")
    own = {"x-max-length": 100_000}
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        await channel.declare_queue(queue, durable=True, arguments=own)
    cfg = config(
        project,
        temporal_address,
        [idle_target("t", idle, "order.created")],
        amqp=[amqp_entry(amqp_url, queue, exchange)],
    )
    bridge = await bridge_factory(cfg)
    [adapter] = bridge.adapters
    assert isinstance(adapter, AmqpAdapter) and adapter.healthy()
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        await channel.queue_delete(queue)
        await assert_eventually(lambda: not adapter.healthy(), timeout=30, what="readyz red without a consumer")
        await asyncio.sleep(5)
        assert not adapter.healthy()
        queue_back = await channel.declare_queue(queue, durable=True, arguments=own)
        await queue_back.bind(exchange, routing_key="order.#")
    await assert_eventually(adapter.healthy, timeout=60, what="consuming again")
    await publish(amqp_url, exchange, orders("del", 3))
    await assert_ran_once(
        temporal_client,
        f'TaskQueue="{idle}"',
        expected_runs(project, "t", f"amqp:{queue}", (f"del-{i}" for i in range(3))),
    )


@pytest.mark.timeout(300)
async def test_temporal_down_15s_messages_wait_unacked_then_flow(amqp_url):
    temporal = services.LocalTemporal()
    await asyncio.to_thread(temporal.start)
    project, queue, exchange, idle = unique("amqp-tdown"), unique("q"), unique("ex"), unique("idle")
    prefetch, before, during = 50, 20, 200
    cfg = config(
        project,
        temporal.address,
        [idle_target("t", idle, "order.created")],
        amqp=[amqp_entry(amqp_url, queue, exchange, prefetch=prefetch)],
    )
    bridge = Bridge(cfg)
    try:
        await bridge.start()
        [adapter] = bridge.adapters
        client = await Client.connect(temporal.address)
        await publish(amqp_url, exchange, orders("d", before))
        first = expected_runs(project, "t", f"amqp:{queue}", (f"d-{i}" for i in range(before)))
        await assert_ran_once(client, f'TaskQueue="{idle}"', first)

        await asyncio.to_thread(temporal.stop)
        await publish(amqp_url, exchange, orders("d", during, start=before))
        # The adapter holds one prefetch window unacked and RabbitMQ keeps the rest.
        await assert_eventually(
            lambda: adapter.waiting_for_temporal and _equals(depth(amqp_url, queue), (during - prefetch, 1)),
            what="adapter waiting with a full window",
        )
        held = accepted(bridge)
        assert held == before
        outage_ends = time.monotonic() + 15
        while time.monotonic() < outage_ends:
            assert await depth(amqp_url, queue) == (during - prefetch, 1), "a message was acked or lost"
            assert accepted(bridge) == held
            await asyncio.sleep(0.5)

        await asyncio.to_thread(temporal.start)
        client = await Client.connect(temporal.address)
        expected = expected_runs(project, "t", f"amqp:{queue}", (f"d-{i}" for i in range(before + during)))
        await assert_ran_once(client, f'TaskQueue="{idle}"', expected, timeout=180)
        assert not adapter.waiting_for_temporal
        assert await depth(amqp_url, queue) == (0, 1)
    finally:
        await bridge.stop()
        await asyncio.to_thread(temporal.close)


async def _positive(value: Any) -> bool:
    return await value > 0


async def _equals(value: Any, expected: Any) -> bool:
    got = await value
    assert got == expected, got
    return True


# --- poison that once stalled the queue, and dead letters that must get out ---------------------


async def test_deep_nan_invalid_utf8_and_oversized_messages_are_dead_lettered_and_the_queue_drains(
    bridge_factory, temporal_client, temporal_address, amqp_url
):
    """Messages that once stalled a consumer (nested past the SDK encoder's depth, NaN, invalid
    UTF-8, a 5,000-digit integer, a 600 KB unroutable envelope with 100 KB of headers whose copy
    no longer fit a frame), interleaved with good ones: every good message runs once, every poison
    one reaches a queue bound to the dead-letter exchange with its reason, and the queue drains."""
    project, queue, exchange = unique("amqp-poison"), unique("q"), unique("ex")
    dlx = f"{exchange}.dlx"
    entry = amqp_entry(amqp_url, queue, exchange, dead_letter_exchange=dlx, event={"format": "envelope"})
    bridge = await bridge_factory(config(project, temporal_address, [runner("orders", "order.created")], amqp=[entry]))
    big = "x" * 300_000
    wide_headers = {f"h{i}": "v" * 4_000 for i in range(25)}  # 100 KB: the original fits a 128 KiB frame
    poison: dict[str, tuple[bytes, dict[str, Any], str]] = {
        "p-deep-2400": (
            b'{"name": "order.created", "payload": {"a": ' + b"[" * 2_400 + b"]" * 2_400 + b"}}",
            {},
            "malformed",
        ),
        "p-deep-2475": (b"[" * 2_475 + b"]" * 2_475, {}, "malformed"),
        "p-deep-2600": (b'{"k":' * 2_600 + b"1" + b"}" * 2_600, {}, "malformed"),
        "p-nan": (b'{"name": "order.created", "payload": {"n": NaN}}', {}, "malformed"),
        "p-utf8": (b'{"name": "order.created", "payload": {"n": "\xff\xfe"}}', {}, "malformed"),
        "p-int": (b'{"name": "order.created", "payload": {"n": ' + b"9" * 5_000 + b"}}", {}, "malformed"),
        "p-oversized": (
            json.dumps({"name": f"order.unheard-of-{big}", "id": f"id-{big}", "payload": {}}).encode(),
            wide_headers,
            "malformed",  # its id and name are over 4,096 characters
        ),
    }

    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        dead = await channel.declare_queue(unique("dlq"), exclusive=True)
        await dead.bind(dlx, routing_key="")
        good = [
            (
                "order.created",
                json.dumps({"name": "order.created", "payload": {"n": i}}).encode(),
                {"message_id": f"g-{i}"},
            )
            for i in range(10)
        ]
        bad = [
            ("order.created", body, {"message_id": mid, "headers": headers} if headers else {"message_id": mid})
            for mid, (body, headers, _) in poison.items()
        ]
        await publish(amqp_url, exchange, [m for pair in zip(good, bad, strict=False) for m in pair] + good[len(bad) :])

        expected = expected_runs(project, "orders", f"amqp:{queue}", (f"g-{i}" for i in range(10)))
        await assert_ran_once(temporal_client, runner_query(project), expected)
        letters: dict[str, Any] = {}

        async def all_dead_lettered() -> bool:
            while (message := await dead.get(fail=False, no_ack=True)) is not None:
                letters[message.message_id or ""] = message
            return len(letters) >= len(poison)

        await assert_eventually(all_dead_lettered, what="poison messages in the dead-letter exchange")
    assert set(letters) == set(poison)
    for mid, (body, _, why) in poison.items():
        assert letters[mid].body == body
        assert letters[mid].headers["x-dead-letter-reason"] == why, (mid, letters[mid].headers["x-dead-letter-error"])
    oversized = letters["p-oversized"].headers
    assert oversized["x-dead-letter-trimmed"] == "headers" and len(oversized["x-event-id"]) <= 4_096
    assert oversized["h0"] == "v" * 4_000
    assert await depth(amqp_url, queue) == (0, 1)
    assert bridge.adapters[0].healthy() and not bridge.adapters[0].waiting_for_temporal
    rejected = bridge.metrics.registry.get_sample_value
    assert rejected("signal_bridge_events_rejected_total", {"adapter": "amqp", "reason": "malformed"}) == 7


async def test_a_dead_letter_the_broker_refuses_is_retried_holding_the_message_never_dropped(
    bridge_factory, temporal_address, amqp_url
):
    """A queue bound to the dead-letter exchange that rejects publishes (full, ``reject-publish``)
    makes RabbitMQ nack the letter: the poison message stays unacked and the letter is retried,
    until the queue is unbound; then it is written, and the message acked."""
    project, queue, exchange = unique("amqp-nack"), unique("q"), unique("ex")
    dlx = f"{exchange}.dlx"
    entry = amqp_entry(amqp_url, queue, exchange, dead_letter_exchange=dlx, event={"format": "envelope"})
    bridge = await bridge_factory(config(project, temporal_address, [runner("orders", "order.created")], amqp=[entry]))
    [adapter] = bridge.adapters

    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        dead = await channel.declare_queue(unique("dlq"), exclusive=True)
        await dead.bind(dlx, routing_key="")
        full = await channel.declare_queue(
            unique("full"), exclusive=True, arguments={"x-max-length": 0, "x-overflow": "reject-publish"}
        )
        await full.bind(dlx, routing_key="")
        await publish(amqp_url, exchange, [("order.created", b"{not json", {"message_id": "p-1"})])

        async def retrying() -> bool:
            assert adapter.settler.waiting and adapter.settler.failures >= 2
            return True

        await assert_eventually(retrying, timeout=30, what="the refused dead letter retried")
        assert (await depth(amqp_url, queue))[0] == 0  # held unacked by the adapter, not dropped
        dropped = bridge.metrics.registry.get_sample_value
        assert not dropped("signal_bridge_events_dropped_total", {"adapter": "amqp", "reason": "malformed"})

        await full.unbind(dlx, routing_key="")
        await assert_eventually(lambda: not adapter.settler.waiting, timeout=30, what="the letter written")
        letter = await assert_eventually(lambda: dead.get(fail=False, no_ack=True), timeout=10)
        assert letter.message_id == "p-1" and letter.headers["x-dead-letter-reason"] == "malformed"
        assert await depth(amqp_url, queue) == (0, 1)


async def test_properties_the_client_cannot_read_no_longer_close_the_connection_for_ever(
    bridge_factory, temporal_client, temporal_address, amqp_url, monkeypatch
):
    """A publisher (in any language) may send a message_id that is not UTF-8 or a timestamp past
    any datetime; RabbitMQ passes them on. aio-pika's codec refused the frame, the connection
    closed, and the message came back for ever. Now they are read, and the events run."""
    import pamqp.common
    import pamqp.encode

    def raw_timestamp(value: Any) -> bytes:
        return pamqp.common.Struct.timestamp.pack(value) if isinstance(value, int) else real_timestamp(value)

    def raw_short_string(value: Any) -> bytes:
        return bytes([len(value)]) + value if isinstance(value, bytes) else real_short_string(value)

    real_timestamp, real_short_string = pamqp.encode.timestamp, pamqp.encode.short_string
    monkeypatch.setitem(pamqp.encode.METHODS, "timestamp", raw_timestamp)
    monkeypatch.setitem(pamqp.encode.METHODS, "shortstr", raw_short_string)

    project, queue, exchange = unique("amqp-props"), unique("q"), unique("ex")
    entry = amqp_entry(amqp_url, queue, exchange, event={"format": "envelope"})
    bridge = await bridge_factory(config(project, temporal_address, [runner("orders", "order.created")], amqp=[entry]))
    [adapter] = bridge.adapters

    def env(i: int) -> bytes:
        return json.dumps({"name": "order.created", "id": f"e-{i}", "payload": {"n": i}}).encode()

    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        target = await channel.get_exchange(exchange)
        bad_stamp = aio_pika.Message(env(1), message_id="m-1")
        bad_stamp.timestamp = 2**63 - 1  # type: ignore[assignment]
        bad_id = aio_pika.Message(env(2))
        bad_id.message_id = b"\xff\xfe"  # type: ignore[assignment]
        for message in (bad_stamp, bad_id, aio_pika.Message(env(3), message_id="m-3")):
            await target.publish(message, routing_key="order.created")

    expected = expected_runs(project, "orders", f"amqp:{queue}", ("e-1", "e-2", "e-3"))
    await assert_ran_once(temporal_client, runner_query(project), expected)
    await assert_eventually(lambda: _equals(depth(amqp_url, queue), (0, 1)), what="queue drained")
    assert adapter.healthy()

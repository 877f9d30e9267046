"""Events delivered to runs that are already open (``signal:`` on a workflow entry), against a real
Temporal dev server, Kafka and RabbitMQ: each run gets each event exactly once, in the order the
events were accepted, through duplicates, redeliveries and a SIGKILLed bridge.

The user's workflow is defined here and runs on a worker of this process: it records every
``payment`` signal's argument and answers the ``state`` query with them. Exactly once and order
are read from that list; the dispatcher's ``stats`` query says when every event was dealt with.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import subprocess
import sys
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import aio_pika
import httpx
import pytest
import yaml
from aiokafka import AIOKafkaConsumer
from temporalio import workflow
from temporalio.client import Client, WorkflowExecutionStatus
from temporalio.service import RPCError, RPCStatusCode
from temporalio.testing import ActivityEnvironment
from temporalio.worker import Worker

from bridge import snapshot
from bridge.errors import ConfigError
from bridge.runtime.app import Bridge
from bridge.snapshot import Snapshot
from dispatcher.activities import BridgeActivities
from dispatcher.contract import SIGNAL_STARTED, SIGNALED, StartBatch, TargetInput, TargetStart
from dispatcher.search import quoted
from tests.helpers import (
    HTTP_SCOPE,
    TOKEN,
    assert_eventually,
    config,
    count_workflows,
    dispatcher_stats,
    runner,
    unique,
)
from tests.integration.test_amqp import publish
from tests.integration.test_kafka import BridgeProcess, assert_all_committed, create_topic, envelope, produce

pytestmark = pytest.mark.temporal

ORDER_WORKFLOW = "SignalsTestOrder"
PAYMENT = "payment.completed"
ENTRY = "order-payments"
SCHEMA = {"type": "object", "required": ["orderId"]}


@workflow.defn(name=ORDER_WORKFLOW, sandboxed=False)
class OrderWorkflow:
    """The user's workflow: open as long as its order is, it records every ``payment`` signal."""

    @workflow.init
    def __init__(self, inp: dict[str, Any]) -> None:
        self._input = inp
        self._payments: list[dict[str, Any]] = []

    @workflow.run
    async def run(self, inp: dict[str, Any]) -> None:
        await workflow.wait_condition(lambda: False)

    @workflow.signal(name="payment")
    def payment(self, arg: dict[str, Any]) -> None:
        self._payments.append(arg)

    @workflow.query(name="state")
    def state(self) -> dict[str, Any]:
        return {"input": self._input, "payments": self._payments}

    @workflow.query(name="event_ids")
    def event_ids(self) -> list[str]:
        return [p["event"]["id"] for p in self._payments]


# --- helpers -------------------------------------------------------------------------------


def signal_entry(queue: str, if_missing: str = "skip", template: str = "{{ .trigger.orderId }}") -> dict[str, Any]:
    return {
        "id": ENTRY,
        "workflow_type": ORDER_WORKFLOW,
        "task_queue": queue,
        "signal": {"name": "payment", "workflow_id": template, "if_missing": if_missing},
        "triggers": [{"type": "signal", "name": PAYMENT, "schema": SCHEMA}],
    }


@pytest.fixture
async def order_worker(temporal_client: Client) -> AsyncIterator[str]:
    """A worker for the user's workflow on a task queue of this test's own; yields the queue."""
    queue = unique("orders")
    async with Worker(temporal_client, task_queue=queue, workflows=[OrderWorkflow]):
        yield queue


async def open_runs(client: Client, queue: str, ids: list[str]) -> None:
    """The user's own runs, started before any event for them."""
    await asyncio.gather(
        *(client.start_workflow(OrderWorkflow.run, {"orderId": i}, id=i, task_queue=queue) for i in ids)
    )


async def state(client: Client, run: str) -> dict[str, Any]:
    result: dict[str, Any] = await client.get_workflow_handle(run).query("state")
    return result


async def settled(client: Client, project: str, received: int = 0) -> dict[str, Any]:
    """The dispatcher's stats once it received at least ``received`` events and dealt with every
    one (this project's entries all signal: one outcome per event not skipped as a duplicate)."""

    async def done() -> dict[str, Any]:
        s = await dispatcher_stats(client, project)
        outcomes = s["duplicates"] + s["signaled"] + s["missing"] + s["failed"] + s["unroutable"]
        assert s["received"] >= received and s["backlog"] == 0 and outcomes == s["received"], s
        return s

    return await assert_eventually(done, timeout=120, interval=0.5, what="the dispatcher dealt with every event")


async def delivered(client: Client, expected: dict[str, list[str]], timeout: float = 120) -> None:
    """Each run got exactly the events of ``expected[run]`` (event ids), in that order."""

    async def arrived() -> bool:
        for run, ids in expected.items():
            got = (await state(client, run))["payments"]
            assert len(got) >= len(ids), f"{run}: {len(got)} of {len(ids)} so far"
        return True

    await assert_eventually(arrived, timeout=timeout, interval=0.5, what="every event delivered")
    for run, ids in expected.items():
        got = (await state(client, run))["payments"]
        assert [p["event"]["id"] for p in got] == ids, run
        assert [p["trigger"]["orderId"] for p in got] == [run] * len(ids)
        assert all(p["workflow_id"] == ENTRY and p["exec_id"] for p in got)


async def absent(client: Client, wid: str) -> bool:
    try:
        await client.get_workflow_handle(wid).describe()
    except RPCError as exc:
        return exc.status == RPCStatusCode.NOT_FOUND
    return False


async def post(
    http: httpx.AsyncClient, port: int | None, payload: dict[str, Any], key: str, name: str = PAYMENT
) -> httpx.Response:
    return await http.post(
        f"http://127.0.0.1:{port}/api/v1/events",
        json={"name": name, "payload": payload},
        headers={"Authorization": f"Bearer {TOKEN}", "Idempotency-Key": key},
    )


async def accept(http: httpx.AsyncClient, port: int | None, payload: dict[str, Any], key: str) -> None:
    resp = await post(http, port, payload, key)
    assert resp.status_code == 202, resp.text


# --- HTTP: many runs, duplicates, a SIGKILLed bridge, the whole stream again ------------------


@pytest.mark.timeout(240)
async def test_http_each_run_gets_each_event_once_in_order_through_duplicates_and_sigkill(
    temporal_client, temporal_address, order_worker, tmp_path
):
    """20 open runs x 5 events, each run's events sent one after another (runs at once), one of
    them sent twice in a row; the ``serve`` process SIGKILLed mid-stream and started again, then
    the whole stream sent again. ``recent_ids: 0``: the dispatcher remembers nothing, so every
    repeat reaches Temporal, whose request-id dedupe alone keeps it from being delivered twice."""
    runs_n, events_n, kill_after = 20, 5, 40
    project = unique("sig-http")
    runs = [unique("order") for _ in range(runs_n)]
    await open_runs(temporal_client, order_worker, runs)
    path = tmp_path / "bridge.yaml"
    data = {
        "project": project,
        "temporal": {"address": temporal_address},
        "http": {"auth": {"tokens": [TOKEN]}},
        "dispatcher": {"recent_ids": 0},
        "workflows": [signal_entry(order_worker)],
    }
    path.write_text(yaml.safe_dump(data))
    bridge = BridgeProcess(path, tmp_path / "bridge.log").start()
    accepted = 0
    killed = asyncio.Event()
    try:
        await bridge.wait_ready()
        async with httpx.AsyncClient(timeout=10) as http:

            async def send(run: str, k: int) -> None:
                """Until the bridge takes it: a refused or cut-off request is sent again, as a client would."""
                nonlocal accepted
                while True:
                    try:
                        resp = await post(http, bridge.port, {"orderId": run, "k": k}, f"{run}-{k}")
                        if resp.status_code == 202:
                            accepted += 1
                            return
                        assert resp.status_code == 503, resp.text
                    except httpx.TransportError:
                        pass
                    await asyncio.sleep(0.2)

            async def stream(run: str, repeat: int | None) -> None:
                for k in range(events_n):
                    await send(run, k)
                    if k == repeat:
                        await send(run, k)  # the same key again at once: a duplicate

            async def killer() -> None:
                await assert_eventually(lambda: accepted >= kill_after, timeout=120, interval=0.01)
                bridge.kill()
                killed.set()
                bridge.start()

            await asyncio.gather(killer(), *(stream(run, i % events_n) for i, run in enumerate(runs)))
            assert killed.is_set()
            await bridge.wait_ready()
            await asyncio.gather(*(stream(run, None) for run in runs))  # the whole stream again

        expected = {run: [f"{run}-{k}" for k in range(events_n)] for run in runs}
        await delivered(temporal_client, expected)
        s = await settled(temporal_client, project, received=2 * runs_n * events_n + runs_n)
        await delivered(temporal_client, expected)  # nothing more arrived once it had all settled
        assert s["missing"] == 0 and s["failed"] == 0 and s["started"] == 0, s
        assert s["signaled"] >= runs_n * events_n, s
        got = (await state(temporal_client, runs[0]))["payments"][0]
        assert got["trigger"] == {"orderId": runs[0], "k": 0} and got["input"] == got["trigger"]
        assert got["event"]["name"] == PAYMENT and got["event"]["source"] == HTTP_SCOPE
    finally:
        await bridge.terminate()
    assert "Traceback" not in bridge.log_path.read_text(errors="replace").split("signal-bridge started")[-1]


# --- if_missing ----------------------------------------------------------------------------


@pytest.mark.parametrize("start_mode", ["activity", "child"])
async def test_if_missing_start_starts_the_run_once_then_signals_it(
    bridge_factory, temporal_client, temporal_address, order_worker, start_mode
):
    """No run: signal-with-start starts one, its input the object the signal carries, and the
    signal is its first. Later events are signals to that run; repeats of the first event (the
    one that started it) and of a later one deliver nothing. Signals go from an activity in
    either start mode."""
    project = unique("sig-start")
    run = unique("order")
    cfg = config(
        project,
        temporal_address,
        [signal_entry(order_worker, if_missing="start")],
        dispatcher={"start_mode": start_mode, "recent_ids": 0},
    )
    bridge = await bridge_factory(cfg)
    async with httpx.AsyncClient(timeout=30) as http:
        await accept(http, bridge.http_port, {"orderId": run, "amount": 10}, "p-0")

        async def first() -> dict[str, Any]:
            try:
                got = await state(temporal_client, run)
            except RPCError as exc:
                assert exc.status != RPCStatusCode.NOT_FOUND, "no run yet"
                raise
            assert got["payments"], got
            return got

        began = await assert_eventually(first, what="the run started by signal-with-start")
        run_id = (await temporal_client.get_workflow_handle(run).describe()).run_id
        for k, key in enumerate(["p-1", "p-0", "p-2", "p-1"]):  # p-0 and p-1 again: duplicates
            await accept(http, bridge.http_port, {"orderId": run, "amount": 11 + k}, key)
            await settled(temporal_client, project, received=k + 2)  # one at a time: each repeat reaches Temporal

    await delivered(temporal_client, {run: ["p-0", "p-1", "p-2"]})
    inp = began["input"]
    assert inp == began["payments"][0]  # the run's input is the object of its first signal
    assert inp["workflow_id"] == ENTRY and inp["trigger"] == {"orderId": run, "amount": 10}
    assert inp["input"] == inp["trigger"] and inp["event"]["id"] == "p-0"
    desc = await temporal_client.get_workflow_handle(run).describe()
    assert desc.run_id == run_id and desc.status == WorkflowExecutionStatus.RUNNING
    assert (await desc.memo())["event_id"] == "p-0"
    await assert_eventually(lambda: _runs_of(temporal_client, run, 1), what="one run with that id")
    s = await settled(temporal_client, project)
    assert s["started"] == 1 and s["missing"] == 0 and s["failed"] == 0, s
    assert s["signaled"] == 5, s  # each event's signal was taken: the repeats were dropped by Temporal


async def _runs_of(client: Client, wid: str, n: int) -> bool:
    count = await count_workflows(client, f'WorkflowId="{wid}"')
    assert count <= n, f"{count} runs with id {wid}"
    return count == n


async def test_if_missing_skip_creates_nothing_and_counts_the_event(
    bridge_factory, temporal_client, temporal_address, order_worker
):
    """Ids with no run, and one whose run has closed: nothing starts, each event is counted
    ``missing``; the open run beside them gets its event."""
    project = unique("sig-skip")
    nobody = [unique("order") for _ in range(3)]
    opened, closed = unique("order"), unique("order")
    await open_runs(temporal_client, order_worker, [opened, closed])
    await temporal_client.get_workflow_handle(closed).terminate("the order is closed")
    bridge = await bridge_factory(config(project, temporal_address, [signal_entry(order_worker)]))
    async with httpx.AsyncClient(timeout=30) as http:
        for run in [*nobody, closed, opened]:
            await accept(http, bridge.http_port, {"orderId": run}, f"{run}-0")
    await delivered(temporal_client, {opened: [f"{opened}-0"]})
    s = await settled(temporal_client, project, received=5)
    assert s["received"] == 5 and s["missing"] == 4 and s["signaled"] == 1, s
    assert s["started"] == 0 and s["failed"] == 0, s
    for run in nobody:
        assert await absent(temporal_client, run), run
    desc = await temporal_client.get_workflow_handle(closed).describe()
    assert desc.status == WorkflowExecutionStatus.TERMINATED
    await assert_eventually(lambda: _runs_of(temporal_client, closed, 1), what="still one run with that id")


# --- refused: at load and at the adapter ------------------------------------------------------


async def test_bad_template_is_refused_at_load_and_empty_or_long_ids_at_the_adapter(
    bridge_factory, temporal_client, temporal_address, order_worker, tmp_path
):
    bad = signal_entry(order_worker, template="order-{{ .trigger.orderId ")
    data = {"project": unique("sig-bad"), "temporal": {"address": temporal_address}, "workflows": [bad]}
    with pytest.raises(ConfigError, match=r"signal\.workflow_id"):
        snapshot.parse(data)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    cli = [sys.executable, "-m", "bridge.runtime.cli", "validate", str(path)]
    done = await asyncio.to_thread(subprocess.run, cli, capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and "signal.workflow_id" in done.stderr, (done.returncode, done.stderr)

    project = unique("sig-refuse")
    run = unique("order")
    await open_runs(temporal_client, order_worker, [run])
    bridge = await bridge_factory(config(project, temporal_address, [signal_entry(order_worker)]))
    async with httpx.AsyncClient(timeout=30) as http:
        for key, order in (("empty", ""), ("blank", "   "), ("long", "x" * 1001)):
            resp = await post(http, bridge.http_port, {"orderId": order}, key)
            assert resp.status_code == 422, resp.text
            assert resp.json()["error"] == "target_invalid" and resp.json()["workflow"] == ENTRY, resp.text
        await accept(http, bridge.http_port, {"orderId": run}, "good")
    await delivered(temporal_client, {run: ["good"]})
    s = await settled(temporal_client, project, received=1)
    assert s["received"] == 1 and s["signaled"] == 1, s  # nothing refused reached Temporal
    rejected = bridge.metrics.registry.get_sample_value(
        "signal_bridge_events_rejected_total", {"adapter": "http", "reason": "target_invalid"}
    )
    assert rejected == 3


# --- queues ----------------------------------------------------------------------------------


def stream_of(runs: list[str], events_n: int) -> list[tuple[str, str]]:
    """(run, event id) for ``events_n`` events per run, interleaved across runs, each run's in order."""
    return [(run, f"{run}-{k}") for k in range(events_n) for run in runs]


@pytest.mark.kafka
async def test_kafka_each_run_gets_each_event_once_in_order_through_redelivery(
    bridge_factory, temporal_client, temporal_address, kafka_bootstrap, order_worker
):
    """10 runs x 5 envelopes over 3 partitions, keyed by order, and one whose ``orderId`` is
    empty. Once all were delivered, they come again: a copy of each run's second envelope is
    produced again, and a consumer of a second group (as after lost offsets) reads the whole topic
    again. With ``recent_ids: 0`` every repeat reaches Temporal. Each run gets each event once, in
    order; the empty id is dead-lettered ``target_invalid``."""
    runs_n, events_n = 10, 5
    topic = await create_topic(kafka_bootstrap)
    dlq = f"{topic}.dlq"
    project = unique("sig-kafka")
    runs = [unique("order") for _ in range(runs_n)]
    await open_runs(temporal_client, order_worker, runs)
    groups = [f"{project}-a", f"{project}-b"]

    def bridge_config(group: str, **extra: Any) -> Any:
        consumer = {"bootstrap_servers": kafka_bootstrap, "topics": [topic], "group_id": group, **extra}
        return config(
            project,
            temporal_address,
            [signal_entry(order_worker)],
            # One event per batch, four batches in flight: a run's next event (same record key)
            # must wait for the batch that signals the one before it.
            dispatcher={"recent_ids": 0, "batch_size": 1, "batches_in_flight": 4},
            kafka=[consumer],
        )

    await bridge_factory(bridge_config(groups[0], dead_letter_topic=dlq))
    records = [envelope(PAYMENT, {"orderId": run}, key=run, id=eid) for run, eid in stream_of(runs, events_n)]
    records.insert(len(records) // 2, envelope(PAYMENT, {"orderId": ""}, key="nobody", id="bad-0"))
    await produce(kafka_bootstrap, topic, records)
    expected = {run: [f"{run}-{k}" for k in range(events_n)] for run in runs}
    await delivered(temporal_client, expected)
    await assert_all_committed(kafka_bootstrap, groups[0], topic)
    await settled(temporal_client, project, received=len(records) - 1)

    copies = [envelope(PAYMENT, {"orderId": run}, key=run, id=f"{run}-1") for run in runs]
    await produce(kafka_bootstrap, topic, copies)
    # An ingress only (the first bridge's worker runs the dispatcher); without a dead-letter topic
    # it logs the empty id and skips it.
    await bridge_factory(bridge_config(groups[1]), role="ingress")
    for group in groups:
        await assert_all_committed(kafka_bootstrap, group, topic)
    s = await settled(temporal_client, project, received=2 * (len(records) - 1 + len(copies)))
    await delivered(temporal_client, expected)
    assert s["missing"] == 0 and s["failed"] == 0, s

    consumer = AIOKafkaConsumer(dlq, bootstrap_servers=kafka_bootstrap, auto_offset_reset="earliest")
    await consumer.start()
    letters: list[Any] = []
    try:

        async def lettered() -> bool:
            batch = await consumer.getmany(timeout_ms=500)
            letters.extend(r for recs in batch.values() for r in recs)
            return bool(letters)

        await assert_eventually(lettered, timeout=60, what="the dead letter")
        letters.extend(r for recs in (await consumer.getmany(timeout_ms=1000)).values() for r in recs)
    finally:
        await consumer.stop()
    [letter] = letters
    headers = {k: v.decode() for k, v in letter.headers}
    assert headers["x-dead-letter-reason"] == "target_invalid" and headers["x-event-id"] == "bad-0", headers


@pytest.mark.amqp
async def test_amqp_each_run_gets_each_event_once_in_order_through_redelivery(
    bridge_factory, temporal_client, temporal_address, amqp_url, order_worker
):
    """10 runs x 5 envelopes through one queue and one with an empty ``orderId``; once all were
    delivered, a copy of each run's second envelope is published again (same id). The default
    ``recent_ids`` and ``start_mode: child`` (signals still go from the activity). Each run gets
    each event once, in order; the empty id is dead-lettered ``target_invalid``."""
    runs_n, events_n = 10, 5
    project, queue, exchange = unique("sig-amqp"), unique("q"), unique("ex")
    dlx = f"{exchange}.dlx"
    runs = [unique("order") for _ in range(runs_n)]
    await open_runs(temporal_client, order_worker, runs)
    entry = {
        "url": amqp_url,
        "queue": queue,
        "bindings": [{"exchange": exchange, "exchange_type": "topic", "routing_key": "payment.#"}],
        "event": {"format": "envelope"},
        "dead_letter_exchange": dlx,
    }
    cfg = config(
        project, temporal_address, [signal_entry(order_worker)], dispatcher={"start_mode": "child"}, amqp=[entry]
    )
    bridge: Bridge = await bridge_factory(cfg)

    def message(run: str, eid: str) -> tuple[str, bytes, dict[str, Any]]:
        body = json.dumps({"name": PAYMENT, "id": eid, "payload": {"orderId": run}}).encode()
        return PAYMENT, body, {"message_id": eid}

    messages = [message(run, eid) for run, eid in stream_of(runs, events_n)]
    messages.insert(len(messages) // 2, message("", "bad-0"))
    copies = [message(run, f"{run}-1") for run in runs]
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        dead = await channel.declare_queue(unique("dlq"), exclusive=True)
        await dead.bind(dlx, routing_key="")
        await publish(amqp_url, exchange, messages)
        expected = {run: [f"{run}-{k}" for k in range(events_n)] for run in runs}
        await delivered(temporal_client, expected)
        await publish(amqp_url, exchange, copies)  # redelivered once their originals were delivered
        messages += copies

        def taken() -> bool:
            got = bridge.metrics.registry.get_sample_value("signal_bridge_events_accepted_total", {"adapter": "amqp"})
            return (got or 0) >= len(messages) - 1

        await assert_eventually(taken, timeout=60, what="every good message accepted")
        s = await settled(temporal_client, project, received=len(messages) - 1)
        await delivered(temporal_client, expected)
        # The copies (and any redelivery) were skipped as recently seen: never sent to the runs.
        assert s["duplicates"] == s["received"] - runs_n * events_n >= runs_n, s
        assert s["signaled"] == runs_n * events_n and s["missing"] == 0 and s["failed"] == 0, s

        letter = await assert_eventually(lambda: dead.get(fail=False, no_ack=True), timeout=60, what="dead letter")
        assert letter.message_id == "bad-0" and letter.headers["x-dead-letter-reason"] == "target_invalid"
        assert await dead.get(fail=False, no_ack=True) is None


@pytest.mark.kafka
async def test_kafka_burst_of_5kb_events_to_one_run_keeps_their_order(
    bridge_factory, temporal_client, temporal_address, kafka_bootstrap, order_worker
):
    """150 events of about 5 KB for one run, already in the topic when the consumer starts: the
    dispatcher takes them in batches of about 1 MiB. The run gets them in offset order."""
    n = 150
    topic = await create_topic(kafka_bootstrap)
    project = unique("sig-burst")
    run = unique("order")
    await open_runs(temporal_client, order_worker, [run])
    pad = "x" * 5000
    records = [envelope(PAYMENT, {"orderId": run, "pad": pad}, key=run, id=f"{run}-{k}") for k in range(n)]
    await produce(kafka_bootstrap, topic, records)
    consumer = {"bootstrap_servers": kafka_bootstrap, "topics": [topic]}
    await bridge_factory(config(project, temporal_address, [signal_entry(order_worker)], kafka=[consumer]))
    s = await settled(temporal_client, project, received=n)
    assert s["signaled"] == n, s
    got = await temporal_client.get_workflow_handle(run).query("event_ids")
    assert got == [f"{run}-{k}" for k in range(n)]


async def test_a_retry_whose_first_attempt_died_unheard_does_not_start_the_closed_run_again(temporal_client):
    """A worker died after its START_TARGETS attempt's signal-with-start and before its heartbeat
    (throttled to one in 8 s) reached the server: the retry had no answer for it. Its run had
    closed meanwhile, and the same signal-with-start started another: the event ran twice. The
    retry now finds the request id in the closed run's history. A signal it finds nowhere is
    sent, and an earlier attempt's signal to a run another event had opened is found as well."""
    started, signaled, fresh = unique("order"), unique("order"), unique("order")
    arg = TargetInput(workflow_id=ENTRY, exec_id="x", input={}, trigger={}, event={"id": "E1"})

    def signal_start(wid: str) -> TargetStart:
        return TargetStart(
            wid, "Unpolled", unique("nobody"), arg, {"event_id": "E1"}, None, "payment", "start", f"r-{wid}"
        )

    env = ActivityEnvironment(client=temporal_client)
    env.info = dataclasses.replace(env.info, is_local=False, scheduled_time=datetime.now(UTC))
    acts = BridgeActivities(Snapshot.compile(config("p", "unused:7233", [runner("w", "order.created")])))
    other = signal_start(signaled)
    other.request_id = "another event's"
    assert await env.run(acts.start_targets, StartBatch([other])) == [SIGNAL_STARTED]
    batch = StartBatch([signal_start(started), signal_start(signaled)])
    assert await env.run(acts.start_targets, batch) == [SIGNAL_STARTED, SIGNALED]  # the attempt that died
    for wid in (started, signaled):
        await temporal_client.get_workflow_handle(wid).terminate()

    env.info = dataclasses.replace(env.info, attempt=2)  # its retry, with no heartbeat details
    retried = StartBatch([*batch.starts, signal_start(fresh)])
    assert await env.run(acts.start_targets, retried) == [SIGNAL_STARTED, SIGNALED, SIGNAL_STARTED]
    assert [await count_runs(temporal_client, wid) for wid in (started, signaled, fresh)] == [1, 1, 1]


async def count_runs(client: Client, wid: str) -> int:
    return len([r async for r in client.list_workflows(f"WorkflowId = {quoted(wid)}")])

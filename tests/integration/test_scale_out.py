"""Scale-out: two ``signal-bridge ingress`` and two ``signal-bridge worker`` processes against one
Temporal server take the same events one ``serve`` would, and each event still starts exactly one
run of each of its targets (docs/operations.md, "Scaling out").

One config file for all four processes: an HTTP adapter (each ingress on its own port), a Kafka
topic of four partitions read by one consumer group, one RabbitMQ queue the two ingress processes
compete for, two dispatcher shards, and two workflow entries on the same event name (fan-out).
One target is a workflow on a task queue no worker polls (its runs start and cost no work), the
other the built-in task runner (its runs are work the two workers share). Duplicates come in
through every adapter: one Idempotency-Key sent to both ingress processes, a Kafka id in a second
record on another partition under another key (so it may reach the other ingress and the other
shard), an AMQP message id published twice. The test checks counts and ids, never timings.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aio_pika
import httpx
import pytest
import yaml
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError
from aiokafka.protocol.group import MemberAssignment
from temporalio.api.enums.v1 import EventType, TaskQueueType
from temporalio.api.taskqueue.v1 import TaskQueue
from temporalio.api.workflowservice.v1 import DescribeTaskQueueRequest
from temporalio.client import Client
from temporalio.service import RPCError

from bridge.config import project_slug
from bridge.runtime.embedded import free_port
from dispatcher.contract import RUNNER_WORKFLOW, dispatcher_id
from tests.helpers import (
    HTTP_SCOPE,
    TOKEN,
    assert_eventually,
    count_workflows,
    dispatcher_stats,
    run_id,
    runner,
    unique,
    workflow_ids,
)

pytestmark = [pytest.mark.temporal, pytest.mark.kafka, pytest.mark.amqp]

EVENT = "order.created"
SHARDS = 2
PARTITIONS = 4
AUTH = {"Authorization": f"Bearer {TOKEN}"}
HTTP_EVENTS, HTTP_TWICE = 120, 20  # the first HTTP_TWICE keys go to both ingress processes
KAFKA_EVENTS, KAFKA_TWICE = 100, 12  # the first KAFKA_TWICE ids are in a second record too
AMQP_EVENTS, AMQP_TWICE = 80, 10  # the first AMQP_TWICE message ids are published twice
EVENTS = HTTP_EVENTS + KAFKA_EVENTS + AMQP_EVENTS


# --- the processes ------------------------------------------------------------------------------


@dataclass
class Role:
    """One ``signal-bridge {role}`` child in its own process group, logging to its own file."""

    role: str
    config_path: Path
    workdir: Path
    port: int | None = None
    http: bool = False  # a worker that serves its probes and metrics (--http-port)
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path = field(init=False)

    def __post_init__(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.workdir / f"{self.role}.log"
        if self.role == "ingress" or self.http:
            self.port = free_port()

    def start(self) -> Role:
        exe = shutil.which("signal-bridge", path=str(Path(sys.executable).parent))
        cmd = [exe] if exe else [sys.executable, "-m", "bridge.runtime.cli"]
        cmd += [self.role, "--config", str(self.config_path)]
        if self.port is not None:
            cmd += ["--http-port", str(self.port)]
        env = {k: v for k, v in os.environ.items() if not k.startswith("SIGNAL_BRIDGE_")}
        env["SIGNAL_BRIDGE_DATA_DIR"] = str(self.workdir / ".signal-bridge")
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                cmd, cwd=self.workdir, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
        return self

    @property
    def identity(self) -> str:
        """The Temporal client identity of the process: ``{pid}@{host}`` (the SDK's default)."""
        assert self.proc is not None
        return f"{self.proc.pid}@{socket.gethostname()}"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def wait_ready(self, timeout: float = 60.0) -> None:
        """Ingress: ``/readyz`` answers 200. Worker: it logged that it started."""

        async def ready() -> bool:
            assert self.proc is not None and self.proc.poll() is None, f"{self.role} exited:\n{self.tail()}"
            if self.port is None:
                return "signal-bridge started project=" in self.log() and "role=worker" in self.log()
            try:
                async with httpx.AsyncClient(timeout=2) as http:
                    return (await http.get(f"{self.url}/readyz")).status_code == 200
            except httpx.HTTPError:
                return False

        await assert_eventually(ready, timeout=timeout, interval=0.3, what=f"{self.role} ready")

    async def accepted(self) -> dict[str, float]:
        """``signal_bridge_events_accepted_total`` by adapter."""
        async with httpx.AsyncClient(timeout=5) as http:
            text = (await http.get(f"{self.url}/metrics", headers=AUTH)).text
        pattern = r'^signal_bridge_events_accepted_total\{adapter="(\w+)"\} (\S+)$'
        return {m.group(1): float(m.group(2)) for m in re.finditer(pattern, text, re.M)}

    async def stop(self, grace: float = 40.0) -> int | None:
        """SIGTERM to the process group; SIGKILL when it has not exited within ``grace`` seconds."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                await asyncio.wait_for(asyncio.to_thread(self.proc.wait), grace)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                await asyncio.to_thread(self.proc.wait)
        return self.proc.returncode

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.log().splitlines()[-lines:])


@pytest.fixture
async def roles() -> AsyncIterator[list[Role]]:
    """The started processes; whatever the test left running is stopped (SIGTERM, then SIGKILL)."""
    started: list[Role] = []
    yield started
    await asyncio.gather(*(r.stop() for r in started))


# --- the brokers --------------------------------------------------------------------------------


async def create_topic(bootstrap: str, partitions: int) -> str:
    topic = unique("scale")
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, num_partitions=partitions, replication_factor=1)])
    finally:
        await admin.close()
    return topic


async def group_split(bootstrap: str, group: str) -> list[set[int]]:
    """The partitions of each member of a Stable group (an AssertionError until it is one)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        await admin.start()
        [resp] = await admin.describe_consumer_groups([group])
    except KafkaError as exc:  # e.g. the coordinator is still loading
        raise AssertionError(f"group {group} unavailable: {exc!r}") from exc
    finally:
        await admin.close()
    [desc] = resp.groups
    state, members = desc[2], desc[5]
    assert state == "Stable", f"group {group} is {state}"
    split = []
    for member in members:
        assignment = MemberAssignment.decode(member[-1]) if member[-1] else None
        split.append({p for _, parts in (assignment.assignment if assignment else []) for p in parts})
    return split


async def produce(bootstrap: str, topic: str, records: Iterable[tuple[int, str, bytes]]) -> None:
    """(partition, key, value) records, each acknowledged by the broker."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5)
    await producer.start()
    try:
        sent = [await producer.send(topic, value=v, key=k.encode(), partition=p) for p, k, v in records]
        await asyncio.gather(*sent)
    finally:
        await producer.stop()


async def publish(url: str, exchange: str, messages: Iterable[tuple[str, bytes]]) -> None:
    """(message id, body) as persistent, confirmed, mandatory messages routed ``EVENT``."""
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        target = await channel.get_exchange(exchange)
        await asyncio.gather(
            *(
                target.publish(
                    aio_pika.Message(body, message_id=mid, delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
                    routing_key=EVENT,
                    mandatory=True,
                )
                for mid, body in messages
            )
        )


async def consumers(url: str, queue: str) -> int:
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        try:
            declared = await channel.declare_queue(queue, passive=True)
        except aio_pika.exceptions.ChannelClosed:
            return 0  # not declared by an ingress process yet
        return int(declared.declaration_result.consumer_count)


# --- the events ---------------------------------------------------------------------------------


@dataclass
class Sent:
    """Each event's scope (its ``source``) and id; records sent by adapter; 202s by ingress port."""

    events: set[tuple[str, str]] = field(default_factory=set)
    records: dict[str, int] = field(default_factory=dict)
    http_by_port: dict[int, int] = field(default_factory=dict)


async def send_http(sent: Sent, ports: list[int]) -> None:
    """Every key to one ingress by turns; the first HTTP_TWICE keys to both at once too."""
    limit = asyncio.Semaphore(16)

    async def post(http: httpx.AsyncClient, port: int, i: int) -> None:
        async with limit:
            for _ in range(60):
                with contextlib.suppress(httpx.TransportError):
                    resp = await http.post(
                        f"http://127.0.0.1:{port}/api/v1/events",
                        json={"name": EVENT, "payload": {"n": i}},
                        headers={**AUTH, "Idempotency-Key": f"h-{i}"},
                    )
                    if resp.status_code == 202:
                        sent.http_by_port[port] = sent.http_by_port.get(port, 0) + 1
                        return
                    assert resp.status_code == 503, resp.text  # retried with the same key, as a client would
                await asyncio.sleep(0.5)
            raise AssertionError(f"h-{i} was never accepted by :{port}")

    async with httpx.AsyncClient(timeout=30) as http:
        posts = [post(http, ports[i % 2], i) for i in range(HTTP_EVENTS)]
        posts += [post(http, ports[(i + 1) % 2], i) for i in range(HTTP_TWICE)]
        await asyncio.gather(*posts)
    sent.events |= {(HTTP_SCOPE, f"h-{i}") for i in range(HTTP_EVENTS)}
    sent.records["http"] = HTTP_EVENTS + HTTP_TWICE


async def send_kafka(sent: Sent, bootstrap: str, topic: str) -> None:
    """Records spread over every partition; a duplicate id on the next partition under another key."""

    def record(i: int, partition: int, key: str) -> tuple[int, str, bytes]:
        return partition, key, json.dumps({"name": EVENT, "id": f"k-{i}", "payload": {"n": i}}).encode()

    records = [record(i, i % PARTITIONS, f"key-{i}") for i in range(KAFKA_EVENTS)]
    records += [record(i, (i + 1) % PARTITIONS, f"again-{i}") for i in range(KAFKA_TWICE)]
    await produce(bootstrap, topic, records)
    sent.events |= {(f"kafka:{topic}", f"k-{i}") for i in range(KAFKA_EVENTS)}
    sent.records["kafka"] = len(records)


async def send_amqp(sent: Sent, url: str, exchange: str, queue: str) -> None:
    messages = [(f"a-{i}", b'{"n": %d}' % i) for i in range(AMQP_EVENTS)]
    messages += messages[:AMQP_TWICE]
    await publish(url, exchange, messages)
    sent.events |= {(f"amqp:{queue}", f"a-{i}") for i in range(AMQP_EVENTS)}
    sent.records["amqp"] = len(messages)


# --- what Temporal holds ------------------------------------------------------------------------


async def assert_exactly(client: Client, query: str, expected: set[str], timeout: float = 120.0) -> None:
    """The runs ``query`` finds are exactly ``expected``: none missing, none extra, none twice."""

    async def counted() -> bool:
        n = await count(client, query)
        assert n <= len(expected), f"{n} runs for {len(expected)} events: something started twice"
        assert n == len(expected), f"{n} of {len(expected)} runs so far"
        return True

    await assert_eventually(counted, timeout=timeout, interval=1.0, what=f"{len(expected)} runs of {query}")
    ids = await workflow_ids(client, query)
    missing, extra = expected - set(ids), set(ids) - expected
    assert not missing and not extra, f"missing {sorted(missing)[:5]}…, unexpected {sorted(extra)[:5]}…"
    assert len(ids) == len(set(ids)), "a workflow id ran twice"


async def count(client: Client, query: str) -> int:
    try:
        return await count_workflows(client, query)
    except RPCError as exc:  # a busy dev server's visibility store may time out; ask again
        raise AssertionError(f"count failed: {exc}") from exc


async def pollers(client: Client, task_queue: str) -> set[str]:
    resp = await client.workflow_service.describe_task_queue(
        DescribeTaskQueueRequest(
            namespace=client.namespace,
            task_queue=TaskQueue(name=task_queue),
            task_queue_type=TaskQueueType.TASK_QUEUE_TYPE_WORKFLOW,
        )
    )
    return {p.identity for p in resp.pollers}


async def who_ran(client: Client, run_ids: Iterable[str], wanted: set[str]) -> dict[str, int]:
    """Which identities took the workflow tasks of these runs (read until all of ``wanted`` show)."""
    seen: dict[str, int] = {}
    for wid in run_ids:
        async for event in client.get_workflow_handle(wid).fetch_history_events():
            if event.event_type == EventType.EVENT_TYPE_WORKFLOW_TASK_STARTED:
                identity = event.workflow_task_started_event_attributes.identity
                seen[identity] = seen.get(identity, 0) + 1
        if wanted <= seen.keys():
            break
    return seen


# --- the test -----------------------------------------------------------------------------------


def write_config(path: Path, project: str, temporal: str, idle_queue: str, **adapters: dict[str, Any]) -> Path:
    idle = {"id": "idle", "workflow_type": "Idle", "task_queue": idle_queue, "triggers": [{"name": EVENT}]}
    data = {
        "project": project,
        "temporal": {"address": temporal},
        "http": {"port": 0, "auth": {"tokens": [TOKEN]}},
        "dispatcher": {"shards": SHARDS},  # start_mode: the default, whichever it is
        "workflows": [idle, runner("tasks", EVENT, template="ran {{ .trigger.n }}")],
        **{name: [entry] for name, entry in adapters.items()},
    }
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.timeout(240)
async def test_two_ingress_and_two_workers_start_one_run_per_event_and_target(
    roles, tmp_path, temporal_client, temporal_address, kafka_bootstrap, amqp_url
):
    project, group, queue, exchange, idle = unique("scale"), unique("group"), unique("q"), unique("ex"), unique("idle")
    topic = await create_topic(kafka_bootstrap, PARTITIONS)
    path = write_config(
        tmp_path / "bridge.yaml",
        project,
        temporal_address,
        idle,
        kafka={"bootstrap_servers": kafka_bootstrap, "topics": [topic], "group_id": group, "max_batch": 50},
        amqp={
            "url": amqp_url,
            "queue": queue,
            "bindings": [{"exchange": exchange, "exchange_type": "topic", "routing_key": "order.#"}],
            "prefetch": 20,
            "event": {"format": "raw", "name_from": "routing_key"},
        },
    )
    workers = [Role("worker", path, tmp_path / f"worker-{k}", http=k == 0).start() for k in range(2)]
    ingress = [Role("ingress", path, tmp_path / f"ingress-{k}").start() for k in range(2)]
    roles.extend([*workers, *ingress])
    await asyncio.gather(*(r.wait_ready() for r in roles))

    # Both ingress processes take part before anything is sent: two members with two partitions
    # each, two consumers on the queue; and both workers poll the task queue.
    split = await assert_eventually(lambda: group_split(kafka_bootstrap, group), timeout=60, what="group split")
    assert len(split) == 2 and all(split) and not split[0] & split[1], split
    assert await assert_eventually(lambda: _equals(consumers(amqp_url, queue), 2), what="two AMQP consumers")
    task_queue = project_slug(project)
    identities = {w.identity for w in workers}
    await assert_eventually(lambda: _contains(pollers(temporal_client, task_queue), identities), what="pollers")

    sent = Sent()
    began = time.monotonic()
    await asyncio.gather(
        send_http(sent, [r.port for r in ingress if r.port]),
        send_kafka(sent, kafka_bootstrap, topic),
        send_amqp(sent, amqp_url, exchange, queue),
    )
    assert len(sent.events) == EVENTS

    # Every event started exactly one run of each target; nothing else started.
    for wf, query in (
        ("idle", f'WorkflowType="Idle" AND TaskQueue="{idle}"'),
        ("tasks", f'WorkflowType="{RUNNER_WORKFLOW}" AND TaskQueue="{task_queue}"'),
    ):
        await assert_exactly(temporal_client, query, {run_id(project, wf, e, scope) for scope, e in sent.events})
    all_started = time.monotonic() - began

    # Both shards received events; both ingress processes took HTTP, Kafka and AMQP events.
    stats = [await dispatcher_stats(temporal_client, project, k, SHARDS) for k in range(SHARDS)]
    assert all(s["received"] > 0 for s in stats) and sum(s["received"] for s in stats) >= EVENTS, stats
    taken = [await r.accepted() for r in ingress]
    for adapter, records in sent.records.items():
        assert all(t.get(adapter, 0) > 0 for t in taken), f"one ingress took no {adapter} event: {taken}"
        assert sum(t.get(adapter, 0) for t in taken) >= records, f"{records} {adapter} records sent: {taken}"
    assert [t["http"] for t in taken] == [sent.http_by_port[r.port] for r in ingress if r.port], taken

    # Both workers ran task-runner workflow tasks.
    runs = sorted(run_id(project, "tasks", e, scope) for scope, e in sent.events)
    completed = f'WorkflowType="{RUNNER_WORKFLOW}" AND TaskQueue="{task_queue}" AND ExecutionStatus="Completed"'
    await assert_eventually(lambda: _equals(count(temporal_client, completed), EVENTS), timeout=120, what="runs done")
    seen = await who_ran(temporal_client, runs, identities)
    assert identities <= seen.keys(), f"workflow tasks by {seen}, workers {identities}"

    # A worker given --http-port serves its probes and its metrics (the dispatchers' stats among
    # them), and no events API.
    await worker_serves_its_operational_endpoints(workers[0], project)

    # SIGTERM: each process finishes what it holds and says so.
    codes = await asyncio.gather(*(r.stop() for r in roles))
    for r, code in zip(roles, codes, strict=True):
        assert stopped_cleanly(r.log(), code), f"{r.role} exited {code} ({r.log_path}):\n{r.tail()}"
    print(
        f"scale-out: records {sent.records}, {EVENTS} events, {2 * EVENTS} runs started"
        f" {all_started:.1f} s after the first was sent; accepted by ingress {taken};"
        f" shards received {[s['received'] for s in stats]}; runner workflow tasks by worker {seen};"
        f" exit codes {codes}"
    )


async def worker_serves_its_operational_endpoints(worker: Role, project: str) -> None:
    async with httpx.AsyncClient(base_url=worker.url, timeout=5) as http:
        ready = await http.get("/readyz", headers=AUTH)
        assert ready.status_code == 200 and ready.json()["checks"] == {"temporal": True, "worker": True}, ready.text
        assert (await http.get("/healthz")).status_code == 200
        assert (await http.get("/metrics")).status_code == 401, "the metrics need the token"
        refused = await http.post("/api/v1/events", json={"name": EVENT, "payload": {}}, headers=AUTH)
        assert refused.status_code in (404, 405), "a worker takes no events"

        async def backlog() -> bool:
            text = (await http.get("/metrics", headers=AUTH)).text
            return all(
                f'signal_bridge_dispatcher_backlog{{dispatcher="{dispatcher_id(project, k, SHARDS)}"}}' in text
                for k in range(SHARDS)
            )

        await assert_eventually(backlog, timeout=40, interval=1, what="the worker's dispatcher metrics")


def stopped_cleanly(log: str, code: int | None) -> bool:
    """Stopped in order and exited 0 (not aborted while the interpreter finalized, as the Temporal
    SDK's native threads made it do before the CLI left with os._exit: temporalio/sdk-python#300)."""
    return "signal-bridge stopped project=" in log and code == 0


async def _equals(value: Any, expected: Any) -> bool:
    got = await value
    assert got == expected, f"{got} != {expected}"
    return True


async def _contains(value: Any, expected: set[str]) -> bool:
    got = await value
    assert expected <= got, f"{expected - got} missing from {got}"
    return True

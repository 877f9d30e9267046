"""The bench's scenarios, each against bridge processes of its own and one shared Temporal server:

- :func:`adapter` — one ``serve`` per adapter and start mode: throughput (N events → N targets
  started), then latency under an open-loop load at a fraction of the ceiling;
- :func:`scale_out` — 2 ``ingress`` + 2 ``worker`` processes (``dispatcher.shards: 2``), HTTP
  throughput split over both ingress ports;
- :func:`burst` — wrk against the bare endpoint and the bridge, single events and batches, with
  the bridge's peak RSS and a check that what it accepted reached the dispatcher.

Every bridge gets a project of its own (so its own dispatcher and task queue), targets on task
queues no worker polls (so only starting is measured), and is stopped, its dispatchers
terminated, before the next one starts.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from temporalio.client import Client

from bench.load import (
    WRK_LUA,
    AmqpSender,
    HttpSender,
    KafkaSender,
    Sender,
    closed_loop,
    create_topic,
    delete_queue,
    delete_topic,
    last_start_confirmed,
    latency_row,
    open_loop,
    start_times,
    throughput_row,
    wrk_closed_loop,
    wrk_quotas,
)
from bench.procs import TOKEN, Bare, Bridge, Proc, bridge_config, unique
from bench.report import Row, WrkResult, line, parse_wrk, status_summary
from bridge.config import DispatcherConfig
from dispatcher.client import query_stats
from dispatcher.contract import dispatcher_id

WARM_EVENTS = 4


def mode_label(mode: str | None) -> str:
    """``child``, ``activity``, or ``default=child`` for a config without ``start_mode`` (the
    default of the code the bridge processes run)."""
    return mode if mode else f"default={DispatcherConfig().start_mode}"


@dataclass
class Run:
    """What every scenario gets, and the rows so far (each printed as it is added)."""

    client: Client
    address: str
    workdir: Path
    events: int
    concurrency: int
    latency_seconds: float
    load_fraction: float
    burst_seconds: float  # how long a burst lasts without burst_events
    burst_batch: int
    burst_events: int = 10_000  # events per burst (0: as many as burst_seconds allow)
    drain_seconds: float = 15.0  # how long the drain after a burst is watched
    kafka: str | None = None
    amqp: str | None = None
    settings: dict[str, Any] = field(default_factory=dict)  # --dispatcher KEY=VALUE, for every bridge
    http_client: str = "wrk"  # the HTTP throughput rows' load generator: wrk, or python (HttpSender)
    rows: list[Row] = field(default_factory=list)
    ceiling: Row | None = None
    bridge_ceiling: Row | None = None  # direct starts with the bridge's memo and search attributes

    def add(self, row: Row) -> Row:
        self.rows.append(row)
        print(line(row), flush=True)
        return row


async def warm_up(run: Run, sender: Sender, queue: str, count: int = WARM_EVENTS) -> None:
    """A few events through the whole path before timing: the dispatcher exists, the consumer has
    joined its group, connections are open."""
    sent = await closed_loop(sender, "warm", count, count, unique("warm"))
    if len(sent.acked) < count:
        raise RuntimeError(f"warm-up: the adapter refused events ({sent.refusals()})")
    started = await start_times(run.client, queue, count, stall=60)
    if len(started) < count:
        raise RuntimeError(f"warm-up: {len(started)}/{count} targets started within a minute")


async def terminate_dispatchers(client: Client, project: str, shards: int) -> None:
    """Best effort: a stopped bridge's dispatcher would otherwise keep its backlog in Temporal."""
    for shard in range(shards):
        with contextlib.suppress(Exception):
            await asyncio.wait_for(
                client.get_workflow_handle(dispatcher_id(project, shard, shards)).terminate("bench done"), 10
            )


async def _sender(run: Run, adapter: str, bridge: Bridge, name: str) -> Sender:
    if adapter == "http":
        return HttpSender(bridge.urls)
    if adapter == "kafka":
        assert run.kafka
        kafka = KafkaSender(run.kafka, name)
        await kafka.open()
        return kafka
    assert run.amqp
    amqp = AmqpSender(run.amqp, name)
    await amqp.open()
    return amqp


async def _adapter_config(run: Run, adapter: str, project: str, mode: str | None, name: str) -> dict[str, Any]:
    """The config of one adapter row: its targets, and the topic or queue it consumes."""
    targets = {phase: f"{project}-{phase}" for phase in ("warm", "tput", "lat")}
    queues: dict[str, Any] = {}
    if adapter == "kafka":
        assert run.kafka, "kafka needs KAFKA_BOOTSTRAP_SERVERS"
        await create_topic(run.kafka, name)
        queues["kafka"] = [{"bootstrap_servers": run.kafka, "topics": [name], "event": {"format": "envelope"}}]
    elif adapter == "amqp":
        assert run.amqp, "amqp needs AMQP_URL"
        binding = {"exchange": name, "exchange_type": "topic", "routing_key": "#"}
        queues["amqp"] = [{"url": run.amqp, "queue": name, "bindings": [binding], "event": {"format": "envelope"}}]
    return bridge_config(
        project=project, address=run.address, mode=mode, targets=targets, settings=run.settings, **queues
    )


async def adapter(run: Run, adapter: str, mode: str | None, *, latency: bool = True) -> Row:
    """One ``serve`` with ``adapter``: its throughput row, then (unless told not to) its latency
    row. Returns the throughput row."""
    label = f"{adapter} {mode_label(mode)}"
    project = unique(f"bench-{adapter}-{mode or 'default'}")
    name = f"{project}-in"  # the Kafka topic, or the RabbitMQ queue and exchange
    bridge = Bridge(run.workdir, await _adapter_config(run, adapter, project, mode, name))
    try:
        await bridge.start()
        sender = await _sender(run, adapter, bridge, name)
        try:
            await warm_up(run, sender, f"{project}-warm")
            tput = run.add(await _throughput(run, f"{label}: throughput", sender, bridge, f"{project}-tput"))
            if not latency:
                return tput
            assert run.ceiling and run.ceiling.rate
            rate = run.load_fraction * run.ceiling.rate
            sent = await open_loop(sender, "lat", rate, run.latency_seconds, "lat")
            bridge.check_alive()
            started = await start_times(run.client, f"{project}-lat", len(sent.acked))
            row = latency_row(f"{label}: latency @ {run.load_fraction:g}x ceiling", rate, sent, started, run.ceiling)
            if tput.rate is not None and rate > tput.rate:
                row.notes.append(
                    f"offered over this row's throughput ({tput.rate:.0f}/s): a backlog grew for the whole "
                    "run, and its percentiles measure the backlog, not a latency"
                )
            run.add(row)
            return tput
        finally:
            await sender.close()
    finally:
        bridge.stop()
        await terminate_dispatchers(run.client, project, bridge.shards)
        await _delete_input(run, adapter, name)


async def _throughput(run: Run, name: str, sender: Sender, bridge: Bridge, queue: str) -> Row:
    """``run.events`` events through ``sender``'s adapter as fast as it acknowledges them, at most
    ``run.concurrency`` in flight, and the row of their targets' starts on ``queue``. HTTP events
    are sent by wrk unless ``run.http_client`` says python."""
    if sender.name == "http" and run.http_client == "wrk":
        prefix = unique("tput")
        sent = await wrk_closed_loop(bridge.urls, "tput", run.events, run.concurrency, prefix, run.workdir)
        bridge.check_alive()
        assert sent.accepted is not None
        n = sent.accepted + sum(sent.refused.values())
        started = await start_times(run.client, queue, sent.accepted)
        sent.acked = {e: sent.ended for e in started if e.startswith(prefix)}
    else:
        n = run.events
        sent = await closed_loop(sender, "tput", n, run.concurrency, "tput")
        bridge.check_alive()
        started = await start_times(run.client, queue, len(sent.acked))
    dispatchers = [dispatcher_id(bridge.project, shard, bridge.shards) for shard in range(bridge.shards)]
    confirmed = await last_start_confirmed(run.client, dispatchers, sent.began)
    row = throughput_row(name, n, sent, started, run.ceiling, confirmed)
    if run.bridge_ceiling and run.bridge_ceiling.rate and row.rate:
        row.notes.insert(0, f"{row.rate / run.bridge_ceiling.rate:.2f}x the bridge's own starts")
    return row


async def _delete_input(run: Run, adapter: str, name: str) -> None:
    """Best effort: the row's topic, or its queue and exchange, so long-lived brokers keep none."""
    with contextlib.suppress(Exception):
        if adapter == "kafka" and run.kafka:
            await asyncio.wait_for(delete_topic(run.kafka, name), 20)
        elif adapter == "amqp" and run.amqp:
            await asyncio.wait_for(delete_queue(run.amqp, name), 20)


async def scale_out(run: Run, single: Row | None, ingress: int = 2, workers: int = 2) -> Row:
    """``ingress`` ``signal-bridge ingress`` and ``workers`` ``signal-bridge worker`` processes, one
    dispatcher shard per worker, default start mode; HTTP events split over the ingress ports."""
    project = unique("bench-scale")
    targets = {phase: f"{project}-{phase}" for phase in ("warm", "tput")}
    config = bridge_config(
        project=project, address=run.address, mode=None, targets=targets, shards=workers, settings=run.settings
    )
    bridge = Bridge(run.workdir, config, ingress=ingress, workers=workers)
    try:
        await bridge.start()
        sender = HttpSender(bridge.urls)
        try:
            await warm_up(run, sender, f"{project}-warm", count=4 * workers)
            name = f"scale-out {ingress} ingress+{workers} worker: http {mode_label(None)}"
            row = await _throughput(run, name, sender, bridge, f"{project}-tput")
        finally:
            await sender.close()
        to_ceiling = row.ratio
        row.against(single, "1 serve")
        if to_ceiling is not None:
            row.notes.insert(0, f"{to_ceiling:.2f}x ceiling")
        return run.add(row)
    finally:
        bridge.stop()
        await terminate_dispatchers(run.client, project, bridge.shards)


# --- burst ----------------------------------------------------------------------------------------


BURST_LIMIT = 600.0
"""Seconds a burst of a given number of events may take."""


async def wrk(
    run: Run,
    url: str,
    batch: int,
    token: str,
    seconds: float,
    threads: int = 2,
    connections: int = 64,
    *,
    events: int = 0,
) -> WrkResult:
    """wrk with bench/events.lua: every request its own ``Idempotency-Key``. With ``events``, a
    burst of that many events (rounded up to whole requests per thread, BURST_LIMIT s at most):
    wrk is interrupted once every thread has its quota answered, and reports the time until then.
    Without, ``seconds`` of requests."""
    quota = -(-events // (batch * threads)) if events else 0
    limit = BURST_LIMIT if quota else seconds
    cmd = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{limit:g}s", "--timeout", "30s", "-s", str(WRK_LUA), url]
    cmd += ["--", str(batch), token, unique("wrk"), "burst", str(quota)]
    proc = Proc("wrk", cmd, run.workdir / f"{unique('wrk')}.log")
    try:
        if quota:
            await wrk_quotas([proc], threads, limit)
        code = await proc.wait(limit + 60)
    finally:
        proc.stop()
    if code != 0:
        raise RuntimeError(f"wrk exited with {code}:\n{proc.output()}")
    return parse_wrk(proc.output(100_000))


async def dispatcher_stats(client: Client, project: str, shards: int) -> list[dict[str, Any]]:
    out = []
    for shard in range(shards):
        handle = client.get_workflow_handle(dispatcher_id(project, shard, shards))
        out.append(dict(await asyncio.wait_for(query_stats(handle), 20)))
    return out


async def summed_stats(client: Client, project: str, shards: int) -> dict[str, int]:
    """``received``, ``backlog`` and ``started`` over every shard's dispatcher."""
    every = await dispatcher_stats(client, project, shards)
    return {key: sum(int(stats.get(key, 0)) for stats in every) for key in ("received", "backlog", "started")}


async def received_check(run: Run, project: str, accepted: int, timeout: float, shards: int = 1) -> str:
    """Poll the dispatcher's ``stats`` until it has received every accepted event (or ``timeout``).
    Not the drain (:func:`drain_check` watches its rate): starting them all would take minutes."""
    deadline = time.monotonic() + timeout
    began = time.monotonic()
    stats: dict[str, Any] = {}
    while True:
        try:
            stats = dict(await summed_stats(run.client, project, shards))
        except Exception as exc:
            stats = {"error": type(exc).__name__}
        received = int(stats.get("received", -1))
        if received >= accepted or time.monotonic() > deadline:
            break
        await asyncio.sleep(1)
    if "error" in stats:
        return f"FAILED: durability unchecked: stats query failed ({stats['error']})"
    took = f"after {time.monotonic() - began:.0f}s (backlog {stats.get('backlog')}, started {stats.get('started')})"
    if received < accepted:
        return f"FAILED: durable MISSING: dispatcher received {received} of {accepted} accepted {took}"
    more = f", {received - accepted} more (requests not answered 202)" if received > accepted else ""
    return f"durable ok: dispatcher received {received}, {accepted} accepted{more} {took}"


async def drain_check(run: Run, project: str, seconds: float, shards: int = 1) -> str:
    """Targets started per second over ``seconds`` after the burst, against the last ceiling (what
    the throughput rows are measured against): a backlog should start at the bridge's throughput,
    not slower for its size."""
    before = await summed_stats(run.client, project, shards)
    began = time.monotonic()
    await asyncio.sleep(seconds)
    after = await summed_stats(run.client, project, shards)
    rate = (int(after["started"]) - int(before["started"])) / (time.monotonic() - began)
    ceiling = run.ceiling.rate if run.ceiling and run.ceiling.rate else None
    ratio = f" ({rate / ceiling:.2f}x ceiling)" if ceiling else ""
    left = int(after["backlog"])
    whole = "" if left else "; the backlog ran out, so the rate is a lower bound"
    return f"drain {rate:.1f} starts/s over {seconds:g}s{ratio}, backlog {left} after{whole}"


async def _bare_rows(run: Run, batches: list[int]) -> dict[int, Row]:
    bare = Bare(run.workdir)
    rows: dict[int, Row] = {}
    try:
        await bare.start()
        for batch in batches:
            result = await wrk(run, bare.url, batch, "", run.burst_seconds, events=run.burst_events)
            rows[batch] = run.add(_burst_row(f"burst bare litestar, {batch}/request", result, batch, None))
    finally:
        bare.stop()
    for batch in batches:
        await _durable_bare_row(run, batch, rows[batch])
    return rows


async def _durable_bare_row(run: Run, batch: int, bare: Row) -> Row:
    """The same burst against the bare endpoint made durable (``python -m bench.bare
    --temporal``): one signal-with-start at a time carrying every request waiting, to a workflow
    no worker runs. No bridge can answer faster on this server; its ratio to bare is the bound
    the bridge's rows are read against."""
    workflow_id = unique("bench-bare-durable")
    durable = Bare(run.workdir, run.address, workflow_id)
    handle = run.client.get_workflow_handle(f"{workflow_id}-0")
    try:
        await durable.start()
        result = await wrk(run, durable.url, batch, "", run.burst_seconds, events=run.burst_events)
        row = _burst_row(f"burst bare litestar + signal, {batch}/request", result, batch, bare)
        history = handle.fetch_history_events()
        signaled = "workflow_execution_signaled_event_attributes"
        signals = sum([1 async for event in history if event.HasField(signaled)]) - 1  # less start()'s ping
        if signals > 0:
            row.notes.insert(0, f"{signals} signals, {result.accepted * batch / signals:.0f} events each")
        return run.add(row)
    finally:
        durable.stop()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(handle.terminate("bench done"), 10)


def _burst_row(name: str, result: WrkResult, batch: int, bare: Row | None) -> Row:
    """The rate of requests answered ``202`` (times ``batch``: events): a refusal (``503
    overloaded``) is answered faster, and counts in the notes, not in the rate."""
    unit = "req/s" if batch == 1 else "events/s"
    if not result.seconds:
        raise RuntimeError(f"wrk's duration was not read: {status_summary(result)}")
    rate = result.accepted / result.seconds
    row = Row(name, rate * batch, unit=unit).against(bare, "bare")
    row.p50, row.p99 = result.p50, result.p99  # wrk's, of each request
    row.notes.append(f"{result.requests} requests: {status_summary(result)}")
    return row


async def _bridge_burst(run: Run, batch: int, bare: Row | None, *, split: bool = False) -> Row:
    """One burst against a fresh bridge: one ``serve``, or (``split``) one ``ingress`` with one
    ``worker`` beside it."""
    project = unique("bench-burst")
    config = bridge_config(
        project=project, address=run.address, mode=None, targets={"burst": f"{project}-burst"}, settings=run.settings
    )
    bridge = Bridge(run.workdir, config, ingress=int(split), workers=int(split))
    try:
        await bridge.start()
        result = await wrk(run, bridge.urls[0], batch, TOKEN, run.burst_seconds, events=run.burst_events)
        bridge.check_alive()
        deployment = "ingress+worker" if split else "bridge"
        row = _burst_row(f"burst {deployment} {mode_label(None)}, {batch}/request", result, batch, bare)
        row.notes.insert(0, f"not accepted {result.not_accepted}")
        accepted = result.accepted * batch
        timeout = max(60.0, 3 * run.burst_seconds)
        row.notes.append(await received_check(run, project, accepted, timeout, bridge.shards))
        if run.drain_seconds > 0:
            row.notes.append(await drain_check(run, project, run.drain_seconds, bridge.shards))
        row.notes.insert(1, _rss_note(bridge.peak_rss_mib()))  # the high-water mark, drain included
        return run.add(row)
    finally:
        bridge.stop()
        await terminate_dispatchers(run.client, project, bridge.shards)


def _rss_note(peaks: dict[str, float | None]) -> str:
    """``peak RSS 146 MiB``; with more than one process, each one's."""

    def mib(value: float | None) -> str:
        return "unknown" if value is None else f"{value:.0f} MiB"

    if len(peaks) == 1:
        return f"peak RSS {mib(next(iter(peaks.values())))}"
    return "peak RSS " + ", ".join(f"{name} {mib(value)}" for name, value in peaks.items())


async def burst(run: Run) -> None:
    """wrk (2 threads, 64 connections) against the bare endpoint, then the bridge (default mode, a
    fresh ``serve`` per variant, then a fresh ``ingress`` with a ``worker``): single events and
    batches of ``run.burst_batch``."""
    batches = [1, run.burst_batch] if run.burst_batch > 1 else [1]
    bare = await _bare_rows(run, batches)
    for split in (False, True):
        for batch in batches:
            await _bridge_burst(run, batch, bare.get(batch), split=split)

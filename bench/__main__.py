"""The bridge as users run it, against the ceiling, in one run against one Temporal server.

    python -m bench [--quick] [--events N] [--concurrency C] [--adapters http,kafka,amqp]
                    [--modes child,activity] [--temporal ADDR] [--burst-events N] [--skip-burst] [--skip-scale-out]

The bench process is the load generator; the bridge runs as its own processes
(``signal-bridge serve --config <generated yaml>``, or ``ingress`` + ``worker`` for the scale-out),
each on a free port, ready once ``/readyz`` answers. Targets run on a task queue no worker polls,
so only starting is measured; their start times come from Temporal's visibility.

1. ceiling: N direct ``client.start_workflow`` calls, as many in flight as the dispatcher starts at
   once (``--ceiling-concurrency``, default 200); measured again before each adapter and mode
   (unless ``--one-ceiling``), and every row's ratio is to the ceiling measured just before it.
2. per adapter and ``dispatcher.start_mode`` (each row sets it; the ``default`` row leaves it out):
   throughput, N events → N targets started, from the first send to the last start (HTTP events
   sent by wrk, ``--http-client python`` for a Python client); then latency,
   an open-loop load of 0.5 x the ceiling's rate for a fixed time, p50/p99 from the adapter's
   acknowledgement (HTTP 202, Kafka producer ack, RabbitMQ publisher confirm) to the target's start.
3. scale-out: 2 ``ingress`` + 2 ``worker`` processes (``dispatcher.shards: 2``), HTTP throughput,
   against the one-``serve`` default row.
4. burst: wrk (2 threads, 64 connections) sends 10,000 events (``--burst-events``) to a bare
   litestar endpoint, to the same endpoint made durable (each ``202`` after a signal-with-start
   that carries every event waiting: the bound of any bridge on this server), and to the bridge
   (one ``serve``, then one ``ingress`` with one ``worker``),
   single events and batches; req/s, ratio to bare, refusals, each bridge process's peak RSS,
   whether the dispatcher received every accepted event, and the rate its backlog then drains at.

The brokers come from ``KAFKA_BOOTSTRAP_SERVERS`` and ``AMQP_URL``, Temporal from ``--temporal`` or
``TEMPORAL_ADDRESS`` (else a fresh embedded dev server). ``make bench`` runs this under
``python -m tests.services run --``, which starts all three and sets those variables.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import shlex
import shutil
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Awaitable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml
from temporalio.api.workflowservice.v1 import GetSystemInfoRequest
from temporalio.client import Client

from bench import procs, scenarios
from bench.load import ceiling
from bench.report import HEADER, Row, machine, table
from bench.scenarios import Run, mode_label
from bridge.config import DispatcherConfig
from bridge.runtime.embedded import EmbeddedTemporal

ADAPTERS = ("http", "kafka", "amqp")
MODES = ("child", "activity", "default")
ENDPOINT_VARS = {"kafka": "KAFKA_BOOTSTRAP_SERVERS", "amqp": "AMQP_URL"}
# (full, --quick): events per throughput row, open-loop seconds, events per burst, burst seconds
# (without events), seconds of drain watched after a burst.
SIZES = {
    "events": (800, 250),
    "latency_seconds": (20.0, 10.0),
    "burst_events": (10_000, 5_000),
    "burst_seconds": (10.0, 5.0),
    "drain_seconds": (15.0, 8.0),
}


def _setting(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` as a dispatcher setting, the value read as YAML (``32`` is a number); checked
    against the config model now, not in the first bridge."""
    key, sep, value = text.partition("=")
    if not sep or key not in DispatcherConfig.model_fields:
        raise argparse.ArgumentTypeError(f"{text!r}: expected KEY=VALUE with a dispatcher setting as KEY")
    setting = (key, yaml.safe_load(value))
    try:
        DispatcherConfig.model_validate(dict([setting]))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r}: {exc}") from exc
    return setting


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="smaller N and shorter durations (3 to 5 minutes)")
    p.add_argument("--events", type=int, help=f"events per throughput row (default {SIZES['events']} full/quick)")
    p.add_argument("--concurrency", type=int, default=32, help="HTTP clients and publishes in flight")
    p.add_argument(
        "--ceiling-concurrency",
        type=int,
        default=DispatcherConfig().batch_size,
        help="direct starts in flight for the ceiling (default: dispatcher.batch_size's default, the most "
        "starts the dispatcher makes at once)",
    )
    default = ",".join(["http", *(name for name, var in ENDPOINT_VARS.items() if os.environ.get(var))])
    p.add_argument("--adapters", default=default, help="default: http, and each broker whose endpoint is set")
    p.add_argument("--modes", default="child,activity", help="dispatcher.start_mode per row (child, activity, default)")
    p.add_argument("--temporal", default=os.environ.get("TEMPORAL_ADDRESS") or None, help="default: $TEMPORAL_ADDRESS")
    p.add_argument("--latency-seconds", type=float, help="open-loop duration (default 20, quick 10)")
    p.add_argument("--load", type=float, default=0.5, help="open-loop rate as a fraction of the ceiling")
    p.add_argument(
        "--burst-events", type=int, help="events per burst (default 10000, quick 5000; 0: a burst of --burst-seconds)"
    )
    p.add_argument("--burst-seconds", type=float, help="with --burst-events 0, wrk's duration (default 10, quick 5)")
    p.add_argument("--drain-seconds", type=float, help="drain watched after each burst (default 15, quick 8; 0: none)")
    p.add_argument("--burst-batch", type=int, default=10, help="events per request in the batch burst (1: none)")
    p.add_argument(
        "--dispatcher",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        type=_setting,
        help="a dispatcher setting for every bridge, e.g. starts_in_flight=32 (repeatable)",
    )
    p.add_argument(
        "--http-client",
        choices=("wrk", "python"),
        default="wrk",
        help="the HTTP throughput rows' load generator (default wrk: a Python client takes CPU from the bridge)",
    )
    p.add_argument(
        "--one-ceiling",
        action="store_true",
        help="measure the ceiling once, not before each adapter and mode (the server slows as its database grows)",
    )
    p.add_argument("--skip-default", action="store_true", help="no http row without start_mode")
    p.add_argument("--skip-scale-out", action="store_true")
    p.add_argument("--skip-burst", action="store_true")
    args = p.parse_args(argv)
    for key, (full, quick) in SIZES.items():
        if getattr(args, key) is None:
            setattr(args, key, quick if args.quick else full)
    args.adapters = [a.strip() for a in args.adapters.split(",") if a.strip()]
    for name in args.adapters:
        if name not in ADAPTERS:
            p.error(f"unknown adapter {name!r}; known: {', '.join(ADAPTERS)}")
        if name in ENDPOINT_VARS and not os.environ.get(ENDPOINT_VARS[name]):
            p.error(f"{name} needs ${ENDPOINT_VARS[name]} (or run under `python -m tests.services run --`)")
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    for mode in args.modes:
        if mode not in MODES:
            p.error(f"unknown mode {mode!r}; known: {', '.join(MODES)}")
    if not args.skip_burst and not shutil.which("wrk"):
        p.error("the burst needs wrk (apt-get install wrk, or make services); or pass --skip-burst")
    if "http" in args.adapters and args.http_client == "wrk" and not shutil.which("wrk"):
        p.error("the HTTP throughput rows need wrk (apt-get install wrk, or make services); or --http-client python")
    return args


async def attempt(run: Run, name: str, step: Awaitable[Row | None]) -> Row | None:
    """Run one scenario; a failure becomes a FAILED row (with the details on stderr), not the end."""
    began = time.monotonic()
    try:
        return await step
    except Exception as exc:
        print(f"--- {name} failed:\n{traceback.format_exc()}", file=sys.stderr, flush=True)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        run.add(Row(name, None, notes=[f"FAILED: {type(exc).__name__}: {first[:160]}"]))
        return None
    finally:
        print(f"  ({name}: {time.monotonic() - began:.0f}s)", flush=True)


async def measure(run: Run, args: argparse.Namespace) -> None:
    await ceiling(run.client, min(run.events, 200), args.ceiling_concurrency)  # warm: the first runs are slower
    first = run.ceiling = run.add(await ceiling(run.client, run.events, args.ceiling_concurrency))
    await bridge_ceiling(run, args)
    single: Row | None = None
    for adapter in args.adapters:
        for mode in args.modes:
            if run.rows[-1] is not run.bridge_ceiling and not args.one_ceiling:  # a row since the last
                await refresh_ceiling(run, args, f"{adapter} {mode}", first)
            started = await attempt(
                run, f"{adapter} {mode}", scenarios.adapter(run, adapter, None if mode == "default" else mode)
            )
            if adapter == "http" and mode == "default":
                single = started
    if single is None and not args.skip_default and "http" in args.adapters:
        # The baseline of the scale-out row, and what a config without start_mode gets: throughput only.
        if not args.one_ceiling:
            await refresh_ceiling(run, args, f"http {mode_label(None)}", first)
        step = scenarios.adapter(run, "http", None, latency=False)
        single = await attempt(run, f"http {mode_label(None)}", step)
    if not args.skip_scale_out:
        await attempt(run, "scale-out", scenarios.scale_out(run, single))
    if not args.skip_burst:
        await attempt(run, "burst", scenarios.burst(run))
    # The machine's load drifts (2 cores): the ceiling once more shows how far, not used for ratios.
    again = await ceiling(run.client, run.events, args.ceiling_concurrency, "ceiling again, at the end")
    run.add(again.against(first, "ceiling"))


async def refresh_ceiling(run: Run, args: argparse.Namespace, before: str, first: Row) -> None:
    """The ceiling measured again for the rows that follow: the dev server slows as its database
    grows, and the machine's load drifts, so a row compares with the server as it is now. The
    row's ratio is to the first ceiling (the drift so far)."""
    name = f"ceiling, before {before}"
    row = await ceiling(run.client, run.events, args.ceiling_concurrency, name)
    run.ceiling = run.add(row.against(first, "ceiling"))
    await bridge_ceiling(run, args)


async def bridge_ceiling(run: Run, args: argparse.Namespace) -> None:
    """Right after a ceiling, the same starts as the bridge makes them (its memo and search
    attributes, its argument): the part of the ceiling the bridge cannot reach whatever it does.
    Its ratio is to the ceiling just measured; the throughput rows after it note theirs to it."""
    name = "  same starts as the bridge's"
    row = await ceiling(run.client, run.events, args.ceiling_concurrency, name, like_bridge=True)
    run.bridge_ceiling = run.add(row.against(run.ceiling, "ceiling"))


async def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    task = asyncio.current_task()
    assert task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    began = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="signal-bridge-bench-"))
    server = None
    address = args.temporal
    try:
        if not address:
            server = EmbeddedTemporal(workdir / "temporal", ui=False)
            address = await server.start()
        client = await Client.connect(address)
        info = await client.workflow_service.get_system_info(GetSystemInfoRequest())
        if server:
            origin = "an embedded dev server the bench started"
        else:
            origin = "from $TEMPORAL_ADDRESS" if address == os.environ.get("TEMPORAL_ADDRESS") else "from --temporal"
        run = Run(
            client=client,
            address=address,
            workdir=workdir,
            events=args.events,
            concurrency=args.concurrency,
            latency_seconds=args.latency_seconds,
            load_fraction=args.load,
            burst_seconds=args.burst_seconds,
            burst_batch=args.burst_batch,
            burst_events=args.burst_events,
            drain_seconds=args.drain_seconds,
            kafka=os.environ.get("KAFKA_BOOTSTRAP_SERVERS"),
            amqp=os.environ.get("AMQP_URL"),
            settings=dict(args.dispatcher),
            http_client=args.http_client,
        )
        context = [
            f"signal-bridge bench, {datetime.now(UTC):%Y-%m-%d %H:%M} UTC",
            f"command:  {shlex.join(['python', '-m', 'bench', *(sys.argv[1:] if argv is None else argv)])}",
            f"machine:  {machine()}",
            f"temporal: {address} ({origin}), server {info.server_version or 'version unknown'}",
            f"sizes:    {run.events} events per throughput row, concurrency {run.concurrency} "
            f"(ceiling: {args.ceiling_concurrency}); "
            f"latency: open loop at {run.load_fraction:g} x ceiling for {run.latency_seconds:g}s; "
            "burst: wrk -t2 -c64, "
            + (f"{run.burst_events} events" if run.burst_events else f"{run.burst_seconds:g}s")
            + f", drain watched {run.drain_seconds:g}s",
            f"logs:     {workdir}",
        ]
        print("\n".join(context), flush=True)
        print(HEADER, flush=True)
        await measure(run, args)
        failed = any(note.startswith("FAILED") for row in run.rows for note in row.notes)
        context[-1] = f"logs:     {workdir}" if failed else "logs:     removed (no row failed)"
        context.append(f"took:     {time.monotonic() - began:.0f}s")
        print("\n" + table(run.rows, context), flush=True)
    finally:
        procs.stop_all()
        if server:
            server.stop()
    if not failed:
        shutil.rmtree(workdir, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    try:
        sys.exit(asyncio.run(main()))
    except (KeyboardInterrupt, asyncio.CancelledError):
        procs.stop_all()
        print("interrupted: every process the bench started is stopped", file=sys.stderr)
        sys.stdout.flush()
        sys.stderr.flush()
        # Not sys.exit: the Temporal client's native threads may still call back into an interpreter
        # that is finalizing (a fatal PyGILState_Release), after an RPC was cancelled mid-flight.
        os._exit(130)

"""Throughput of the adapters against the ceiling, all against one Temporal server in one run.

    python -m bench [--events N] [--concurrency C] [--adapters http,kafka,amqp] [--temporal ADDR]

(a) ceiling: N direct ``client.start_workflow`` calls of the target the adapters start;
(b) per adapter and dispatcher start mode: N events in → N targets started, with p50/p99 latency
    from the adapter's acknowledgement (HTTP 202; broker publish confirm) to the target's start.
Targets run on a task queue no worker polls, so only starting is measured. Ratios are b/a.

The brokers come from ``KAFKA_BOOTSTRAP_SERVERS`` and ``AMQP_URL``, Temporal from ``--temporal`` or
``TEMPORAL_ADDRESS`` (else a fresh embedded dev server). ``make bench`` runs this under
``python -m tests.services run --``, which starts all three and sets those variables.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import tempfile

from temporalio.client import Client

from bench.report import line
from bench.runners import RUNNERS, Setup, ceiling
from bridge.runtime.embedded import EmbeddedTemporal

ENDPOINT_VARS = {"kafka": "KAFKA_BOOTSTRAP_SERVERS", "amqp": "AMQP_URL"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--events", type=int, default=1000)
    p.add_argument("--concurrency", type=int, default=32)
    default = ",".join(["http", *(name for name, var in ENDPOINT_VARS.items() if os.environ.get(var))])
    p.add_argument(
        "--adapters", "--doors", default=default, help="default: http, and each broker whose endpoint is set"
    )
    p.add_argument("--modes", default="child,activity")
    p.add_argument(
        "--temporal",
        default=os.environ.get("TEMPORAL_ADDRESS") or None,
        help="address; default: $TEMPORAL_ADDRESS, else a fresh embedded dev server",
    )
    args = p.parse_args(argv)
    args.adapters = [a.strip() for a in args.adapters.split(",") if a.strip()]
    for name in args.adapters:
        if name not in RUNNERS:
            p.error(f"unknown adapter {name!r}; known: {', '.join(RUNNERS)}")
        if name in ENDPOINT_VARS and not os.environ.get(ENDPOINT_VARS[name]):
            p.error(f"{name} needs ${ENDPOINT_VARS[name]} (or run under `python -m tests.services run --`)")
    return args


async def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    for noisy in ("temporalio", "bridge", "adapters", "dispatcher", "httpx", "aiokafka", "aio_pika"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    server = None
    address = args.temporal
    if not address:
        server = EmbeddedTemporal(tempfile.mkdtemp(prefix="bench-"), ui=False)
        address = await server.start()
    try:
        setup = Setup(
            client=await Client.connect(address),
            address=address,
            events=args.events,
            concurrency=args.concurrency,
            kafka_bootstrap=os.environ.get("KAFKA_BOOTSTRAP_SERVERS"),
            amqp_url=os.environ.get("AMQP_URL"),
        )
        print(f"signal-bridge bench: {setup.events} events, concurrency {setup.concurrency}, Temporal {address}")
        base = await ceiling(setup)
        print(line(base, base), flush=True)
        for adapter in args.adapters:
            for mode in args.modes.split(","):
                print(line(await RUNNERS[adapter](setup, mode), base), flush=True)
    finally:
        if server:
            server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))

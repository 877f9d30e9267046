"""What the bridge's search attributes cost a start, one attribute at a time.

    python -m bench.attributes [--rounds R] [--events N] [--concurrency C] [--temporal ADDR]

Direct starts of N runs each: bare (``bench.load.ceiling``), then as the bridge makes them
(``bench.load.start_like_bridge``: its memo and argument) with none, one, two and all four of its
search attributes. The variants take turns, the order reversed every other round, so a server that
slows as its database grows slows them alike. Each variant's rates and its mean's ratio to bare's
are printed at the end. Against ``--temporal`` or ``$TEMPORAL_ADDRESS``, else a fresh embedded dev
server.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
from pathlib import Path

from temporalio.client import Client

from bench.load import ceiling
from bridge.runtime.embedded import EmbeddedTemporal
from dispatcher import search

# name -> the attributes each start carries; None: a bare start (no memo, a small argument).
VARIANTS: dict[str, tuple[str, ...] | None] = {
    "bare": None,
    "memo, no attributes": (),
    "memo + event id": (search.EVENT_ID.name,),
    "memo + event id, project": (search.EVENT_ID.name, search.PROJECT.name),
    "memo + all four": search.NAMES,
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.attributes", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--rounds", type=int, default=6, help="turns of every variant (default 6)")
    p.add_argument("--events", type=int, default=800, help="starts per variant and round (default 800)")
    p.add_argument("--concurrency", type=int, default=64, help="starts in flight (default 64)")
    p.add_argument("--temporal", default=os.environ.get("TEMPORAL_ADDRESS") or None, help="default: $TEMPORAL_ADDRESS")
    return p.parse_args(argv)


async def measure(client: Client, rounds: int, events: int, concurrency: int) -> dict[str, list[float]]:
    """Starts per second of every variant, one rate per round."""
    await ceiling(client, min(events, 200), concurrency, "warm-up")  # a fresh server's first starts are slower
    rates: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for turn in range(rounds):
        order = list(VARIANTS) if turn % 2 == 0 else list(reversed(VARIANTS))
        for name in order:
            attributes = VARIANTS[name]
            row = await ceiling(
                client, events, concurrency, name, like_bridge=attributes is not None, attributes=attributes or ()
            )
            assert row.rate is not None
            rates[name].append(row.rate)
            print(f"round {turn + 1}: {name:<26} {row.rate:7.1f} starts/s", flush=True)
    return rates


def report(rates: dict[str, list[float]]) -> list[str]:
    bare = statistics.mean(rates["bare"])
    return [
        f"{name:<26} mean {statistics.mean(r):7.1f} starts/s  {statistics.mean(r) / bare:5.2f} x bare  "
        f"({', '.join(f'{x:.0f}' for x in r)})"
        for name, r in rates.items()
    ]


async def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    server = None
    address = args.temporal
    try:
        if not address:
            server = EmbeddedTemporal(Path(tempfile.mkdtemp(prefix="signal-bridge-bench-")) / "temporal", ui=False)
            address = await server.start()
        client = await Client.connect(address)
        print(f"{args.events} starts per variant and round, {args.concurrency} in flight, against {address}")
        for text in report(await measure(client, args.rounds, args.events, args.concurrency)):
            print(text)
    finally:
        if server:
            server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))

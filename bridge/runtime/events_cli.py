"""``signal-bridge setup`` and ``signal-bridge events show|list``: the Temporal side of a project.

``setup`` registers the search attributes target runs carry (:mod:`dispatcher.search`); ``events``
finds the runs events started (:mod:`bridge.runtime.lookup`), for every source, straight from
Temporal's visibility. Both read the Temporal address, namespace and credentials from the config;
a config without an address means the embedded dev server of ``make run`` (127.0.0.1:7233 unless
``--temporal`` says otherwise).
"""

from __future__ import annotations

import argparse
import asyncio
import json
from typing import Any

from temporalio.client import Client

from bridge import snapshot
from bridge.runtime.lookup import Lookup, Run, since
from dispatcher import search

EMBEDDED_DEFAULT = "127.0.0.1:7233"


def add_parsers(sub: Any) -> None:
    """Register the subcommands on ``signal-bridge``'s subparsers."""
    s = sub.add_parser("setup", help="register the search attributes target runs carry (SignalBridge*)")
    s.add_argument("--config", "-c", required=True)
    s.add_argument("--temporal", default=None, help="address; default the config's")
    s.set_defaults(func=lambda a: asyncio.run(_setup(a)))
    e = sub.add_parser("events", help="the runs events started, from Temporal's visibility")
    verbs = e.add_subparsers(dest="verb", required=True)
    show = verbs.add_parser("show", help="the runs one event started")
    show.add_argument("id")
    show.add_argument("--source", default=None, help="e.g. http:token-name, kafka:orders, webhook:stripe")
    listing = verbs.add_parser("list", help="runs of events by name, age and status")
    listing.add_argument("--name", default=None, help="event name; a trailing * is a prefix: 'order.*'")
    listing.add_argument("--since", default=None, help="started within: 30m, 1h, 7d")
    listing.add_argument("--status", default=None, help="running, completed, failed, canceled, terminated, timed_out")
    listing.add_argument("--limit", type=int, default=100)
    for verb in (show, listing):
        verb.add_argument("--config", "-c", required=True)
        verb.add_argument("--temporal", default=None, help="address; default the config's")
        verb.add_argument("--ui", default=None, help="Temporal UI address, for links (default: none)")
        verb.add_argument("--json", action="store_true", help="one JSON object per run")
    e.set_defaults(func=lambda a: asyncio.run(_events(a)))


async def _client(args: argparse.Namespace) -> tuple[Client, snapshot.Snapshot]:
    from bridge.runtime.app import connect

    snap = snapshot.load(args.config)
    t = snap.config.temporal
    address = args.temporal or t.address or EMBEDDED_DEFAULT
    return await connect(address, t.namespace, api_key=t.api_key, tls=t.tls, timeout=10), snap


async def _setup(args: argparse.Namespace) -> int:
    client, snap = await _client(args)
    namespace = snap.config.temporal.namespace
    added = await search.register(client, namespace)
    if added:
        print(f"registered in namespace {namespace}: {', '.join(added)}")
    else:
        print(f"namespace {namespace} has them already: {', '.join(search.NAMES)}")
    return 0


async def _events(args: argparse.Namespace) -> int:
    client, snap = await _client(args)
    lookup = Lookup(client, snap.config.project, snap.routes, ui=args.ui)
    if args.verb == "show":
        runs = await lookup.event(args.id, args.source)
    else:
        after = since(args.since) if args.since else None
        runs = await lookup.events(name=args.name, started_after=after, status=args.status, limit=args.limit)
    for run in runs:
        print(json.dumps(run.to_dict()) if args.json else _line(run))
    if not runs:
        print("no runs found (a run is visible for the namespace's retention only)")
        return 1 if args.verb == "show" else 0
    return 0


def _line(run: Run) -> str:
    closed = f" closed {run.close_time}" if run.close_time else ""
    link = f" {run.url}" if run.url else ""
    return (
        f"{run.status:<10} {run.workflow_id} run={run.run_id} entry={run.workflow_entry or '-'} "
        f"event={run.event_id} name={run.event_name} source={run.source} started {run.start_time}{closed}{link}"
    )

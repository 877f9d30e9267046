"""The bare endpoints the burst compares the bridge with.

    python -m bench.bare --port PORT
    python -m bench.bare --port PORT --temporal ADDRESS --workflow-id ID

Without ``--temporal``: litestar parses the JSON body and answers 202. With it, the least any
endpoint can do to make its ``202`` durable in Temporal: each request's events wait, and one
signal-with-start at a time (per ``--shards``) carries every event waiting to a workflow no
worker polls; the ``202`` goes once that signal is written. Nothing is checked, weighed or
routed, and no workflow task runs: what this endpoint answers is what the server lets any
bridge answer on this machine.

Served by uvicorn with the options ``bridge/runtime/app.py`` uses for the bridge's HTTP adapter
(same host default, ``log_level="warning"``, ``lifespan="on"``, ``timeout_graceful_shutdown=30``,
uvicorn's default loop and HTTP implementation), each in its own process, so the difference
between the rows is what the bridge does with an event, not the server around it.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
from typing import Any

import uvicorn
from litestar import Litestar, Request, Response, post
from temporalio.client import Client


class Durable:
    """One signal-with-start in flight per shard, carrying every event that waits for it."""

    def __init__(self, address: str, workflow_id: str, shards: int) -> None:
        self.address, self.workflow_id = address, workflow_id
        self.client: Client | None = None
        self.waiting: list[list[tuple[list[Any], asyncio.Future[None]]]] = [[] for _ in range(shards)]
        self.senders: list[asyncio.Task[None] | None] = [None] * shards
        self.turn = itertools.cycle(range(shards))

    async def connect(self) -> None:
        self.client = await Client.connect(self.address)

    async def put(self, events: list[Any]) -> None:
        shard = next(self.turn)
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.waiting[shard].append((events, done))
        sender = self.senders[shard]
        if sender is None or sender.done():
            self.senders[shard] = asyncio.create_task(self._send(shard))
        await done

    async def _send(self, shard: int) -> None:
        assert self.client is not None
        while self.waiting[shard]:
            batch, self.waiting[shard] = self.waiting[shard], []
            try:
                await self.client.start_workflow(
                    "bench-bare-durable",
                    id=f"{self.workflow_id}-{shard}",
                    task_queue=f"{self.workflow_id}-unpolled",
                    start_signal="events",
                    start_signal_args=[[event for events, _ in batch for event in events]],
                )
            except Exception as e:  # every request of the batch is answered with it
                for _, done in batch:
                    done.set_exception(e)
            else:
                for _, done in batch:
                    done.set_result(None)


durable: Durable | None = None


@post("/api/v1/events", status_code=202)
async def events(request: Request[Any, Any, Any]) -> Response[dict[str, Any]]:
    body = json.loads(await request.body())
    items = body if isinstance(body, list) else [body]
    if durable is not None:
        key = request.headers.get("idempotency-key", "")
        await durable.put([{"id": f"{key}#{i}", "event": item} for i, item in enumerate(items)])
    return Response({"status": "accepted", "events": len(items)}, status_code=202)


app = Litestar([events], openapi_config=None, logging_config=None)


def main(argv: list[str] | None = None) -> None:
    global durable
    p = argparse.ArgumentParser(prog="python -m bench.bare", description=__doc__)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--temporal", help="answer each request once its events are signaled to Temporal here")
    p.add_argument("--workflow-id", default="bench-bare-durable", help="with --temporal: the workflow signaled")
    p.add_argument(
        "--shards", type=int, default=1, help="with --temporal: workflows signaled, one signal each in flight"
    )
    args = p.parse_args(argv)
    if args.temporal:
        durable = Durable(args.temporal, args.workflow_id, args.shards)
        app.on_startup.append(durable.connect)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", lifespan="on", timeout_graceful_shutdown=30)


if __name__ == "__main__":
    main()

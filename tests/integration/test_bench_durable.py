"""The burst's durable bare endpoint (``python -m bench.bare --temporal``) against a real Temporal
server: every event it answers ``202`` for is in the workflow's history, once, and requests that
wait together share a signal. That a ``202`` waits for its signal is in
``tests/unit/test_bench_durable.py``."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import httpx
from temporalio.client import Client

from bench.procs import Bare
from tests.helpers import unique


async def _signaled(client: Client, workflow_id: str) -> list[list[dict[str, object]]]:
    """Each signal's events, in the order the workflow's history holds them."""
    history = client.get_workflow_handle(workflow_id).fetch_history_events()
    signals = []
    async for event in history:
        if event.HasField("workflow_execution_signaled_event_attributes"):
            payload = event.workflow_execution_signaled_event_attributes.input.payloads[0]
            signals.append(json.loads(payload.data))
    return signals


async def test_the_durable_bare_endpoint_signals_each_answered_event_once(
    temporal_address: str, temporal_client: Client, tmp_path: Path
) -> None:
    workflow_id = unique("bench-bare-durable")
    bare = Bare(tmp_path, temporal_address, workflow_id)
    try:
        await bare.start()  # its readiness check posts {"name": "ping"}
        async with httpx.AsyncClient(timeout=30) as http:

            async def post(key: str, body: object) -> httpx.Response:
                return await http.post(bare.url, json=body, headers={"Idempotency-Key": key})

            answers = await asyncio.gather(
                post("one", {"name": "a"}),
                post("batch", [{"name": "b"}, {"name": "c"}, {"name": "d"}]),
                *(post(f"k{i}", {"name": f"e{i}"}) for i in range(20)),
            )
        assert [a.status_code for a in answers] == [202] * 22
        assert answers[1].json() == {"status": "accepted", "events": 3}
        signals = await _signaled(temporal_client, f"{workflow_id}-0")  # read after the last 202
        events = {e["id"]: e["event"] for signal in signals for e in signal}  # type: ignore[index]
        assert events["one#0"] == {"name": "a"}
        assert [events[f"batch#{i}"] for i in range(3)] == [{"name": "b"}, {"name": "c"}, {"name": "d"}]
        assert all(events[f"k{i}#0"] == {"name": f"e{i}"} for i in range(20))
        assert len(events) == 1 + 1 + 3 + 20  # the ping, then each event once
        assert len(signals) < 1 + 22  # requests that waited together went in one signal
    finally:
        bare.stop()
        await temporal_client.get_workflow_handle(f"{workflow_id}-0").terminate("test done")

"""The bench's ceilings against a real Temporal server: the plain one, and the one that starts
runs as the bridge does (its memo and search attributes)."""

from __future__ import annotations

from temporalio.client import Client, WorkflowExecution

from bench import attributes
from bench.load import ceiling
from dispatcher import search
from tests.helpers import assert_eventually, unique


async def _runs(client: Client, queue: str, n: int) -> list[WorkflowExecution]:
    """The runs on ``queue`` once visibility lists all ``n`` of them."""

    async def listed() -> list[WorkflowExecution]:
        runs = [r async for r in client.list_workflows(f'TaskQueue="{queue}"')]
        return runs if len(runs) == n else []

    return await assert_eventually(listed, timeout=30, what=f"{n} runs listed")


async def test_the_bridge_like_ceiling_starts_runs_with_the_bridges_memo_and_attributes(
    temporal_client: Client,
) -> None:
    queue = unique("bench-ceiling")
    row = await ceiling(temporal_client, 3, 3, "c", like_bridge=True, queue=queue)
    assert row.rate and row.rate > 0 and row.notes == ["3 starts, 3 in flight"]
    runs = await _runs(temporal_client, queue, 3)
    assert sorted(r.id for r in runs) == [f"{queue}-{i}" for i in range(3)]
    for run in runs:
        memo = await run.memo()
        assert memo["event_id"] == run.id and memo["event_name"] == "tput" and memo["workflow_entry"] == "tput"
        assert run.typed_search_attributes.get(search.EVENT_ID) == run.id
        assert run.typed_search_attributes.get(search.PROJECT) == queue


async def test_the_plain_ceiling_starts_bare_runs(temporal_client: Client) -> None:
    queue = unique("bench-ceiling")
    await ceiling(temporal_client, 2, 2, "c", queue=queue)
    runs = await _runs(temporal_client, queue, 2)
    for run in runs:
        assert await run.memo() == {} and run.typed_search_attributes.get(search.EVENT_ID) is None


async def test_a_ceiling_with_some_attributes_starts_runs_carrying_only_those(temporal_client: Client) -> None:
    queue = unique("bench-ceiling")
    await ceiling(temporal_client, 2, 2, "c", like_bridge=True, attributes=(search.EVENT_ID.name,), queue=queue)
    for run in await _runs(temporal_client, queue, 2):
        assert (await run.memo())["event_id"] == run.id
        assert run.typed_search_attributes.get(search.EVENT_ID) == run.id
        assert [run.typed_search_attributes.get(k) for k in (search.EVENT_NAME, search.SOURCE, search.PROJECT)] == [
            None,
            None,
            None,
        ]


async def test_the_attributes_bench_measures_every_variant_each_round(temporal_client: Client) -> None:
    rates = await attributes.measure(temporal_client, rounds=2, events=3, concurrency=3)
    assert list(rates) == list(attributes.VARIANTS)
    assert all(len(r) == 2 and all(x > 0 for x in r) for r in rates.values())
    lines = attributes.report(rates)
    assert [line.split(" mean ")[0].strip() for line in lines] == list(attributes.VARIANTS)
    assert "1.00 x bare" in lines[0]

"""A user's own workflow, as any team would write it: it only sees the bridge's input object."""

from __future__ import annotations

from typing import Any

from temporalio import workflow


@workflow.defn(name="UserProcessOrder")
class UserProcessOrder:
    @workflow.run
    async def run(self, inp: dict[str, Any]) -> dict[str, Any]:
        return inp

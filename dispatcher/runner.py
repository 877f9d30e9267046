"""The built-in task runner: a workflow that runs a config entry's ``tasks`` in order.

Each task renders its config against ``{workflow_id, exec_id, input, trigger, event, tasks}``;
``template`` tasks store the rendered value, ``http`` tasks call a URL from an activity with
Temporal's retries. The result maps every task id to its output, so what a run rendered can be
read back from Temporal.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from temporalio import workflow
from temporalio.common import RetryPolicy

with workflow.unsafe.imports_passed_through():
    from bridge import templates
    from dispatcher.contract import HTTP_REQUEST, LOAD_TASKS, RUNNER_WORKFLOW, HttpRequest


@workflow.defn(name=RUNNER_WORKFLOW)
class TaskRunnerWorkflow:
    @workflow.run
    async def run(self, inp: dict[str, Any]) -> dict[str, Any]:
        tasks: list[dict[str, Any]] = await workflow.execute_local_activity(
            LOAD_TASKS,
            inp["workflow_id"],
            result_type=list[dict[str, Any]],
            start_to_close_timeout=timedelta(seconds=30),
        )
        outputs: dict[str, Any] = {}
        context = {**inp, "tasks": outputs}
        for task in tasks:
            cfg = task["config"]
            if task["type"] == "template":
                outputs[task["id"]] = templates.render(cfg["template"], context)
            else:
                req = HttpRequest(
                    url=templates.render(cfg["url"], context),
                    method=cfg.get("method", "POST"),
                    headers=templates.render(cfg.get("headers", {}), context),
                    body=templates.render(cfg.get("body"), context),
                    timeout_seconds=float(cfg.get("timeout_seconds", 30)),
                )
                outputs[task["id"]] = await workflow.execute_activity(
                    HTTP_REQUEST,
                    req,
                    result_type=dict[str, Any],
                    start_to_close_timeout=timedelta(seconds=req.timeout_seconds + 5),
                    retry_policy=RetryPolicy(
                        maximum_attempts=int(cfg.get("max_attempts", 5)),
                        maximum_interval=timedelta(seconds=30),
                    ),
                )
        return {"workflow_id": inp["workflow_id"], "exec_id": inp["exec_id"], "tasks": outputs}

"""The built-in task runner: a workflow that runs a config entry's ``tasks`` in order.

Each task renders its config against the target input plus ``tasks`` (the outputs so far);
``template`` tasks store the rendered value, ``http`` tasks call a URL from an activity with
Temporal's retries. The result maps every task id to its output, so what a run rendered can be
read back from Temporal. Task kinds and their settings are described in docs/configuration.md.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from temporalio import workflow
from temporalio.common import RetryPolicy

with workflow.unsafe.imports_passed_through():
    from pydantic import TypeAdapter

    from bridge import templates
    from bridge.config import HttpTask, Task
    from dispatcher.contract import HTTP_REQUEST, LOAD_TASKS, RUNNER_WORKFLOW, HttpRequest, TargetInput

# LOAD_TASKS sends the config's tasks as plain data; reading them back through the config's own
# model gives the runner its types and defaults without restating either.
TASKS = TypeAdapter(list[Task])


@workflow.defn(name=RUNNER_WORKFLOW)
class TaskRunnerWorkflow:
    @workflow.run
    async def run(self, inp: TargetInput) -> dict[str, Any]:
        raw: list[dict[str, Any]] = await workflow.execute_local_activity(
            LOAD_TASKS,
            inp["workflow_id"],
            result_type=list[dict[str, Any]],
            start_to_close_timeout=timedelta(seconds=30),
        )
        outputs: dict[str, Any] = {}
        context = {**inp, "tasks": outputs}
        for task in TASKS.validate_python(raw):
            if isinstance(task, HttpTask):
                outputs[task.id] = await self._http(task, context)
            else:
                outputs[task.id] = templates.render(task.config.template, context)
        return {"workflow_id": inp["workflow_id"], "exec_id": inp["exec_id"], "tasks": outputs}

    @staticmethod
    async def _http(task: HttpTask, context: dict[str, Any]) -> Any:
        cfg = task.config
        req = HttpRequest(
            url=templates.render(cfg.url, context),
            method=cfg.method,
            timeout_seconds=cfg.timeout_seconds,
            headers=templates.render(cfg.headers, context),
            body=templates.render(cfg.body, context),
        )
        return await workflow.execute_activity(
            HTTP_REQUEST,
            req,
            result_type=dict[str, Any],
            start_to_close_timeout=timedelta(seconds=req.timeout_seconds + 5),
            retry_policy=RetryPolicy(maximum_attempts=cfg.max_attempts, maximum_interval=timedelta(seconds=30)),
        )

"""The built-in task runner: a workflow that runs a config entry's ``tasks`` in order.

Each task renders its config against the target input plus ``tasks`` (the outputs so far);
``template`` tasks store the rendered value, ``http`` tasks are made by an activity with
Temporal's retries. The HTTP_REQUEST activity gets the task's name and the part of the context its
templates read, not a rendered request: it reads the config itself and substitutes ``${VAR}``
values only when it calls, so no secret is recorded in this workflow's history
(:mod:`dispatcher.http_task`). The result maps every task id to its output, so what a run did can
be read back from Temporal. Task kinds and their settings are described in docs/configuration.md.

Started as a child (``start_mode: child``), its result is recorded in the dispatcher's history
too, when it finishes while that dispatcher run is open: up to 800 children of a dispatcher may be
starting at once, so the result is then cut to CHILD_RESULT_BYTES (:func:`fitted`), the largest
outputs first, each replaced by ``{"elided_bytes": n}``. The outputs of http tasks stay whole in
this run's own history (the activity's result).
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ApplicationError

with workflow.unsafe.imports_passed_through():
    from pydantic import TypeAdapter

    from bridge import templates
    from bridge.config import HttpTask, Task
    from bridge.event import encoded_size
    from dispatcher.contract import (
        HTTP_REQUEST,
        LOAD_TASKS,
        RUNNER_WORKFLOW,
        TEMPLATE_STEPS,
        YIELD,
        HttpCall,
        TargetInput,
        encoded_as_sdk,
        wire,
    )

# LOAD_TASKS sends the config's tasks as plain data; reading them back through the config's own
# model gives the runner its types and defaults without restating either.
TASKS = TypeAdapter(list[Task])
DEFAULT_TIMEOUT = 30.0  # when LOAD_TASKS gave no effective timeout (it always does)
# A child's result in its dispatcher's history: 1,000 children a run (children_per_run) at this
# size are 16 MiB, within the history's 50 MiB beside the starts themselves.
CHILD_RESULT_BYTES = 16 * 1024
JSON_OUTPUTS = "runner-json-outputs"
"""The patch from which a template task whose value JSON cannot hold (``{{ .trigger.items }}`` of a
payload without ``items`` is the dict's method; an integer of more than 4,300 digits) fails the run,
naming the task. Before it, the run's result could not be encoded, which failed the workflow task
on every attempt, and the run never ended."""


def fitted(result: dict[str, Any], limit: int = CHILD_RESULT_BYTES) -> dict[str, Any]:
    """``result`` with its largest task outputs replaced by ``{"elided_bytes": n}`` until it
    weighs at most ``limit`` (or every output is replaced)."""
    if encoded_size(result) <= limit:
        return result
    outputs = dict(result["tasks"])
    sizes = {task: encoded_size({"v": out}) - 6 for task, out in outputs.items()}
    fitted = {**result, "tasks": outputs}
    for task in sorted(outputs, key=lambda t: (-sizes[t], t)):
        outputs[task] = {"elided_bytes": sizes[task]}
        if encoded_size(fitted) <= limit:
            break
    return fitted


def _as_json(task: str, value: Any) -> None:
    """Fail the run (not its workflow task, for ever) when the SDK cannot encode ``value``."""
    try:
        encoded_as_sdk(value, "its template")
    except ValueError as exc:
        raise ApplicationError(f"task {task!r}: {exc}", type="TemplateError", non_retryable=True) from None


@workflow.defn(name=RUNNER_WORKFLOW)
class TaskRunnerWorkflow:
    @workflow.run
    async def run(self, inp: TargetInput) -> dict[str, Any]:
        # Runs begun since the patch hold each template to its steps, and fail when one fails: before,
        # a failing template failed the workflow task on every attempt, and the run never ended.
        metered = workflow.patched(TEMPLATE_STEPS)
        checked = workflow.patched(JSON_OUTPUTS)
        raw: list[dict[str, Any]] = await workflow.execute_local_activity(
            LOAD_TASKS,
            inp["workflow_id"],
            result_type=list[dict[str, Any]],
            start_to_close_timeout=timedelta(seconds=30),
        )
        outputs: dict[str, Any] = {}
        context = {**inp, "tasks": outputs}
        steps = 0  # template steps in this workflow task
        for task in TASKS.validate_python(raw):
            if isinstance(task, HttpTask):
                outputs[task.id] = await self._http(inp["workflow_id"], task, context)
                steps = 0
            elif not metered:
                with templates.metered(None):
                    outputs[task.id] = templates.render(task.config.template, context)
            else:
                if steps >= templates.MAX_STEPS:  # the next in a workflow task of its own (a YIELD timer)
                    await workflow.sleep(YIELD)
                    steps = 0
                with templates.metered() as meter:
                    try:
                        outputs[task.id] = templates.render(task.config.template, context)
                    except templates.TemplateError as exc:
                        raise ApplicationError(
                            f"task {task.id!r}: {exc}", type="TemplateError", non_retryable=True
                        ) from None
                    finally:
                        steps += meter.steps
                if checked:
                    _as_json(task.id, outputs[task.id])
        result = {"workflow_id": inp["workflow_id"], "exec_id": inp["exec_id"], "tasks": outputs}
        return fitted(result) if workflow.info().parent is not None else result

    @staticmethod
    async def _http(workflow_id: str, task: HttpTask, context: dict[str, Any]) -> Any:
        cfg = task.config
        used = templates.names([cfg.url, cfg.method, cfg.headers, cfg.body])
        timeout = cfg.timeout_seconds or DEFAULT_TIMEOUT
        call = HttpCall(
            workflow_id=workflow_id,
            task_id=task.id,
            context={name: context[name] for name in sorted(used) if name in context},
            timeout_seconds=timeout,
        )
        return await workflow.execute_activity(
            HTTP_REQUEST,
            wire(call),
            result_type=dict[str, Any],
            start_to_close_timeout=timedelta(seconds=timeout + 10),  # resolving and connecting too
            retry_policy=RetryPolicy(maximum_attempts=cfg.max_attempts, maximum_interval=timedelta(seconds=30)),
        )

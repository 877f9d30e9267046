"""The worker that runs the dispatcher, the task runner and their activities on the project's queue.

The activities read the config through ``current``, so a reload is seen by the next
LOAD_ROUTES/LOAD_TASKS; roles and scaling out are described in docs/operations.md.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from temporalio.client import Client
from temporalio.worker import Worker
from temporalio.worker.workflow_sandbox import SandboxedWorkflowRunner, SandboxRestrictions

from bridge.metrics import Metrics
from bridge.snapshot import Snapshot
from dispatcher.activities import BridgeActivities
from dispatcher.filtering import evaluate_filters
from dispatcher.runner import TaskRunnerWorkflow
from dispatcher.slots import Handover
from dispatcher.told import TellInterceptor, Told
from dispatcher.workflow import DispatcherWorkflow

# Pure modules the workflows use: passed through so they load once, not once per run.
PASSTHROUGH = (
    "bridge",
    "dispatcher.contract",
    "celpy",
    "lark",
    "jinja2",
    "markupsafe",
    "jsonschema",
    "pydantic",
    "yaml",
    "slugify",
    "httpx",
    "opentelemetry",
)


# For EVALUATE_FILTERS, the one activity that is a plain function: CPU-bound work off the event
# loop. One pool per process, whichever workers it runs.
FILTER_THREADS = ThreadPoolExecutor(max_workers=4, thread_name_prefix="filters")


def build_worker(
    client: Client,
    current: Snapshot | Callable[[], Snapshot],
    task_queue: str,
    *,
    search_attributes: bool = False,
    tracing: bool = False,
    handover: Handover | None = None,
    metrics: Metrics | None = None,
) -> Worker:
    """``search_attributes``: the namespace has dispatcher.search's attributes (see
    :func:`dispatcher.search.missing`), so target runs carry them. ``tracing``: the client has the
    OpenTelemetry interceptor, and each target starts in its event's trace. ``handover``: how
    the adapters in this process hand events over; a slow hand-over comes before starts (see
    :mod:`dispatcher.slots`); so do the shares that adapter processes tell in their signals
    (:mod:`dispatcher.told`)."""
    # The shares told in the signals of adapter processes (this one's too): the starts give way
    # to a burst handed over by an ``ingress`` elsewhere as to one handed over here.
    told = Told()
    acts = BridgeActivities(
        current, search_attributes=search_attributes, tracing=tracing, handover=handover, told=told, metrics=metrics
    )
    return Worker(
        client,
        task_queue=task_queue,
        workflows=[DispatcherWorkflow, TaskRunnerWorkflow],
        activities=[acts.load_routes, acts.load_tasks, acts.http_request, acts.start_targets, evaluate_filters],
        activity_executor=FILTER_THREADS,
        workflow_runner=SandboxedWorkflowRunner(
            restrictions=SandboxRestrictions.default.with_passthrough_modules(*PASSTHROUGH)
        ),
        max_concurrent_workflow_tasks=50,
        interceptors=[TellInterceptor(told)],
    )

"""The EVALUATE_FILTERS activity: CEL filters for a batch of the dispatcher's events.

Filters run here, not in workflow code: the result (a verdict per filter) is recorded in the history,
so a replay reads it instead of evaluating again, and a long history never makes a long replay.
It is a plain function run in the worker's thread pool, so a costly filter never blocks the
worker's event loop. Each filter and each event spend at most their budgets
(:mod:`bridge.filters`); the batch stops before an event that could take it past TASK_COST_BUDGET
units, or after TIME_LIMIT seconds, and answers for the events it got to, always at least one.
"""

from __future__ import annotations

import logging
import time
from functools import lru_cache

from temporalio import activity

from bridge.event import EventSignal
from bridge.filters import EVENT_BUDGET, Filter, scope
from bridge.logsafe import safe
from dispatcher.contract import EVALUATE_FILTERS, EVENT_COST, TASK_COST_BUDGET, FilterBatch, FilterVerdicts

log = logging.getLogger(__name__)

TIME_LIMIT = 0.3  # seconds of evaluation per batch, whatever the machine's speed


@lru_cache(maxsize=512)
def compiled(source: str) -> Filter:
    """Filters from the route table compile at load; the same source compiles the same here."""
    return Filter(source)


@activity.defn(name=EVALUATE_FILTERS)
def evaluate_filters(batch: FilterBatch) -> FilterVerdicts:
    started = time.monotonic()
    out = FilterVerdicts([])
    for raw, sources in zip(batch.events, batch.filters, strict=True):
        # Past the point where one more event could overrun the budget, or the time: answer now.
        if out.verdicts and (out.cost > TASK_COST_BUDGET - EVENT_BUDGET or time.monotonic() - started > TIME_LIMIT):
            break
        try:
            event = EventSignal.from_dict(raw)
            values = scope(event.name, event.payload, event.source, event.metadata, event.id)
            verdicts = [compiled(source).evaluate(values) for source in sources]
        except Exception as exc:  # a bug one event meets: its filters count as spent, not the batch's
            log.error("filters could not be evaluated for one event, counted as not matched: %s", safe(exc, 500))
            out.verdicts.append([None] * len(sources))
            out.cost += EVENT_BUDGET
            continue
        out.verdicts.append(verdicts)
        out.cost += EVENT_COST + values.cost
    return out

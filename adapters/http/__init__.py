"""The HTTP adapter: the events API, webhooks and the operational endpoints, as one litestar app.

- :mod:`adapters.http.events` — ``POST /api/v1/events`` (bearer token);
- :mod:`adapters.http.lookup` — ``GET /api/v1/events/{event_id}``: the runs an event started;
- :mod:`adapters.http.webhooks` — ``POST /api/v1/hooks/{slug}`` (the webhook's signature);
- :mod:`adapters.http.ops` — ``/healthz``, ``/readyz``, ``/metrics`` (a guard keeps ``/metrics``
  and ``/schema`` for bearer token holders: :func:`adapters.http.state.needs_token`);
- :mod:`adapters.http.problems` — refusals and their exception handlers, with the status
  :data:`bridge.errors.HTTP_STATUS` gives each reason;
- :mod:`adapters.http.openapi` — the OpenAPI document at ``/schema/openapi.json``.

Handlers get the pipeline and the current config snapshot injected (:mod:`adapters.http.state`);
the events API, the hot path, reads them itself (:meth:`adapters.http.state.HttpState.of`).
The API: docs/http-api.md and docs/webhooks.md.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from litestar import Litestar
from litestar.datastructures import State
from litestar.di import Provide

from adapters.http.events import EventsController
from adapters.http.lookup import LookupController
from adapters.http.openapi import openapi_config
from adapters.http.ops import OpsController
from adapters.http.problems import EXCEPTION_HANDLERS
from adapters.http.state import (
    HTTP_STATE,
    NEEDS_TOKEN,
    Consumers,
    EventLookup,
    HttpState,
    Ready,
    current_snapshot,
    needs_token,
)
from adapters.http.webhooks import WebhooksController
from bridge.pipeline import Pipeline
from bridge.snapshot import Snapshot

__all__ = ["Ready", "check_guarded", "create_app"]

log = logging.getLogger(__name__)


def create_app(
    pipeline: Pipeline,
    source: Snapshot | Callable[[], Snapshot],
    *,
    ready: Ready | None = None,
    insecure: bool = False,
    lifespan: list[Any] | None = None,
    lookup: EventLookup | None = None,
    consumers: Consumers | None = None,
    ops_only: bool = False,
) -> Litestar:
    """The HTTP adapter. ``source`` is the config snapshot, or returns the current one: a reload
    then adds, changes and removes webhooks, tokens and limits for the next request. ``ops_only``:
    ``/healthz``, ``/readyz`` and ``/metrics`` alone (a ``worker`` process's, which takes no events)."""
    current: Callable[[], Snapshot] = source if callable(source) else (lambda: source)
    http = HttpState(pipeline, current, insecure=insecure, ready=ready, lookup=lookup, consumers=consumers)
    if insecure and not current().tokens:
        log.warning("insecure mode: /metrics, /schema and the /readyz checks are served without a bearer token")
    app = Litestar(
        route_handlers=[OpsController]
        if ops_only
        else [EventsController, LookupController, WebhooksController, OpsController],
        dependencies={
            "http": Provide(http.provide, use_cache=True, sync_to_thread=False),
            "snapshot": Provide(current_snapshot, sync_to_thread=False),
        },
        state=State({HTTP_STATE: http}),
        exception_handlers=EXCEPTION_HANDLERS,
        # The body limit follows the current snapshot: see adapters.http.request.read_body.
        request_max_body_size=None,
        openapi_config=openapi_config(),
        # The process configures logging (bridge.runtime.cli); litestar's default would replace the
        # root logger's handlers and level when the app starts. Errors: problems.answer_bug.
        logging_config=None,
        lifespan=lifespan or [],
    )
    check_guarded(app)
    return app


def check_guarded(app: Litestar) -> None:
    """Every handler with the opt :data:`NEEDS_TOKEN` has the guard that checks it (it is set on
    those handlers and routers, not on the whole app: see :func:`adapters.http.state.needs_token`)."""
    for route in app.routes:
        for handler in getattr(route, "route_handlers", ()):
            if handler.opt.get(NEEDS_TOKEN) and needs_token not in handler.resolve_guards():
                raise RuntimeError(f"{route.path} needs a bearer token, but has no needs_token guard")

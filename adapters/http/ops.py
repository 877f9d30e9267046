"""The operational endpoints: ``/healthz`` (live), ``/readyz`` (Temporal reachable, worker and
consumers running) and ``/metrics`` (Prometheus).

Public: ``/healthz`` and a bare ``/readyz`` (its status only, for load balancers). The readiness
checks, ``/metrics`` and the OpenAPI document need the events API's bearer token; insecure mode
without tokens leaves them open. Why, what readiness checks and which metrics exist:
docs/operations.md.
"""

from __future__ import annotations

from typing import Any

from litestar import Controller, Request, Response, get
from litestar.di import NamedDependency
from litestar.openapi import ResponseSpec
from litestar.openapi.spec import SecurityRequirement

from adapters.http import answers
from adapters.http.answers import Health
from adapters.http.openapi import BEARER_AUTH, error_responses
from adapters.http.state import NEEDS_TOKEN, HttpState, needs_token
from bridge.adapter import ConsumerReadiness
from bridge.snapshot import Snapshot

PROMETHEUS_TEXT = "text/plain; version=0.0.4"
NOT_READY = 503
OPTIONAL_BEARER: list[SecurityRequirement] = [{}, *BEARER_AUTH]


class Readiness(answers.Readiness, total=False):
    """``kafka``, with ``checks``, when Kafka consumers run: each one's partitions and the topics
    it subscribes to that the cluster lacks. A consumer without partitions is reported, not failed."""

    kafka: list[ConsumerReadiness]


class OpsController(Controller):
    tags = ["operations"]

    @get("/healthz", summary="Liveness", operation_id="healthz")
    async def healthz(self) -> Health:
        return {"status": "ok"}

    @get(
        "/readyz",
        summary="Readiness: Temporal reachable, worker and consumers running",
        operation_id="readyz",
        security=OPTIONAL_BEARER,
        responses={NOT_READY: ResponseSpec(Readiness, description="Some check failed", generate_examples=False)},
    )
    async def readyz(
        self, request: Request[Any, Any, Any], http: NamedDependency[HttpState], snapshot: NamedDependency[Snapshot]
    ) -> Response[Readiness]:
        """200 ``ready`` or 503 ``not ready``; with the bearer token, ``checks`` says which
        check failed, and ``kafka`` what each Kafka consumer reads. Without one (or with a wrong
        one) only the status."""
        checks = await http.ready() if http.ready else {}
        ok = all(checks.values())
        body: Readiness = {"status": "ready" if ok else "not ready"}
        if http.token_name(snapshot, request.headers.get("authorization")) is not None:
            body["checks"] = checks
            if http.consumers is not None and (consumers := http.consumers()):
                body["kafka"] = consumers
        return Response(body, status_code=200 if ok else NOT_READY)

    @get(
        "/metrics",
        summary="Prometheus metrics",
        operation_id="metrics",
        media_type=PROMETHEUS_TEXT,
        security=BEARER_AUTH,
        responses=error_responses(("unauthorized",)),
        opt={NEEDS_TOKEN: True},
        guards=[needs_token],
    )
    async def metrics(self, http: NamedDependency[HttpState]) -> bytes:
        """The Prometheus text format; needs the bearer token."""
        return http.metrics.render()

"""The operational endpoints: ``/healthz`` (live), ``/readyz`` (Temporal reachable, worker and
consumers running) and ``/metrics`` (Prometheus). Public; they expose no events and no config.
What readiness checks and which metrics exist: docs/operations.md.
"""

from __future__ import annotations

from litestar import Controller, Response, get
from litestar.di import NamedDependency
from litestar.openapi import ResponseSpec

from adapters.http.answers import Health, Readiness
from adapters.http.state import HttpState

PROMETHEUS_TEXT = "text/plain; version=0.0.4"
NOT_READY = 503


class OpsController(Controller):
    tags = ["operations"]

    @get("/healthz", summary="Liveness", operation_id="healthz")
    async def healthz(self) -> Health:
        return {"status": "ok"}

    @get(
        "/readyz",
        summary="Readiness: Temporal reachable, worker and consumers running",
        operation_id="readyz",
        responses={NOT_READY: ResponseSpec(Readiness, description="Some check failed", generate_examples=False)},
    )
    async def readyz(self, http: NamedDependency[HttpState]) -> Response[Readiness]:
        checks = await http.ready() if http.ready else {}
        ok = all(checks.values())
        body: Readiness = {"status": "ready" if ok else "not ready", "checks": checks}
        return Response(body, status_code=200 if ok else NOT_READY)

    @get("/metrics", summary="Prometheus metrics", operation_id="metrics", media_type=PROMETHEUS_TEXT)
    async def metrics(self, http: NamedDependency[HttpState]) -> bytes:
        return http.metrics.render()

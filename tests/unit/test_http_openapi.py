"""The OpenAPI document against the live HTTP adapter: schemathesis generates requests from it and
checks every answer (status code, content type, headers, body schema) against it, and that no
answer is a 5xx but the 503 of a sink that says Temporal is unavailable.

The app is served by uvicorn on 127.0.0.1 with an in-memory sink, so no service is needed.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
import uvicorn
from hypothesis import HealthCheck, given, settings
from litestar.testing import TestClient
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    positive_data_acceptance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from adapters.http import create_app
from bridge.decode import INT_MAX, INT_MIN
from bridge.errors import Overloaded, Unavailable
from bridge.pipeline import Pipeline
from bridge.snapshot import Snapshot, parse
from tests.fakes import FakeSink

TOKEN = "openapi-test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
RESPONSE_CONFORMANCE = [
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]
CONFORMANCE = [*RESPONSE_CONFORMANCE, not_a_server_error]


def only_unavailable_5xx(ctx: Any, response: Any, case: Any) -> None:
    """No server error but the 503 that says Temporal (or this process) cannot take events now."""
    if response.status_code >= 500:
        assert response.status_code == 503, (case.method, case.path, response.status_code, response.text)
        assert response.json()["error"] in ("unavailable", "overloaded"), response.text
        assert int(response.headers["retry-after"][0]) >= 1


DOWN = [*RESPONSE_CONFORMANCE, only_unavailable_5xx]


def snapshot() -> Snapshot:
    """Every event name is routable and every webhook slug generated is unknown but one: a request
    the schema allows is accepted, so the generator reaches the 2xx answers too."""
    return parse(
        {
            "project": "shop",
            "http": {"max_body_bytes": 64 * 1024, "auth": {"tokens": [TOKEN]}},
            "webhooks": [{"slug": "open", "verify": {"kind": "none"}, "events": [{"name": "open.event"}]}],
            "workflows": [{"id": "all", "workflow_type": "All", "triggers": [{"name": "*"}]}],
        },
        origin="test",
    )


@contextlib.contextmanager
def serve(app: Any) -> Iterator[str]:
    """The app under uvicorn on a free port of 127.0.0.1, in a thread; its base URL."""
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)


async def look_up(event_id: str, source: str) -> list[dict[str, Any]]:
    """Events whose id starts with a digit started one run; the others, none (a 404)."""
    if not event_id[:1].isdigit():
        return []
    run = {"workflow_id": f"all-{event_id}", "run_id": "r-1", "status": "running", "start_time": "2026-01-01T00:00:00Z"}
    return [
        {**run, "workflow_entry": "all", "close_time": None, "event_id": event_id, "event_name": "e"}
        | {"source": source, "url": None}
    ]


async def look_up_down(event_id: str, source: str) -> list[dict[str, Any]]:
    raise Unavailable("Temporal is down", 30)


@pytest.fixture(scope="module")
def base_url() -> Iterator[str]:
    snap = snapshot()
    with serve(create_app(Pipeline(snap.routes, FakeSink()), snap, lookup=look_up)) as url:
        yield url


@pytest.fixture(scope="module")
def api_schema(base_url: str) -> Any:
    return schemathesis.openapi.from_url(f"{base_url}/schema/openapi.json", headers=AUTH)


@pytest.fixture(scope="module")
def down_schema() -> Iterator[Any]:
    """The app over a sink that refuses every submission as Temporal does while it is down."""
    snap, sink = snapshot(), FakeSink()
    sink.unavailable = Unavailable("Temporal is down", 30)
    with serve(create_app(Pipeline(snap.routes, sink), snap, lookup=look_up_down)) as url:
        yield schemathesis.openapi.from_url(f"{url}/schema/openapi.json", headers=AUTH)


def within_json_limits(value: Any) -> bool:
    """The JSON rules the document states in words only (integers within 64 bits; the generator
    makes nothing nested 100 deep)."""
    if isinstance(value, bool):
        return True
    if isinstance(value, int):
        return INT_MIN <= value <= INT_MAX
    if isinstance(value, dict):
        return all(within_json_limits(v) for v in value.values())
    if isinstance(value, list):
        return all(within_json_limits(v) for v in value)
    return True


def run(
    operation: Any, mode: GenerationMode, checks: list[Any], examples: int, media_type: str | None = None, **fixed: Any
) -> None:
    """Send ``examples`` generated requests to the live app and check each answer; ``fixed``
    (e.g. ``path_parameters``) is not generated."""
    cases = operation.as_strategy(generation_mode=mode, **fixed)
    if media_type is not None:
        cases = cases.filter(lambda case: case.media_type == media_type)
    if mode == POSITIVE:
        cases = cases.filter(lambda case: within_json_limits(case.body))

    @given(case=cases)
    @settings(max_examples=examples, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
    def check(case: Any) -> None:
        case.call_and_validate(headers=AUTH, checks=checks)

    check()


OPERATIONS = ["sendEvents", "lookUpEvent", "lookUpEventById", "receiveWebhook", "healthz", "readyz", "metrics"]
POSITIVE, NEGATIVE = GenerationMode.POSITIVE, GenerationMode.NEGATIVE
OPEN_HOOK = {"path_parameters": {"slug": "open"}}
CASES = [
    pytest.param("sendEvents", POSITIVE, {}, id="events"),
    pytest.param("sendEvents", NEGATIVE, {}, id="events-negative"),
    pytest.param("receiveWebhook", POSITIVE, {}, id="webhook-any-slug"),
    pytest.param("receiveWebhook", POSITIVE, OPEN_HOOK, id="webhook"),
    pytest.param("receiveWebhook", NEGATIVE, OPEN_HOOK, id="webhook-negative"),
    pytest.param("lookUpEvent", POSITIVE, {}, id="look-up"),
    pytest.param("lookUpEvent", NEGATIVE, {}, id="look-up-negative"),
    pytest.param("lookUpEventById", POSITIVE, {}, id="look-up-by-query"),
    pytest.param("lookUpEventById", NEGATIVE, {}, id="look-up-by-query-negative"),
    pytest.param("healthz", POSITIVE, {}, id="healthz"),
    pytest.param("readyz", POSITIVE, {}, id="readyz"),
    pytest.param("metrics", POSITIVE, {}, id="metrics"),
]


@pytest.mark.parametrize(("operation_id", "mode", "fixed"), CASES)
def test_every_answer_conforms_to_the_openapi_document(
    api_schema: Any, operation_id: str, mode: GenerationMode, fixed: dict[str, Any]
) -> None:
    run(api_schema.find_operation_by_id(operation_id), mode, CONFORMANCE, examples=10, **fixed)


def test_what_the_document_allows_is_accepted(api_schema: Any) -> None:
    """What the document says the events API and a webhook take, they take: 2xx, never a 4xx.

    Bodies with an integer beyond 64 bits are left out: the document says so in words only. A
    form-encoded delivery is left out: its ``payload`` field must hold JSON, which the document
    says in words only (``contentMediaType``), so a generator makes any string of it."""
    checks = [*CONFORMANCE, positive_data_acceptance]
    run(api_schema.find_operation_by_id("sendEvents"), POSITIVE, checks, examples=25)
    hook = api_schema.find_operation_by_id("receiveWebhook")
    run(hook, POSITIVE, checks, examples=10, media_type="application/json", **OPEN_HOOK)


@pytest.mark.parametrize(("operation_id", "mode", "fixed"), CASES)
def test_no_server_error_but_503_while_temporal_is_down(
    down_schema: Any, operation_id: str, mode: GenerationMode, fixed: dict[str, Any]
) -> None:
    run(down_schema.find_operation_by_id(operation_id), mode, DOWN, examples=10, **fixed)


def test_the_document_lists_every_operation(api_schema: Any) -> None:
    assert sorted(op.ok().definition.raw["operationId"] for op in api_schema.get_all_operations()) == sorted(OPERATIONS)


def test_the_document_describes_bodies_errors_and_auth() -> None:
    snap = snapshot()
    with TestClient(create_app(Pipeline(snap.routes, FakeSink()), snap)) as client:
        doc = client.get("/schema/openapi.json", headers=AUTH).json()
    send, receive = doc["paths"]["/api/v1/events"]["post"], doc["paths"]["/api/v1/hooks/{slug}"]["post"]
    bodies = send["requestBody"]["content"]
    assert set(bodies) == {"application/json", "application/cloudevents+json", "application/cloudevents-batch+json"}
    assert [s["title"] for s in bodies["application/json"]["schema"]["oneOf"]] == ["Envelope", "EnvelopeBatch"]
    assert bodies["application/cloudevents+json"]["schema"]["title"] == "CloudEvent"
    assert bodies["application/cloudevents-batch+json"]["schema"]["items"]["title"] == "CloudEvent"
    assert set(receive["requestBody"]["content"]) == {"application/json", "application/x-www-form-urlencoded"}
    bearer = doc["components"]["securitySchemes"]["bearer"]
    assert (bearer["type"], bearer["scheme"]) == ("http", "bearer")
    assert send["security"] == [{"bearer": []}]
    assert receive["security"] == []  # a webhook is authenticated by its signature
    ops = {path: doc["paths"][path]["get"] for path in ("/healthz", "/readyz", "/metrics")}
    assert ops["/healthz"].get("security", []) == []
    assert ops["/readyz"]["security"] == [{}, {"bearer": []}]  # the checks only with the token
    assert ops["/metrics"]["security"] == [{"bearer": []}]
    assert "ErrorBody" in json.dumps(ops["/metrics"]["responses"]["401"])
    assert "checks" not in doc["components"]["schemas"]["Readiness"].get("required", [])
    for status, reasons in (("413", ("too_large", "batch_too_large")), ("503", ("unavailable", "overloaded"))):
        for reason in reasons:
            assert reason in send["responses"][status]["description"], (status, reason)
    assert "overloaded" in receive["responses"]["503"]["description"]
    for operation in (send, receive):
        for status, response in operation["responses"].items():
            refs = json.dumps(response["content"]["application/json"]["schema"])
            assert ("ErrorBody" in refs) == (status >= "400"), status
        for status in ("429", "503"):
            assert operation["responses"][status]["headers"]["Retry-After"]["required"] is True


# --- every refusal, on purpose: each status the document lists, checked against it ----------

STRICT_TOKENS = [f"strict-token-{i}" for i in range(12)]
GH_SECRET = "a-github-secret-long-enough"


def strict_snapshot() -> Snapshot:
    """Small limits, a token budget of one request, webhooks for each answer."""
    none: dict[str, Any] = {"kind": "none"}
    return parse(
        {
            "project": "shop",
            "http": {
                "max_body_bytes": 1024,
                "auth": {"tokens": [{"name": f"t{i}", "token": t} for i, t in enumerate(STRICT_TOKENS)]},
                "rate_limit": {"per_token": {"rate": 0.001, "burst": 1}},
            },
            "webhooks": [
                {"slug": "open", "verify": none, "events": [{"name": "open.event"}]},
                {"slug": "signed", "verify": {"kind": "github", "secret": GH_SECRET}, "events": [{"name": "open.x"}]},
                {"slug": "limited", "verify": none, "events": [{"name": "open.y"}], "rate_limit": {"rate": 0.001}},
                {"slug": "typo", "verify": none, "events": [{"name": "nobody.listens"}]},
                {"slug": "picky", "verify": none, "events": [{"name": "open.z", "filter": "payload.never == 1"}]},
                {"slug": "broken", "verify": none, "events": [{"name": "open.i", "input": "{{ .payload.a / 0 }}"}]},
            ],
            "workflows": [
                {
                    "id": "orders",
                    "workflow_type": "Orders",
                    "triggers": [{"name": "order.created", "schema": {"type": "object", "required": ["orderId"]}}],
                },
                {"id": "open", "workflow_type": "Open", "triggers": [{"name": "open.*"}]},
            ],
        },
        origin="test",
    )


@pytest.fixture(scope="module")
def strict() -> Iterator[tuple[Any, FakeSink]]:
    snap, sink = strict_snapshot(), FakeSink()

    async def not_ready() -> dict[str, bool]:
        return {"temporal": False, "worker": True}

    with serve(create_app(Pipeline(snap.routes, sink), snap, ready=not_ready)) as url:
        yield schemathesis.openapi.from_url(f"{url}/schema/openapi.json", headers=bearer(11)), sink


def bearer(i: int) -> dict[str, str]:
    return {"Authorization": f"Bearer {STRICT_TOKENS[i]}"}


ORDER = {"name": "order.created", "payload": {"orderId": "A1"}}
EVENTS = [  # (id, token, body, expected status); each token is used once, but for the rate limit
    ("unauthorized", None, ORDER, [401]),
    ("malformed", 0, [1], [400]),
    ("no_name", 1, {"payload": {}}, [400]),
    ("too_large", 2, {"name": "order.created", "payload": {"orderId": "x" * 1024}}, [413]),
    ("schema_invalid", 3, {"name": "order.created", "payload": {}}, [422]),
    ("unroutable", 4, {"name": "nobody.listens"}, [422]),
    ("partial", 5, [ORDER, {"name": "nobody.listens"}], [207]),
    ("accepted", 6, ORDER, [202]),
    ("batch", 7, [ORDER], [202]),
    ("rate_limited", 8, ORDER, [202, 429]),
]
HOOKS = [  # (slug, body, expected status)
    ("nowhere", {}, 404),
    ("signed", {}, 401),
    ("open", {"pad": "x" * 1024}, 413),
    ("typo", {}, 422),
    ("broken", {"a": 1}, 422),
    ("picky", {}, 200),
    ("open", {}, 202),
]


@pytest.mark.parametrize(("token", "body", "statuses"), [e[1:] for e in EVENTS], ids=[e[0] for e in EVENTS])
def test_each_refusal_of_the_events_api_conforms(
    strict: tuple[Any, FakeSink], token: int | None, body: Any, statuses: list[int]
) -> None:
    operation = strict[0].find_operation_by_id("sendEvents")
    headers = {} if token is None else bearer(token)
    for status in statuses:
        case = operation.Case(body=body, media_type="application/json", headers=headers)
        assert case.call_and_validate(checks=CONFORMANCE).status_code == status


@pytest.mark.parametrize(("slug", "body", "status"), HOOKS, ids=[f"{h[0]}-{h[2]}" for h in HOOKS])
def test_each_answer_of_a_webhook_conforms(strict: tuple[Any, FakeSink], slug: str, body: Any, status: int) -> None:
    operation = strict[0].find_operation_by_id("receiveWebhook")
    case = operation.Case(path_parameters={"slug": slug}, body=body, media_type="application/json")
    assert case.call_and_validate(checks=CONFORMANCE).status_code == status


def test_a_rate_limited_webhook_conforms(strict: tuple[Any, FakeSink]) -> None:
    hook = strict[0].find_operation_by_id("receiveWebhook")
    cases = [
        hook.Case(path_parameters={"slug": "limited"}, body={"n": n}, media_type="application/json") for n in (1, 2)
    ]
    assert [case.call_and_validate(checks=CONFORMANCE).status_code for case in cases] == [202, 429]


def test_unavailable_conforms(strict: tuple[Any, FakeSink]) -> None:
    """503 is what the adapter answers while Temporal is down: no server error, but documented."""
    schema, sink = strict
    send = schema.find_operation_by_id("sendEvents").Case(body=ORDER, media_type="application/json", headers=bearer(9))
    hook = schema.find_operation_by_id("receiveWebhook")
    # a delivery not accepted before (a repeat of one is answered as it was, without Temporal)
    deliver = hook.Case(path_parameters={"slug": "open"}, body={"while": "down"}, media_type="application/json")
    sink.unavailable = Unavailable("Temporal is down", 3)
    try:
        assert send.call_and_validate(checks=RESPONSE_CONFORMANCE).status_code == 503
        assert deliver.call_and_validate(checks=RESPONSE_CONFORMANCE).status_code == 503
    finally:
        sink.unavailable = None


def test_overloaded_conforms(strict: tuple[Any, FakeSink]) -> None:
    """503 ``overloaded`` (too many events wait for Temporal in this process) is documented like
    ``unavailable``, Retry-After included."""
    schema, sink = strict
    send = schema.find_operation_by_id("sendEvents").Case(body=ORDER, media_type="application/json", headers=bearer(10))
    sink.unavailable = Overloaded("10000 events already wait for Temporal in this process", 3)
    try:
        response = send.call_and_validate(checks=RESPONSE_CONFORMANCE)
    finally:
        sink.unavailable = None
    assert (response.status_code, response.json()["error"]) == (503, "overloaded")


@pytest.mark.parametrize("headers", [{}, bearer(11)], ids=["bare", "with-token"])
def test_not_ready_conforms(strict: tuple[Any, FakeSink], headers: dict[str, str]) -> None:
    case = strict[0].find_operation_by_id("readyz").Case(headers=headers)
    response = case.call_and_validate(checks=RESPONSE_CONFORMANCE)
    assert response.status_code == 503
    assert ("checks" in response.json()) == bool(headers)


def test_metrics_without_a_token_conforms(strict: tuple[Any, FakeSink]) -> None:
    case = strict[0].find_operation_by_id("metrics").Case()
    assert case.call_and_validate(checks=CONFORMANCE).status_code == 401

"""One table from reason code to HTTP status (bridge.errors.HTTP_STATUS), and it covers every
reason the code can produce."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from litestar import Litestar, post
from litestar.testing import AsyncTestClient, TestClient

from adapters.http import create_app, events, webhooks
from adapters.http.problems import EXCEPTION_HANDLERS
from bridge.errors import HTTP_STATUS, REASONS, EventRejected, Overloaded, Unavailable
from bridge.pipeline import Pipeline
from bridge.snapshot import parse
from tests.fakes import FakeSink

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("bridge", "adapters", "dispatcher")
# Calls whose argument at this position (or keyword ``reason``) is a reason code.
REASON_ARG = {"EventRejected": 0, "Problem": 0, "deny": 1}


def test_the_table_has_every_reason_and_nothing_else() -> None:
    assert set(HTTP_STATUS) == set(REASONS)
    assert len(REASONS) == len(set(REASONS))
    assert all(400 <= status <= 599 for status in HTTP_STATUS.values())


def _called(node: ast.Call) -> str | None:
    func = node.func
    return func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else None


def _reason_arg(node: ast.Call) -> ast.expr | None:
    name = _called(node)
    if name in REASON_ARG and len(node.args) > REASON_ARG[name]:
        return node.args[REASON_ARG[name]]
    if name in REASON_ARG:
        return next((k.value for k in node.keywords if k.arg == "reason"), None)
    # metrics.rejected.labels(adapter, reason)
    func = node.func
    if (
        name == "labels"
        and isinstance(func, ast.Attribute)
        and isinstance(func.value, ast.Attribute)
        and func.value.attr == "rejected"
        and len(node.args) == 2
    ):
        return node.args[1]
    return None


def written_reasons() -> Iterator[tuple[str, int, str]]:
    """Every reason code written out as a literal in the source, with where. A reason passed on in
    a variable (``exc.reason``) is typed ``bridge.errors.Reason``, which mypy holds to the table."""
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
                if not isinstance(node, ast.Call):
                    continue
                arg = _reason_arg(node)
                if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                    yield str(path.relative_to(ROOT)), node.lineno, arg.value


def test_every_reason_the_code_produces_has_a_status() -> None:
    found = list(written_reasons())
    assert [(where, line, reason) for where, line, reason in found if reason not in HTTP_STATUS] == []
    # The scan does see the code: every kind of call is found somewhere.
    assert {reason for _, _, reason in found} >= {
        "malformed",
        "no_name",
        "schema_invalid",
        "unroutable",
        "input_failed",
        "too_large",
        "batch_too_large",
        "unauthorized",
        "not_found",
        "rate_limited",
    }


def test_the_http_adapter_declares_every_reason_it_answers_with() -> None:
    assert set(events.REASONS) | set(webhooks.REASONS) == set(REASONS)
    assert Unavailable("down").reason in events.REASONS
    assert Overloaded("full").reason in events.REASONS


@pytest.mark.parametrize("reason", REASONS)
async def test_a_rejection_is_answered_with_the_tables_status(reason: Any) -> None:
    """Whatever raises EventRejected inside a handler is answered by the one exception handler."""

    @post("/boom")
    async def boom() -> None:
        raise EventRejected(reason, "because", event_id="e-1")

    app = Litestar([boom], exception_handlers=EXCEPTION_HANDLERS)
    async with AsyncTestClient(app) as client:
        resp = await client.post("/boom")
    assert resp.status_code == HTTP_STATUS[reason]
    assert resp.json() == {"error": reason, "message": "because", "event_id": "e-1"}


def test_the_openapi_document_lists_each_reasons_status() -> None:
    snap = parse({"project": "shop", "http": {"auth": {"tokens": ["a-token"]}}}, origin="test")
    with TestClient(create_app(Pipeline(snap.routes, FakeSink()), snap)) as client:
        paths = client.get("/schema/openapi.json", headers={"Authorization": "Bearer a-token"}).json()["paths"]
    for path, module in (("/api/v1/events", events), ("/api/v1/hooks/{slug}", webhooks)):
        responses = paths[path]["post"]["responses"]
        for reason in module.REASONS:
            described = responses[str(HTTP_STATUS[reason])]
            assert reason in described["description"], (path, reason)
        # Overloaded is an Unavailable: whoever may answer one may answer the other.
        assert "overloaded" in responses[str(HTTP_STATUS["overloaded"])]["description"], path

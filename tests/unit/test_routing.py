"""Routing: trigger matching, fan-out order, filters, schemas, and the dispatcher's spec."""

from __future__ import annotations

import json
from typing import Any

import pytest

from bridge.config import BridgeConfig, parse_config
from bridge.errors import ConfigError, EventRejected
from bridge.event import EventSignal
from bridge.routing import RouteTable, name_matches


def table(*workflows: dict[str, Any], project: str = "shop") -> RouteTable:
    return RouteTable.from_config(cfg(*workflows, project=project))


def cfg(*workflows: dict[str, Any], project: str = "shop") -> BridgeConfig:
    return parse_config({"project": project, "workflows": list(workflows)}, origin="test")


def wf(wid: str, *triggers: str | dict[str, Any], **fields: Any) -> dict[str, Any]:
    trigs = [{"name": t} if isinstance(t, str) else t for t in triggers]
    return {"id": wid, "workflow_type": "Target", "triggers": trigs, **fields}


def event(name: str = "order.created", payload: dict[str, Any] | None = None, **kw: Any) -> EventSignal:
    kw.setdefault("source", "http")
    return EventSignal(id=kw.pop("id", "e-1"), name=name, payload=payload or {}, **kw)


def ids(routes: RouteTable, ev: EventSignal) -> list[str]:
    return [t.workflow_id for t in routes.resolve(ev)]


@pytest.mark.parametrize(
    ("pattern", "name", "expected"),
    [
        ("order.created", "order.created", True),
        ("order.created", "order.paid", False),
        ("order.created", "order.created.v2", False),
        ("order.*", "order.created", True),
        ("order.*", "order.line.added", True),
        ("order.*", "orders.created", False),
        ("order.*", "order", False),
        ("*", "anything.at.all", True),
    ],
)
def test_name_matching(pattern: str, name: str, expected: bool) -> None:
    assert name_matches(pattern, name) is expected


def test_fan_out_to_every_match_in_config_order() -> None:
    routes = table(
        wf("zeta", "order.*"),
        wf("alpha", "order.created"),
        wf("other", "user.created"),
        wf("mid", "*"),
    )
    assert ids(routes, event("order.created")) == ["zeta", "alpha", "mid"]
    assert ids(routes, event("user.created")) == ["other", "mid"]


def test_one_target_per_workflow_when_two_triggers_match() -> None:
    routes = table(wf("audit", "order.*", "order.created", "*"))
    assert ids(routes, event("order.created")) == ["audit"]


def test_second_trigger_still_matches_when_first_filter_does_not() -> None:
    routes = table(wf("w", {"name": "order.created", "filter": "payload.amount > 100"}, "order.*"))
    assert ids(routes, event(payload={"amount": 5})) == ["w"]


def test_filter_match_and_no_match() -> None:
    routes = table(wf("big", {"name": "order.created", "filter": "payload.amount > 100"}))
    assert ids(routes, event(payload={"amount": 150})) == ["big"]
    assert ids(routes, event(payload={"amount": 50})) == []


def test_filter_on_missing_field_is_no_match_not_error() -> None:
    routes = table(
        wf("big", {"name": "order.created", "filter": "payload.amount > 100"}),
        wf("all", "order.created"),
    )
    assert ids(routes, event(payload={})) == ["all"]


def test_filter_sees_source_metadata_and_name() -> None:
    expr = 'source == "kafka:orders" && metadata.tenant == "acme" && name.startsWith("order.")'
    routes = table(wf("w", {"name": "order.*", "filter": expr}))
    assert ids(routes, event(source="kafka:orders", metadata={"tenant": "acme"})) == ["w"]
    assert ids(routes, event(source="http", metadata={"tenant": "acme"})) == []


SCHEMA = {"type": "object", "required": ["orderId"], "properties": {"orderId": {"type": "string"}}}


def test_schema_violation_names_workflow_and_schema_path() -> None:
    routes = table(wf("free", "order.*"), wf("strict", {"name": "order.created", "schema": SCHEMA}))
    with pytest.raises(EventRejected) as exc:
        routes.check(event(payload={"orderId": 7}))
    rej = exc.value
    assert rej.reason == "schema_invalid"
    assert rej.details["workflow"] == "strict"
    assert rej.details["schema_path"] == "properties/orderId/type"
    assert rej.details["payload_path"] == "orderId"
    assert "'strict'" in rej.message


def test_schema_accepts_valid_payload() -> None:
    routes = table(wf("strict", {"name": "order.created", "schema": SCHEMA}))
    routes.check(event(payload={"orderId": "A1"}))


def test_schema_of_unmatched_trigger_is_not_applied() -> None:
    routes = table(wf("strict", {"name": "order.paid", "schema": SCHEMA}), wf("free", "order.created"))
    routes.check(event("order.created", payload={}))


def test_unknown_name_is_unroutable() -> None:
    routes = table(wf("w", "order.created"))
    with pytest.raises(EventRejected) as exc:
        routes.check(event("order.cretaed"))
    assert exc.value.reason == "unroutable"
    assert exc.value.details["name"] == "order.cretaed"
    assert routes.resolve(event("order.cretaed")) == []
    assert not routes.is_routable("order.cretaed")
    assert routes.is_routable("order.created")


def test_spec_round_trip_resolves_the_same_targets() -> None:
    routes = table(
        wf("big", {"name": "order.created", "filter": "payload.amount > 100"}, input={"o": "{{ .trigger.id }}"}),
        wf("audit", "order.*", task_queue="audit-q"),
        {"id": "runner", "triggers": [{"name": "*"}], "tasks": [{"id": "t", "config": {"template": "x"}}]},
    )
    spec = json.loads(json.dumps(routes.spec()))  # it crosses an activity boundary as JSON
    again = RouteTable.from_spec(spec)
    for ev in (
        event(payload={"amount": 500}),
        event(payload={"amount": 5}),
        event("order.paid"),
        event("user.created"),
    ):
        assert again.resolve(ev) == routes.resolve(ev)
    assert [t.workflow_id for t in again.resolve(event(payload={"amount": 500}))] == ["big", "audit", "runner"]


def test_defaults_task_queue_and_workflow_type() -> None:
    routes = table(
        wf("own", "a"),
        wf("queued", "a", task_queue="elsewhere"),
        {"id": "builtin", "triggers": [{"name": "a"}], "tasks": [{"id": "t", "config": {"template": "x"}}]},
        project="My Shop",
    )
    targets = {t.workflow_id: t for t in routes.resolve(event("a"))}
    assert targets["own"].task_queue == "my-shop"
    assert targets["own"].workflow_type == "Target"
    assert targets["queued"].task_queue == "elsewhere"
    assert targets["builtin"].workflow_type is None  # the dispatcher starts its task runner
    assert targets["builtin"].task_queue == "my-shop"


def test_target_carries_the_input_template() -> None:
    routes = table(wf("w", "a", input={"order": "{{ .trigger.orderId }}"}))
    [target] = routes.resolve(event("a"))
    assert target.input == {"order": "{{ .trigger.orderId }}"}


def test_names_lists_patterns_in_file_order() -> None:
    routes = table(wf("a", "order.created"), wf("b", "order.*", "order.created"))
    assert routes.names() == {"order.created": ["a", "b"], "order.*": ["b"]}


# --- schema regular expressions run on RE2 -----------------------------------------------------


def _schema_table(schema: dict[str, Any]) -> RouteTable:
    return table(wf("w", {"name": "t", "schema": schema}))


def test_a_backtracking_pattern_is_checked_in_linear_time() -> None:
    """`(a+)+$` against 'aaaa…b' backtracks exponentially in Python's re; RE2 answers at once."""
    table = _schema_table({"type": "object", "properties": {"s": {"type": "string", "pattern": "^(a+)+$"}}})
    with pytest.raises(EventRejected) as exc:
        table.check(EventSignal(id="1", name="t", payload={"s": "a" * 5000 + "b"}, source="s"))
    assert exc.value.reason == "schema_invalid"
    table.check(EventSignal(id="2", name="t", payload={"s": "a" * 5000}, source="s"))


def test_pattern_properties_run_on_re2_too() -> None:
    schema = {"type": "object", "patternProperties": {"^x-": {"type": "integer"}}}
    table = _schema_table(schema)
    table.check(EventSignal(id="1", name="t", payload={"x-a": 1, "y": "free"}, source="s"))
    with pytest.raises(EventRejected):
        table.check(EventSignal(id="2", name="t", payload={"x-a": "not an int"}, source="s"))


@pytest.mark.parametrize("pattern", ["^(?=a)a$", "^(a)\\1$"], ids=["look-ahead", "backreference"])
def test_a_pattern_re2_cannot_run_is_refused_at_load(pattern: str) -> None:
    with pytest.raises(ConfigError, match=r"workflow 'w', trigger 't': schema pattern .* is not RE2 syntax"):
        _schema_table({"type": "string", "pattern": pattern})

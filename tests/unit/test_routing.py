"""Routing: trigger matching, fan-out order, filters, schemas, and the dispatcher's spec."""

from __future__ import annotations

import json
from typing import Any
from unittest import mock

import pytest

from bridge import schemas
from bridge.config import BridgeConfig, parse_config
from bridge.errors import ConfigError, EventRejected
from bridge.event import EventSignal, encode, run_digest
from bridge.filters import EVENT_BUDGET, FILTER_BUDGET, Filter, activation
from bridge.routing import ROUTES_LIMIT_BYTES, RouteTable, name_matches
from bridge.schemas import MAX_VISITS


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


def test_routes_over_what_a_dispatcher_run_records_are_refused_at_load() -> None:
    """The spec is what LOAD_ROUTES answers and every run records: past the limit the config is
    refused with its size, before any dispatcher could fail on it."""
    small = table(wf("w", "t", input={"blob": "x" * 1000}))
    room = ROUTES_LIMIT_BYTES - len(encode(small.spec())) + 1000
    fits = table(wf("w", "t", input={"blob": "x" * room}))
    assert len(encode(fits.spec())) == ROUTES_LIMIT_BYTES
    with pytest.raises(ConfigError, match=rf"weigh {ROUTES_LIMIT_BYTES + 1} bytes as JSON, over the limit"):
        table(wf("w", "t", input={"blob": "x" * (room + 1)}))
    # Two workflows that each fit count together, filters included.
    half = "x" * (ROUTES_LIMIT_BYTES // 2)
    with pytest.raises(ConfigError, match=r"^config: the routes the dispatcher loads"):
        table(wf("a", {"name": "t", "filter": f'payload.k == "{half}"'}), wf("b", "t", input={"blob": half}))


@pytest.mark.parametrize("pattern", ["^(?=a)a$", "^(a)\\1$"], ids=["look-ahead", "backreference"])
def test_a_pattern_re2_cannot_run_is_refused_at_load(pattern: str) -> None:
    with pytest.raises(ConfigError, match=r"workflow 'w', trigger 't': schema pattern .* is not RE2 syntax"):
        _schema_table({"type": "string", "pattern": pattern})


# --- filters run within a budget ---------------------------------------------------------------


@pytest.mark.parametrize("macro", ["exists", "all"])
def test_a_macro_over_elements_that_each_fail_folds_their_errors_in_linear_work(macro: str) -> None:
    """celpy joined two errors into one message quoting both: over elements that each fail (the
    field missing), the message doubled with each element. 26 empty objects took 5 s and 1.6 GB in
    one call no budget stopped; 27 were killed for memory. Each element's error is one now."""
    f = Filter(f'payload.items.{macro}(i, i.sku == "x")')
    found = f.evaluate(activation("n", {"items": [{}] * 60}, "s", {}, "1"))
    assert found is False  # an error: no match, and no budget spent on it
    assert f.evaluate(activation("n", {"items": [{}, {"sku": "x"}]}, "s", {}, "1")) is (macro == "exists")
    assert Filter("payload.a || payload.b").evaluate(activation("n", {"b": True}, "s", {}, "1")) is True
    assert Filter("payload.a && payload.b").evaluate(activation("n", {"b": False}, "s", {}, "1")) is False


def test_multiple_of_a_decimal_step_takes_the_amounts_json_wrote() -> None:
    """jsonschema divides floats: 0.07 / 0.01 is 7.000000000000001, and 0.07, 0.29 or 19.99 were
    refused as no multiple of 0.01 (schema_invalid: a 422, a dead letter)."""
    schema = {"type": "object", "properties": {"amount": {"multipleOf": 0.01}}}
    routes = table(wf("w", {"name": "t", "schema": schema}))
    for amount in (0.07, 0.29, 19.99, 10**19):
        routes.check(EventSignal(id="1", name="t", payload={"amount": amount}, source="s"))
    with pytest.raises(EventRejected, match=r"not a multiple of 0\.01"):
        routes.check(EventSignal(id="1", name="t", payload={"amount": 1.155}, source="s"))


@pytest.mark.parametrize(
    ("at", "holds"),
    [("2025-05-01T10:00:00Z", True), ("2025-05-01T12:00:00.5+02:00", True), ("12:30", False), ("2025-05-01", False)],
)
def test_timestamp_takes_rfc3339_date_times_only(at: str, holds: bool) -> None:
    """celpy filled a time alone with today's date in the host's zone: the same filter on the same
    event answered otherwise from one host, or one day, to the next."""
    f = Filter('timestamp(payload.at) > timestamp("2024-01-01T00:00:00Z")')
    assert f.evaluate(activation("n", {"at": at}, "s", {}, "1")) is holds


def test_paths_of_one_length_are_read_in_the_same_order_in_every_process() -> None:
    """Read in a set's order (hash-seeded), the same filters on the same event spent their budget
    differently from one process to the next, and a later filter's verdict changed with it."""
    from bridge.filters import _trie

    paths = [("payload", "b"), ("payload", "a"), ("payload", "c")]
    assert list(_trie(paths)["payload"] or {}) == ["a", "b", "c"]
    assert list(_trie(reversed(paths))["payload"] or {}) == ["a", "b", "c"]


LIST = list(range(100_000))  # about 590 KB of JSON: far more than one event's budget to walk


def test_a_filter_converts_only_what_it_reads() -> None:
    """`payload.amount` on an event that also holds a 100,000-item list costs a few dozen units."""
    routes = table(wf("big", {"name": "order.created", "filter": "payload.amount > 100"}))
    routing = routes.route(event(payload={"amount": 150, "items": LIST}))
    assert [t.workflow_id for t in routing.targets] == ["big"]
    assert routing.limited == [] and 0 < routing.cost < 100


@pytest.mark.parametrize(
    ("expr", "holds"),
    [
        ("payload.items.exists(i, i == 7)", True),  # a macro over the list
        ("size(payload) > 0", True),  # the whole payload
        ("-1 in payload.items", False),  # an operator whose work grows with its operand
    ],
)
def test_a_filter_that_needs_more_data_than_its_budget_runs_out_at_once(expr: str, holds: bool) -> None:
    """Converting 100,000 items would spend ten budgets: the nodes are counted, not converted."""
    routes = table(wf("costly", {"name": "order.created", "filter": expr}), wf("plain", "order.created"))
    routing = routes.route(event(payload={"items": LIST[8:]}))
    assert ([t.workflow_id for t in routing.targets], routing.limited) == (["plain"], ["costly"])
    assert 0 < routing.cost < FILTER_BUDGET // 2
    assert routes.route(event(payload={"items": LIST[8:]})).cost == routing.cost  # the same units each time
    small = routes.route(event(payload={"items": LIST[:100]}))  # the same filter on a small list
    assert ([t.workflow_id for t in small.targets], small.limited) == (["costly", "plain"] if holds else ["plain"], [])


@pytest.mark.parametrize(
    "expr",
    [
        "payload.items.exists(i, i == 7)",
        "payload.items.map(i, i * 2).size() > 0",
        "payload.items.exists(i, payload.items.exists(j, i + j == -1))",
    ],
)
def test_a_filter_whose_evaluation_runs_past_its_budget_does_not_match(expr: str) -> None:
    """3,000 items convert within the budget; evaluating over them does not finish within it."""
    routes = table(wf("costly", {"name": "order.created", "filter": expr}), wf("plain", "order.created"))
    routing = routes.route(event(payload={"items": LIST[8:3008]}))
    assert ([t.workflow_id for t in routing.targets], routing.limited) == (["plain"], ["costly"])
    assert routing.cost == FILTER_BUDGET


def test_each_filter_has_a_budget_and_the_event_one_for_all() -> None:
    """A costly filter does not starve a cheap one after it, until the event's budget is spent."""
    costly = "payload.items.exists(i, i == -1)"
    routes = table(
        wf("costly", {"name": "order.created", "filter": costly}),
        wf("cheap", {"name": "order.created", "filter": "payload.amount > 1"}),
        wf("second-trigger", {"name": "order.created", "filter": costly + " || false"}, "order.*"),
        wf("late-cheap", {"name": "order.created", "filter": "payload.amount > 1"}),
    )
    routing = routes.route(event(payload={"items": LIST[:3000], "amount": 5}))
    assert [t.workflow_id for t in routing.targets] == ["cheap", "second-trigger"]
    assert routing.limited == ["costly", "late-cheap"]  # one another trigger started is not
    assert routing.cost == EVENT_BUDGET
    small = routes.route(event(payload={"items": [1], "amount": 5}))
    assert [t.workflow_id for t in small.targets] == ["cheap", "second-trigger", "late-cheap"]


@pytest.mark.parametrize(
    ("expr", "paths"),
    [
        ("payload.a.b > 1 && has(payload.c)", {("payload", "a", "b"), ("payload", "c")}),
        ('payload["x-y"].z == 1', {("payload", "x-y", "z")}),
        ("payload.items[0] == 1", {("payload", "items")}),
        ("size(payload) > 0", {("payload",)}),
        (
            'metadata.headers["x-github-event"] == "push" && name == "a"',
            {("metadata", "headers", "x-github-event"), ("name",)},
        ),
        ("payload.items.exists(payload, payload > 1)", {("payload", "items"), ("payload",)}),
        ('payload["a\\"b"] == 1', {("payload",)}),
    ],
)
def test_a_filter_knows_the_paths_it_reads(expr: str, paths: set[tuple[str, ...]]) -> None:
    assert Filter(expr).needs == paths


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        ({"n": 2**63 - 1}, ["int", "any"]),
        ({"n": 2**63}, ["int", "uint", "any"]),  # the decoders take unsigned 64-bit integers: CEL's uint
        ({"n": 2**64}, ["any"]),  # beyond (only a direct signal can carry it): no match, no error
        ({"n": 2**64, "m": 1}, ["m", "any"]),  # a path the filter does not read is not converted
    ],
)
def test_integers_cel_cannot_hold_do_not_match(payload: dict[str, Any], expected: list[str]) -> None:
    routes = table(
        wf("int", {"name": "a", "filter": "payload.n > 1"}),
        wf("uint", {"name": "a", "filter": "payload.n > 1u"}),
        wf("m", {"name": "a", "filter": "payload.m == 1"}),
        wf("any", "a"),
    )
    assert ids(routes, event("a", payload=payload)) == expected


def test_string_repetition_is_refused() -> None:
    routes = table(wf("w", {"name": "a", "filter": "size(payload.s * 9223372036854775807) > 0"}))
    assert ids(routes, event("a", payload={"s": "x"})) == []


def test_activation_still_refuses_integers_beyond_int64_for_adapters_that_want_to_say_so() -> None:
    with pytest.raises(ValueError, match="64 bits"):
        activation("a", {"deep": [{"n": 2**63}]}, "s", {}, "i")
    assert Filter("payload.deep[0].n > 1").matches(activation("a", {"deep": [{"n": 1}, 2]}, "s", {}, "i")) is False


# -- signal: entries that deliver events to open runs ---------------------------------------------

PAYMENTS = wf(
    "order-payments",
    "payment.completed",
    signal={"name": "payment", "workflow_id": "order-{{ .trigger.orderId }}"},
)


def test_a_signal_entry_targets_the_run_its_template_names() -> None:
    routes = table(PAYMENTS)
    [target] = routes.resolve(event("payment.completed", {"orderId": "o-7"}))
    assert target.signal is not None and target.signal.name == "payment" and target.signal.if_missing == "skip"
    assert target.signal.render_id(event("payment.completed", {"orderId": "o-7"})) == "order-o-7"


def test_the_spec_carries_the_signal_to_the_dispatcher() -> None:
    routes = RouteTable.from_spec(json.loads(json.dumps(table(PAYMENTS).spec())))
    [target] = routes.resolve(event("payment.completed", {"orderId": 1}))
    assert (
        target.signal is not None and target.signal.render_id(event("payment.completed", {"orderId": 1})) == "order-1"
    )


@pytest.mark.parametrize(
    ("template", "payload", "why"),
    [
        ("{{ .trigger.orderId }}", {}, "renders empty"),
        ("{{ .trigger.orderId }}", {"orderId": "   "}, "renders empty"),
        ("order-{{ .trigger.orderId }}", {"orderId": "x" * 1000}, "Temporal allows 1000"),
    ],
)
def test_a_run_id_that_renders_empty_or_too_long_is_refused_at_the_adapter(
    template: str, payload: dict[str, Any], why: str
) -> None:
    routes = table(wf("pay", "payment.completed", signal={"name": "payment", "workflow_id": template}))
    with pytest.raises(EventRejected) as caught:
        routes.check(event("payment.completed", payload))
    assert caught.value.reason == "target_invalid" and caught.value.status == 422
    assert why in caught.value.message and caught.value.details["workflow"] == "pay"


SQUAT = "{{ .trigger.runId }}"


def test_a_refused_run_id_is_not_quoted_back_to_the_sender() -> None:
    """The refusal quoted the rendered id, and with it the template's own text (which may hold a
    ``${VAR}`` value) to whoever sent the event, and into its dead letter."""
    signal = {"name": "payment", "workflow_id": "{{ .trigger.t }}-s3cr3t-suffix", "if_missing": "skip"}
    routes = table(wf("pay", "payment.completed", signal=signal))
    with pytest.raises(EventRejected) as caught:
        routes.check(event("payment.completed", {"t": "dispatcher"}))
    assert caught.value.reason == "target_invalid" and "dispatcher" in caught.value.message
    assert "s3cr3t" not in caught.value.message and "s3cr3t" not in json.dumps(caught.value.as_dict())


def squat_table(if_missing: str) -> RouteTable:
    signal = {"name": "payment", "workflow_id": SQUAT, "if_missing": if_missing}
    return table(wf("pay", "payment.completed", signal=signal), wf("process-order", "order.created"))


@pytest.mark.parametrize(
    ("run", "if_missing"),
    [
        ("dispatcher-shop", "skip"),
        ("dispatcher-other-project-3", "start"),
        (f"process-order-{run_digest('shop', 'kafka:orders', 'order-123')}", "start"),
    ],
)
def test_a_run_id_the_bridge_keeps_for_itself_is_refused_at_the_adapter(run: str, if_missing: str) -> None:
    # The sender picks the id: one that named another event's run and started it first would
    # make that event's own start a duplicate, and the event would never start.
    with pytest.raises(EventRejected) as caught:
        squat_table(if_missing).check(event("payment.completed", {"runId": run}))
    assert caught.value.reason == "target_invalid" and caught.value.details["field"] == "signal.workflow_id"


@pytest.mark.parametrize(
    ("run", "if_missing"),
    [
        (f"process-order-{run_digest('shop', 'kafka:orders', 'order-123')}", "skip"),  # signal a run the bridge started
        ("cart-0123456789abcdef0123", "start"),  # the shape, but no entry of that id: an id of the user's own
        (f"pay-{run_digest('shop', 'http:ci', 'p-1')}", "start"),  # a signal entry's runs have ids of their own
        ("process-order-0123456789abcdef012", "start"),  # 19 hex digits: not the shape
        ("process-order-0123456789ABCDEF0123", "start"),  # digests are lower case
        ("my-dispatcher-7", "start"),
    ],
)
def test_other_run_ids_are_signalled(run: str, if_missing: str) -> None:
    routes = squat_table(if_missing)
    routes.check(event("payment.completed", {"runId": run}))
    [target] = routes.resolve(event("payment.completed", {"runId": run}))
    assert target.signal is not None and target.signal.reserved(run, routes.starting) is None


def test_a_bad_signal_template_is_refused_at_load() -> None:
    with pytest.raises(ConfigError, match=r"signal\.workflow_id"):
        table(wf("pay", "payment.completed", signal={"name": "payment", "workflow_id": "order-{{ .trigger. }}"}))


def test_a_signal_needs_the_users_workflow_not_the_task_runner() -> None:
    with pytest.raises(ConfigError, match="signal: needs workflow_type"):
        cfg(
            {
                "id": "pay",
                "triggers": [{"name": "payment.completed"}],
                "tasks": [{"id": "t", "config": {"template": "x"}}],
                "signal": {"name": "payment", "workflow_id": "order-{{ .trigger.orderId }}"},
            }
        )


def test_routes_show_a_signal_entry_as_the_run_and_signal_it_reaches() -> None:
    routes = table(PAYMENTS, wf("audit", "payment.completed"))
    assert routes.names() == {
        "payment.completed": ["signal order-{{ .trigger.orderId }}:payment (order-payments)", "audit"]
    }


@pytest.mark.parametrize(
    ("schema", "payload", "keyword"),
    [
        ({"properties": {"token": {"const": "s3cr3t-from-env"}}}, {"token": "guess"}, "'const'"),
        ({"properties": {"tenant": {"enum": ["acme-internal", "s3cr3t-tenant"]}}}, {"tenant": "x"}, "'enum'"),
        ({"properties": {"key": {"type": "string", "pattern": "^s3cr3t"}}}, {"key": "x"}, "'pattern'"),
        ({"properties": {"key": {"not": {"const": "s3cr3t"}}}}, {"key": "s3cr3t"}, "'not'"),
        ({"properties": {"k": {"oneOf": [{"const": "s3cr3t"}, {"type": "string"}]}}}, {"k": "s3cr3t"}, "'oneOf'"),
        ({"patternProperties": {"^(acme|s3cr3t-tenant)_": {"type": "integer"}}}, {"acme_x": "str"}, "'type'"),
    ],
)
def test_a_schema_refusal_names_the_keyword_not_the_values_the_schema_holds(
    schema: dict[str, Any], payload: dict[str, Any], keyword: str
) -> None:
    """jsonschema's messages for these keywords quote the schema's values, which may have come
    from the environment at load; the refusal goes back to the event's sender."""
    routes = table(wf("w", {"name": "order.created", "schema": schema}))
    with pytest.raises(EventRejected) as caught:
        routes.check(event("order.created", payload))
    assert caught.value.reason == "schema_invalid"
    assert "s3cr3t" not in caught.value.message and "acme-internal" not in caught.value.message
    assert "s3cr3t" not in json.dumps(caught.value.details), "nor in the details (its schema_path)"
    if keyword != "'type'":
        assert f"does not satisfy the schema's {keyword} keyword" in caught.value.message


def test_a_schema_refusal_that_quotes_only_the_event_keeps_its_message() -> None:
    routes = table(wf("w", {"name": "order.created", "schema": {"properties": {"n": {"type": "integer"}}}}))
    with pytest.raises(EventRejected) as caught:
        routes.check(event("order.created", {"n": "seven"}))
    assert "'seven' is not of type 'integer'" in caught.value.message


# -- payloads that would hold the adapter's loop -----------------------------------------------------

BACKTRACKS = "^([a-z0-9]+-?)+$"  # Python's re takes time doubling with each letter of "aaa…!"


@pytest.mark.parametrize(
    "schema",
    [
        {"type": "object", "patternProperties": {BACKTRACKS: {"type": "string"}}, "additionalProperties": False},
        {"type": "object", "patternProperties": {BACKTRACKS: {"type": "string"}}, "unevaluatedProperties": False},
        {
            "$schema": "https://json-schema.org/draft/2019-09/schema",
            "type": "object",
            "patternProperties": {BACKTRACKS: {"type": "string"}},
            "unevaluatedProperties": False,
        },
    ],
)
def test_property_names_are_matched_in_linear_time_by_every_keyword(schema: dict[str, Any]) -> None:
    """additionalProperties and unevaluatedProperties match names against patternProperties
    outside that keyword; with Python's re, this key would take days."""
    routes = table(wf("w", {"name": "a", "schema": schema}))
    with pytest.raises(EventRejected) as caught:
        routes.check(event("a", payload={"a" * 60 + "!": "v"}))
    assert caught.value.reason == "schema_invalid"
    routes.check(event("a", payload={"order-7": "v"}))


@pytest.mark.parametrize(
    ("items", "unique"),
    [
        ([{"i": i} for i in range(20_000)], True),  # objects do not sort: jsonschema compared every pair
        ([0, "0", None, [0], {"0": 0}] * 1 + list(range(1, 10_000)), True),
        ([1, 1.0], False),
        ([True, 1], True),
        ([{"a": 1, "b": [1, 2]}, {"b": [1, 2.0], "a": 1}], False),
        ([[1, 2], [2, 1]], True),
    ],
)
def test_unique_items_is_checked_as_json_schema_says_in_linear_time(items: list[Any], unique: bool) -> None:
    schema = {"properties": {"tags": {"type": "array", "uniqueItems": True}}}
    routes = table(wf("w", {"name": "a", "schema": schema}))
    if unique:
        routes.check(event("a", payload={"tags": items}))
    else:
        with pytest.raises(EventRejected, match="non-unique"):
            routes.check(event("a", payload={"tags": items}))


def test_a_duration_from_the_payload_is_parsed_in_linear_time() -> None:
    """celpy checks a duration's text with a backtracking pattern: 26 letters and a '!' took 7 s,
    in one call no filter budget can interrupt."""
    routes = table(wf("slow", {"name": "a", "filter": 'duration(payload.t) > duration("1h")'}))
    assert ids(routes, event("a", payload={"t": "a" * 60 + "!"})) == []
    assert ids(routes, event("a", payload={"t": "1h30m"})) == ["slow"]
    assert ids(routes, event("a", payload={"t": "30m"})) == []


RECHECKS_EACH_LEVEL = {  # unevaluatedProperties checks the allOf branch again at every level
    "type": "object",
    "allOf": [{"properties": {"child": {"$ref": "#"}, "x": {}, "a": {}, "b": {}}}],
    "unevaluatedProperties": False,
}
ALTERNATIVES_RECURSE = {  # anyOf tries both, and each recurses
    "type": "object",
    "anyOf": [
        {"properties": {"child": {"$ref": "#"}}, "required": ["a"]},
        {"properties": {"child": {"$ref": "#"}}, "required": ["b"]},
    ],
}


def nested(depth: int, **leaf: Any) -> dict[str, Any]:
    value: dict[str, Any] = dict(leaf)
    for _ in range(depth):
        value = {"child": value, **leaf}
    return value


@pytest.mark.parametrize("schema", [RECHECKS_EACH_LEVEL, ALTERNATIVES_RECURSE])
def test_a_schema_whose_work_doubles_with_the_payloads_depth_is_stopped(schema: dict[str, Any]) -> None:
    """jsonschema checks the subtree again at every level: depth 20 took 104 s, depth 99 would
    take ages, holding the adapter's loop. The check stops once it has applied the schema to one
    part of the payload more than MAX_VISITS times."""
    routes = table(wf("w", {"name": "a", "schema": schema}))
    routes.check(event("a", payload=nested(4, x=1, a=1)))  # shallow: checked as before
    with pytest.raises(EventRejected) as caught:
        routes.check(event("a", payload=nested(99, x=1, b=1)))
    rejected = caught.value
    assert rejected.reason == "schema_invalid"
    assert "could not be checked" in rejected.message and str(MAX_VISITS) in rejected.message
    assert rejected.details == {"workflow": "w", "trigger": "a"}


def test_a_large_payload_is_checked_whatever_its_size() -> None:
    """The limit counts visits of one part, not the payload's size: 20,000 objects pass."""
    schema = {
        "type": "object",
        "properties": {"items": {"type": "array", "items": {"anyOf": [{"type": "string"}, {"$ref": "#/$defs/item"}]}}},
        "$defs": {"item": {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}},
    }
    routes = table(wf("w", {"name": "a", "schema": schema}))
    routes.check(event("a", payload={"items": [{"a": i} for i in range(20_000)]}))
    deep: Any = {"a": 1}
    for _ in range(90):  # a deep tree through a plain recursive schema: one visit a level
        deep = {"a": 1, "children": [deep]}
    tree = {"type": "object", "properties": {"children": {"type": "array", "items": {"$ref": "#"}}}}
    table(wf("t", {"name": "a", "schema": tree})).check(event("a", payload=deep))
    with pytest.raises(EventRejected, match="not valid under any of the given schemas"):
        routes.check(event("a", payload={"items": [{"a": 1}] * 3 + [{"a": "x"}]}))


@pytest.mark.parametrize("schema", [{"$ref": "#"}, {"anyOf": [{"$ref": "#/$defs/a"}], "$defs": {"a": {"$ref": "#"}}}])
def test_a_schema_that_refers_to_itself_without_end_is_refused_at_load(schema: dict[str, Any]) -> None:
    with pytest.raises(ConfigError, match="refers to itself without end"):
        table(wf("w", {"name": "a", "schema": schema}))


def test_a_schema_that_names_its_draft_is_held_to_the_same_limits() -> None:
    """A subschema with ``$schema`` (the root, reached by ``$ref: "#"``) was checked by
    jsonschema's stock class: no limit (3.6 s at depth 16, 4x every two levels) and no RE2."""
    named = {"$schema": "https://json-schema.org/draft/2020-12/schema", **ALTERNATIVES_RECURSE}
    routes = table(wf("w", {"name": "a", "schema": named}))
    with pytest.raises(EventRejected, match="could not be checked"):
        routes.check(event("a", payload=nested(99, b=1)))
    draft7 = {"$schema": "http://json-schema.org/draft-07/schema#", "properties": {"k": {"pattern": BACKTRACKS}}}
    draft7["properties"]["c"] = {"$ref": "#"}
    with pytest.raises(EventRejected, match=r"does not satisfy the schema's 'pattern' keyword"):
        table(wf("w", {"name": "a", "schema": draft7})).check(event("a", payload={"c": {"k": "a" * 60 + "!"}}))


def test_a_tree_ten_deep_through_the_2020_12_extension_idiom_is_checked() -> None:
    """``allOf: [{$ref: base}]`` beside ``unevaluatedProperties: false``, with ``base`` recursing
    through its children: an ordinary tree schema, refused at depth 8 by a limit of 1,024."""
    schema = {
        "$defs": {
            "base": {
                "type": "object",
                "properties": {
                    "name": {"type": "string"},
                    "children": {"type": "array", "items": {"$ref": "#/$defs/node"}},
                },
            },
            "node": {"allOf": [{"$ref": "#/$defs/base"}], "unevaluatedProperties": False},
        },
        "$ref": "#/$defs/node",
    }
    tree: dict[str, Any] = {"name": "leaf"}
    for _ in range(10):
        tree = {"name": "n", "children": [tree]}
    routes = table(wf("w", {"name": "a", "schema": schema}))
    routes.check(event("a", payload=tree))
    with pytest.raises(EventRejected, match="Unevaluated properties"):
        routes.check(event("a", payload={"name": "n", "children": [{"name": "x", "extra": 1}]}))


def test_a_check_takes_a_bounded_number_of_steps_in_all(monkeypatch: pytest.MonkeyPatch) -> None:
    """A part visited up to its limit may be wide: every visit of it walks all its items."""
    monkeypatch.setattr(schemas, "MAX_STEPS", 1_000)
    routes = table(wf("w", {"name": "a", "schema": {"properties": {"items": {"items": {"type": "integer"}}}}}))
    routes.check(event("a", payload={"items": list(range(900))}))
    with pytest.raises(EventRejected, match="more than 1000 times in all"):
        routes.check(event("a", payload={"items": list(range(2_000))}))


def test_an_events_schemas_share_one_budget_of_steps(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each trigger's check had a budget of its own (1,000,000 steps, 3 s on the adapter's event
    loop): three entries' schemas on one name took 8 s of it for one event."""
    monkeypatch.setattr(schemas, "MAX_STEPS", 1_000)
    schema = {"properties": {"items": {"items": {"type": "integer"}}}}
    routes = table(*(wf(f"w{i}", {"name": "a", "schema": schema}) for i in range(3)))
    routes.check(event("a", payload={"items": list(range(300))}))
    with pytest.raises(EventRejected, match="more than 1000 times in all"):
        routes.check(event("a", payload={"items": list(range(600))}))  # each alone would pass


@pytest.mark.parametrize(
    ("schema", "at_load"),
    [
        ({"$ref": "https://schemas.example/order.json"}, True),
        ({"$ref": "#/$defs/missing"}, True),
        ({"properties": {"x": {"$ref": "https://schemas.example/order.json"}}}, False),  # no probe reaches it
    ],
)
def test_a_ref_outside_the_schema_is_never_fetched(schema: dict[str, Any], at_load: bool) -> None:
    """jsonschema's default registry fetched a remote $ref with urlopen, without a timeout, on
    the thread that checks the event."""
    if at_load:
        with pytest.raises(ConfigError, match=r"\$ref that cannot be resolved"):
            table(wf("w", {"name": "a", "schema": schema}))
        return
    routes = table(wf("w", {"name": "a", "schema": schema}))
    with mock.patch("urllib.request.urlopen", side_effect=AssertionError("fetched")):
        with pytest.raises(EventRejected, match=r"cannot be resolved \(none is fetched\)") as caught:
            routes.check(event("a", payload={"x": 1}))
    assert caught.value.reason == "schema_invalid"


@pytest.mark.parametrize(
    ("schema", "payload", "message"),
    [
        (  # a 2020-12 resource inside a draft-07 schema keeps its unevaluatedProperties
            {
                "$schema": "http://json-schema.org/draft-07/schema#",
                "properties": {"x": {"$ref": "#/definitions/e"}},
                "definitions": {
                    "e": {
                        "$id": "urn:e",
                        "$schema": "https://json-schema.org/draft/2020-12/schema",
                        "properties": {"a": {}},
                        "unevaluatedProperties": False,
                    }
                },
            },
            {"x": {"a": 1, "zz": 2}},
            "Unevaluated properties",
        ),
        (  # a draft-07 resource inside a 2020-12 schema keeps its dependencies
            {
                "properties": {"x": {"$ref": "#/$defs/e"}},
                "$defs": {
                    "e": {
                        "$id": "urn:e7",
                        "$schema": "http://json-schema.org/draft-07/schema#",
                        "dependencies": {"a": ["b"]},
                    }
                },
            },
            {"x": {"a": 1}},
            "does not satisfy the schema's 'dependencies' keyword",
        ),
    ],
)
def test_a_resource_naming_another_draft_is_checked_by_its_drafts_keywords(
    schema: dict[str, Any], payload: dict[str, Any], message: str
) -> None:
    routes = table(wf("w", {"name": "a", "schema": schema}))
    with pytest.raises(EventRejected, match=message):
        routes.check(event("a", payload=payload))

"""Event ids, target run ids, the signal's wire shape, and the dispatcher's ids, sharding and settings."""

from __future__ import annotations

import json
from collections import Counter
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any

import pytest
from temporalio.converter import DataConverter

from bridge.config import DispatcherConfig
from bridge.event import EventSignal, cloudevent_id, encode, encoded_size, run_digest, target_workflow_id
from dispatcher.client import shard_of
from dispatcher.contract import DispatcherSettings, dispatcher_id


def ev(event_id: str = "e-1", key: str | None = None, **kw: Any) -> EventSignal:
    return EventSignal(id=event_id, name="order.created", payload={}, source="http", key=key, **kw)


def test_digest_is_stable_and_short() -> None:
    first = run_digest("shop", "http:token-1", "abc")
    assert first == run_digest("shop", "http:token-1", "abc")
    # Pinned: a changed digest would let a redelivery after an upgrade start its targets again.
    assert first == "c087d190e3e6aa377a62"
    assert len(first) == 20


@pytest.mark.parametrize(
    ("a", "b"),
    [
        (("shop", "http:token-1", "1"), ("shop", "http:token-1", "2")),
        (("shop", "http:token-1", "1"), ("shop", "http:token-2", "1")),  # another credential
        (("shop", "http:token-1", "1"), ("shop", "kafka:orders", "1")),  # another adapter
        (("shop", "http:token-1", "1"), ("bar", "http:token-1", "1")),  # another project
        (("ab", "c", "d"), ("a", "bc", "d")),  # the separators keep the parts apart
        (("a", "bc", "d"), ("a", "b", "cd")),
    ],
)
def test_digest_differs_for_another_project_scope_or_id(a: tuple[str, str, str], b: tuple[str, str, str]) -> None:
    assert run_digest(*a) != run_digest(*b)


def test_a_cloudevent_id_holds_its_source_and_id() -> None:
    assert cloudevent_id("/shop/orders", "A-1") == "/shop/orders#A-1"
    assert cloudevent_id("/shop/orders", "A-1") != cloudevent_id("/shop/returns", "A-1")


def test_target_workflow_id() -> None:
    assert target_workflow_id("process-order", "0123abcd") == "process-order-0123abcd"
    one, other = run_digest("p", "s", "1"), run_digest("p", "s", "2")
    assert target_workflow_id("w", one) != target_workflow_id("w", other)


def test_to_dict_from_dict_round_trip_through_json() -> None:
    event = EventSignal(
        id="e-9",
        name="order.created",
        payload={"orderId": "A1", "lines": [1, 2], "nested": {"x": None}},
        source="kafka:orders",
        time="2024-01-01T00:00:00+00:00",
        metadata={"traceparent": "00-abc-def-01", "headers": {"x": "y"}},
        key="customer-7",
    )
    assert EventSignal.from_dict(json.loads(json.dumps(event.to_dict()))) == event


def test_envelope_has_everything_but_payload() -> None:
    event = ev(metadata={"a": 1})
    env = event.envelope()
    assert "payload" not in env
    assert env["id"] == "e-1"
    assert env["name"] == "order.created"
    assert env["metadata"] == {"a": 1}


@pytest.mark.parametrize("bad", [[], "event", 3, None])
def test_from_dict_rejects_non_objects(bad: Any) -> None:
    with pytest.raises(TypeError):
        EventSignal.from_dict(bad)


@pytest.mark.parametrize("missing", ["id", "name"])
def test_from_dict_rejects_missing_keys(missing: str) -> None:
    data = {"id": "1", "name": "n", "payload": {}, "source": "s"}
    del data[missing]
    with pytest.raises(KeyError):
        EventSignal.from_dict(data)


def test_shard_of_single_shard_is_zero() -> None:
    assert {shard_of(ev(str(i)), 1) for i in range(50)} == {0}


def test_shard_of_is_stable_in_range_and_spreads() -> None:
    shards = 8
    placed = [shard_of(ev(f"id-{i}"), shards) for i in range(400)]
    assert placed == [shard_of(ev(f"id-{i}"), shards) for i in range(400)]
    assert all(0 <= s < shards for s in placed)
    assert len(Counter(placed)) == shards
    # Pinned: placement must not depend on the process (no salted hash()).
    assert shard_of(ev("id-1"), shards) == 2


def test_shard_of_uses_key_before_id() -> None:
    shards = 16
    placed = {shard_of(ev(f"id-{i}", key="customer-7"), shards) for i in range(50)}
    assert placed == {shard_of(ev("anything", key="customer-7"), shards)}
    by_id = {shard_of(ev(f"id-{i}"), shards) for i in range(50)}
    assert len(by_id) > 1


def test_dispatcher_id() -> None:
    assert dispatcher_id("My Shop", 0, 1) == "dispatcher-my-shop"
    assert dispatcher_id("shop", 0, 4) == "dispatcher-shop-0"
    assert dispatcher_id("shop", 3, 4) == "dispatcher-shop-3"


def test_dispatcher_settings_take_their_defaults_and_values_from_the_config_model() -> None:
    assert DispatcherSettings() == DispatcherSettings.from_config(DispatcherConfig())
    custom = DispatcherConfig(start_mode="activity", batch_size=7, recent_ids=0)
    settings = DispatcherSettings.from_config(custom).to_dict()
    assert settings == {k: v for k, v in custom.model_dump().items() if k in settings}
    assert settings["start_mode"] == "activity" and settings["batch_size"] == 7 and settings["recent_ids"] == 0


def test_encode_is_the_sdks_json_of_the_event_and_weighs_its_encoded_size() -> None:
    event = EventSignal(
        id="é-1", name="order.created", payload={"z": [1, 2.5, None], "a": {"y": "ü", "b": True}}, source="http:t"
    )
    data = encode(event.to_dict())
    [payload] = DataConverter.default.payload_converter.to_payloads([event.to_dict()])
    assert data == payload.data
    assert data.isascii() and len(data) == encoded_size(event.to_dict())
    assert json.loads(data) == event.to_dict()


def test_encode_writes_values_json_has_no_type_for() -> None:
    moment = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    data = encode({"at": moment, "day": date(2026, 1, 2), "tags": frozenset(["a"]), "other": Decimal("1.5")})
    assert json.loads(data) == {"at": moment.isoformat(), "day": "2026-01-02", "tags": ["a"], "other": "1.5"}

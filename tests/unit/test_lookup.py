"""The visibility queries of the event look-up, and `--since`."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from bridge.errors import BridgeError
from bridge.runtime.lookup import event_query, list_query, since
from dispatcher.search import quoted

NOW = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)


def test_a_value_cannot_end_its_string_literal() -> None:
    assert quoted('a"b\\') == '"a\\"b\\\\"'
    assert event_query("shop", 'x" OR SignalBridgeProject != "') == (
        'SignalBridgeProject = "shop" AND SignalBridgeEventId = "x\\" OR SignalBridgeProject != \\""'
    )


def test_an_event_is_found_by_its_id_and_with_a_source_by_both() -> None:
    assert event_query("shop", "e-1") == 'SignalBridgeProject = "shop" AND SignalBridgeEventId = "e-1"'
    assert event_query("shop", "e-1", "http:ci").endswith('AND SignalBridgeSource = "http:ci"')


def test_list_takes_a_name_prefix_an_age_and_a_status() -> None:
    query = list_query("shop", name="order.*", started_after=since("1h", NOW), status="failed")
    assert query == (
        'SignalBridgeProject = "shop" AND SignalBridgeEventName STARTS_WITH "order." '
        'AND StartTime > "2026-11-28T11:00:00+00:00" AND ExecutionStatus = "Failed"'
    )
    assert list_query("shop", name="order.created") == (
        'SignalBridgeProject = "shop" AND SignalBridgeEventName = "order.created"'
    )


@pytest.mark.parametrize(("text", "hours"), [("90s", 0.025), ("15m", 0.25), ("2h", 2), ("7d", 168)])
def test_since_counts_back_from_now(text: str, hours: float) -> None:
    assert (NOW - since(text, NOW)).total_seconds() == hours * 3600


@pytest.mark.parametrize("text", ["1 hour", "h", "-1h", "1w"])
def test_since_refuses_what_it_cannot_read(text: str) -> None:
    with pytest.raises(BridgeError, match="--since"):
        since(text, NOW)


def test_an_unknown_status_is_refused() -> None:
    with pytest.raises(BridgeError, match="--status"):
        list_query("shop", status="exploded")

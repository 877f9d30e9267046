"""The search attributes' values: whatever an event's id or name, each fits what Temporal takes."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from temporalio.converter import encode_typed_search_attribute_value

from bridge.event import EventSignal
from bridge.runtime.lookup import event_query, list_query
from dispatcher import search

TEMPORAL_LIMIT = 2048  # frontend.searchAttributesSizeOfValueLimit's default, bytes of the encoded value


def encoded(value: str) -> int:
    return len(encode_typed_search_attribute_value(search.EVENT_ID, value).data)


def test_a_value_that_fits_is_itself() -> None:
    text = "a" * search.MAX_VALUE_BYTES
    assert search.fit(text) == text and search.fit("order-7") == "order-7"


@given(st.text(min_size=search.MAX_VALUE_BYTES // 6, max_size=5000))
def test_any_text_fits_temporals_limit_once_encoded(text: str) -> None:
    value = search.fit(text)
    assert encoded(value) <= search.MAX_VALUE_BYTES + 2 < TEMPORAL_LIMIT  # + the quotes
    assert (value == text) == (encoded(text) <= search.MAX_VALUE_BYTES + 2)  # cut only when it must be


@given(st.text(max_size=3000), st.text(max_size=3000))
def test_two_long_texts_with_one_start_get_two_values(start: str, rest: str) -> None:
    one, two = "é" * 400 + start + rest + "1", "é" * 400 + start + rest + "2"
    assert search.fit(one) != search.fit(two)


@given(st.text(max_size=4000), st.integers(min_value=0, max_value=4000))
def test_a_prefix_query_matches_every_text_that_starts_with_it(text: str, cut: int) -> None:
    assert search.fit(text).startswith(search.fit_prefix(text[:cut]))


def test_the_values_and_the_look_up_queries_cut_alike() -> None:
    event = EventSignal(id="é" * 600, name="order." + "x" * 3000, payload={}, source="http:t")
    values = search.values(event, "shop")
    assert values[search.EVENT_ID.name] == search.fit(event.id) != event.id
    assert values[search.EVENT_NAME.name] == search.fit(event.name) != event.name
    assert f'"{values[search.EVENT_ID.name]}"' in event_query("shop", event.id, "http:t")
    assert f'SignalBridgeEventName = "{values[search.EVENT_NAME.name]}"' in list_query("shop", name=event.name)
    assert f'STARTS_WITH "{search.fit_prefix(event.name)}"' in list_query("shop", name=event.name + "*")

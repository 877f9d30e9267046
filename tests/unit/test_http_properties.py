"""Inputs nobody thought of, for the events API: hypothesis makes bodies and headers (arbitrary
bytes, JSON of every shape, envelopes, CloudEvents structured, binary and batched) and checks that
each becomes an event, a list of events and refusals, or a typed refusal, never another exception;
through the app, never a 500, and the adapter's catch-all for parser bugs never fires."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from litestar import Litestar
from litestar.testing import AsyncTestClient

from adapters.http.parse import CE_BATCH, parse
from bridge.decode import CE_STRUCTURED
from bridge.errors import HTTP_STATUS, EventRejected
from bridge.event import EventSignal
from tests.fakes import FakeSink
from tests.unit.http_support import AUTH, URL, make_app, make_config

MAX_BATCH = 8
EXAMPLES = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)

# --- what hypothesis makes ------------------------------------------------------------------


def json_of(numbers: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.recursive(
        st.none() | st.booleans() | numbers | st.text(max_size=20),
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
        max_leaves=20,
    )


# What the bridge takes (finite, 64-bit), and anything at all (NaN, Infinity, huge integers).
json_values = json_of(
    st.floats(allow_nan=False, allow_infinity=False) | st.integers(min_value=-(2**63), max_value=2**64 - 1)
)
wild_json = json_of(st.floats() | st.integers() | st.integers(min_value=2**64, max_value=10**400))
names = st.text(max_size=12) | st.sampled_from(["order.created", "order.shipped", " ", ""]) | json_values
envelopes = st.fixed_dictionaries(
    {"name": names}, optional={"payload": json_values, "id": json_values, "extra": json_values}
)
CE_ATTRIBUTES = ("specversion", "id", "source", "type", "time", "subject", "datacontenttype", "dataschema")
cloudevents = st.fixed_dictionaries(
    {},
    optional={
        **{a: st.text(max_size=10) | json_values for a in CE_ATTRIBUTES},
        "data": json_values,
        "data_base64": st.text(max_size=12) | json_values,
        "ext": json_values,
    },
)
documents = (
    wild_json
    | envelopes
    | cloudevents
    | st.lists(envelopes | wild_json, max_size=MAX_BATCH + 2)
    | st.lists(cloudevents | wild_json, max_size=MAX_BATCH + 2)
)


def _dumps(value: Any) -> bytes:
    return json.dumps(value).encode()  # wild floats come out as NaN/Infinity, as a client may send them


bodies = st.binary(max_size=200) | documents.map(_dumps)
header_text = st.text(st.characters(min_codepoint=0x20, max_codepoint=0xFF, exclude_characters="\x7f"), max_size=24)
content_types = st.sampled_from(
    ["application/json", CE_STRUCTURED, CE_BATCH, f"{CE_STRUCTURED}; charset=utf-8", "text/plain", ""]
)
header_names = st.sampled_from(
    [*(f"ce-{a}" for a in CE_ATTRIBUTES), "ce-", "ce-x", "traceparent", "x-correlation-id", "user-agent", "x-other"]
)
headers = st.builds(
    lambda ct, rest: {"content-type": ct, **rest} if ct else rest,
    content_types | header_text,
    st.dictionaries(header_names, header_text, max_size=6),
)
keys = st.none() | st.text(max_size=10)


# --- the parsers, directly ------------------------------------------------------------------


def _check_event(event: EventSignal) -> None:
    assert isinstance(event.id, str) and event.id
    assert isinstance(event.name, str) and event.name
    assert isinstance(event.payload, dict)
    assert isinstance(event.source, str)
    json.dumps(event.to_dict(), default=str)  # what the sink will encode


def _check_rejected(exc: EventRejected) -> None:
    assert exc.reason in HTTP_STATUS
    assert 400 <= exc.status < 500


@EXAMPLES
@given(headers=headers, body=bodies, key=keys)
def test_any_body_and_headers_parse_to_events_or_typed_refusals(
    headers: dict[str, str], body: bytes, key: str | None
) -> None:
    metadata = {"headers": {"traceparent": "t"}}
    try:
        result = parse(headers, body, metadata, key, max_batch=MAX_BATCH)
    except EventRejected as exc:
        _check_rejected(exc)
        return
    if isinstance(result, EventSignal):
        _check_event(result)
        return
    assert isinstance(result, list) and len(result) <= MAX_BATCH
    for item in result:
        if isinstance(item, EventRejected):
            _check_rejected(item)
        else:
            _check_event(item)


@EXAMPLES
@given(items=st.lists(envelopes, min_size=1, max_size=MAX_BATCH), key=keys)
def test_an_envelope_batch_answers_each_item(items: list[dict[str, Any]], key: str | None) -> None:
    result = parse({"content-type": "application/json"}, _dumps(items), {}, key, max_batch=MAX_BATCH)
    assert isinstance(result, list) and len(result) == len(items)


@EXAMPLES
@given(items=st.lists(cloudevents, min_size=1, max_size=MAX_BATCH))
def test_a_cloudevents_batch_answers_each_item(items: list[dict[str, Any]]) -> None:
    result = parse({"content-type": CE_BATCH}, _dumps(items), {}, None, max_batch=MAX_BATCH)
    assert isinstance(result, list) and len(result) == len(items)


@EXAMPLES
@given(attrs=st.dictionaries(st.sampled_from(CE_ATTRIBUTES), header_text, max_size=8), body=bodies)
def test_a_binary_cloudevent_is_an_event_or_a_typed_refusal(attrs: dict[str, str], body: bytes) -> None:
    ce_headers = {f"ce-{k}": v for k, v in {**attrs, "specversion": attrs.get("specversion") or "1.0"}.items()}
    try:
        result = parse(ce_headers, body, {}, None, max_batch=MAX_BATCH)
    except EventRejected as exc:
        _check_rejected(exc)
        return
    assert isinstance(result, EventSignal)
    _check_event(result)


@given(size=st.integers(min_value=MAX_BATCH + 1, max_value=3 * MAX_BATCH), ce=st.booleans())
def test_a_batch_over_the_cap_is_refused_whole(size: int, ce: bool) -> None:
    item = {"specversion": "1.0", "id": "i", "source": "/s", "type": "t"} if ce else {"name": "n"}
    content_type = CE_BATCH if ce else "application/json"
    with pytest.raises(EventRejected) as refused:
        parse({"content-type": content_type}, _dumps([item] * size), {}, None, max_batch=MAX_BATCH)
    assert refused.value.reason == "batch_too_large"
    assert refused.value.status == 413


# --- through the app ------------------------------------------------------------------------


class Unexpected(logging.Handler):
    """Holds the records of the events API's catch-all for parser bugs."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture(scope="module")
async def app_client() -> AsyncIterator[AsyncTestClient[Litestar]]:
    async with AsyncTestClient(make_app(FakeSink(), make_config(max_batch_events=MAX_BATCH))) as client:
        yield client


@pytest.fixture(scope="module")
def unexpected() -> Any:
    handler = Unexpected()
    logger = logging.getLogger("adapters.http.events")
    logger.addHandler(handler)
    yield handler
    logger.removeHandler(handler)


@EXAMPLES
@given(sent=headers, body=bodies, key=keys)
async def test_the_app_answers_any_request_without_a_server_error(
    app_client: AsyncTestClient[Litestar], unexpected: Unexpected, sent: dict[str, str], body: bytes, key: str | None
) -> None:
    raw = {name: value.encode("latin-1") for name, value in sent.items()}
    if key is not None:
        raw["idempotency-key"] = key.encode("utf-8")
    resp = await app_client.post(URL, content=body, headers={**raw, "authorization": AUTH["Authorization"].encode()})
    assert resp.status_code in (202, 207) or 400 <= resp.status_code < 500, (resp.status_code, resp.text)
    if resp.status_code >= 400 and resp.headers.get("content-type", "").startswith("application/json"):
        answer = resp.json()
        if "error" in answer:  # litestar's own 400 (a header it validates) has no reason code
            assert HTTP_STATUS[answer["error"]] == resp.status_code
    assert unexpected.records == [], "a parser raised something other than EventRejected"

"""Bad input to the events API gets a clear answer: 400 or 413 with its reason, a log line and a
count in signal_bridge_events_rejected_total; never a 500. What hypothesis finds on its own:
test_http_properties.py."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import pytest
from litestar import Litestar
from litestar.testing import AsyncTestClient

from adapters.http import parse as parse_module
from adapters.http.parse import CE_BATCH
from bridge.decode import CE_STRUCTURED
from tests.fakes import FakeSink
from tests.unit.http_support import AUTH, URL, make_app, make_config

DEEP = 3000


def nested(depth: int) -> bytes:
    return b'{"name": "order.created", "payload": {"a": ' + b"[" * depth + b"]" * depth + b"}}"


HOSTILE = {
    "deep-envelope": (nested(DEEP), "application/json"),
    "deep-just-over-the-limit": (nested(100), "application/json"),
    "deep-array": (b"[" * 100_000, "application/json"),
    "5000-digit-integer": (b'{"name": "order.created", "id": ' + b"7" * 5000 + b"}", "application/json"),
    "65-bit-integer": (b'{"name": "order.created", "payload": {"n": 36893488147419103232}}', "application/json"),
    "NaN": (b'{"name": "order.created", "payload": {"orderId": "A1", "n": NaN}}', "application/json"),
    "Infinity": (b'{"name": "order.created", "payload": {"orderId": "A1", "n": -Infinity}}', "application/json"),
    "float-overflowing-to-infinity": (b'{"name": "order.created", "payload": {"n": 1e999}}', "application/json"),
    "invalid-utf8": (b'{"name": "order.created\xff"}', "application/json"),
    "deep-cloudevent": (
        b'{"specversion": "1.0", "id": "1", "source": "/s", "type": "order.created", "data": '
        + b"[" * DEEP
        + b"]" * DEEP
        + b"}",
        CE_STRUCTURED,
    ),
    "deep-cloudevents-batch": (b"[" * DEEP + b"]" * DEEP, CE_BATCH),
    "NaN-in-cloudevents-batch": (
        b'[{"specversion": "1.0", "id": "1", "source": "/s", "type": "t", "data": NaN}]',
        CE_BATCH,
    ),
}


@pytest.fixture
async def client() -> AsyncIterator[AsyncTestClient[Litestar]]:
    async with AsyncTestClient(make_app(FakeSink(), make_config(max_body_bytes=1024 * 1024))) as c:
        yield c


async def rejected(client: AsyncTestClient[Litestar], reason: str) -> float:
    text = (await client.get("/metrics", headers=AUTH)).text
    label = f'signal_bridge_events_rejected_total{{adapter="http",reason="{reason}"}} '
    return next((float(line.split()[-1]) for line in text.splitlines() if line.startswith(label)), 0.0)


@pytest.mark.parametrize(("body", "content_type"), HOSTILE.values(), ids=HOSTILE.keys())
async def test_hostile_json_is_400_malformed_counted_and_logged(
    client: AsyncTestClient[Litestar], caplog: pytest.LogCaptureFixture, body: bytes, content_type: str
) -> None:
    resp = await client.post(URL, content=body, headers={**AUTH, "Content-Type": content_type})
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"] == "malformed"
    assert await rejected(client, "malformed") == 1.0
    assert any("reason=malformed" in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]  # the parsers' own refusal, no bug


@pytest.mark.parametrize(
    "length",
    [b"1" * 5000, b"9" * 19, b"\xb2", b"1e9", b"-1", b" 12", b""],
    ids=["5000-digits", "19-digits", "sup2", "float", "neg", "space", "empty"],
)
async def test_any_content_length_header_is_answered_without_a_server_error(
    client: AsyncTestClient[Litestar], length: bytes
) -> None:
    headers = {**AUTH, "Content-Type": "application/json"}
    resp = await client.post(URL, content=b'{"name": "order.created"}', headers={**headers, "Content-Length": length})
    assert resp.status_code < 500, resp.text
    if length.isascii() and length.isdigit():
        assert (resp.status_code, resp.json()["error"]) == (413, "too_large")


@pytest.mark.parametrize(
    "body",
    [b'{"name": "order.created\\ud800"}', b'[{"name": "order.created", "id": "\\udc00"}]'],
    ids=["name", "batch-id"],
)
async def test_a_lone_surrogate_is_400_malformed(client: AsyncTestClient[Litestar], body: bytes) -> None:
    resp = await client.post(URL, content=body, headers=AUTH)
    assert (resp.status_code, resp.json()["error"]) == (400, "malformed")


async def test_an_empty_id_is_malformed_not_a_fresh_id_on_every_retry(client: AsyncTestClient[Litestar]) -> None:
    """In a batch sent with an Idempotency-Key an item with an id does not get ``{key}:{index}``,
    and an empty id would have become a fresh UUID each time the batch was retried."""
    headers = {**AUTH, "Idempotency-Key": "imp-1"}
    resp = await client.post(URL, json={"name": "order.created", "id": ""}, headers=headers)
    assert (resp.status_code, resp.json()["error"]) == (400, "malformed")
    assert "'id' must not be empty" in resp.text
    batch = [{"name": "order.created", "id": "", "payload": {"orderId": "1"}}]
    resp = await client.post(URL, json=batch, headers=headers)
    assert resp.status_code == 207, resp.text
    [result] = resp.json()["results"]
    assert (result["status"], result["error"]) == (400, "malformed") and "must not be empty" in result["message"]


async def test_a_parser_bug_is_a_logged_400_not_a_500(
    client: AsyncTestClient[Litestar], caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whatever the parsers raise besides EventRejected is caught at the adapter's edge: logged with
    its traceback, counted as malformed, answered 400."""

    def broken(*_: object, **__: object) -> None:
        raise RecursionError("maximum recursion depth exceeded")

    monkeypatch.setattr("adapters.http.events.parse", broken)
    resp = await client.post(URL, json={"name": "order.created"}, headers=AUTH)
    assert (resp.status_code, resp.json()["error"]) == (400, "malformed")
    assert "RecursionError" not in resp.text  # the traceback is logged, not answered
    [bug] = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert bug.exc_info is not None and bug.exc_info[0] is RecursionError
    assert await rejected(client, "malformed") == 1.0
    assert parse_module.parse is not broken  # only the controller's reference was replaced


async def test_a_binary_cloudevent_with_hostile_data_is_400(client: AsyncTestClient[Litestar]) -> None:
    ce = {"ce-specversion": "1.0", "ce-id": "1", "ce-source": "/s", "ce-type": "order.created"}
    for body in (b"[" * DEEP + b"]" * DEEP, b'{"n": NaN}', b"1" * 5000):
        resp = await client.post(URL, content=body, headers={**AUTH, **ce, "Content-Type": "application/json"})
        assert (resp.status_code, resp.json()["error"]) == (400, "malformed"), body[:20]


async def test_an_unexpected_error_is_logged_with_its_traceback(caplog: pytest.LogCaptureFixture) -> None:
    """A bug past the parsers (here: the sink raises RuntimeError) is still a 500, never an unlogged one."""
    async with AsyncTestClient(make_app(FakeSink(bugs=1))) as c:
        resp = await c.post(URL, json={"name": "order.created", "payload": {"orderId": "A1"}}, headers=AUTH)
    assert resp.status_code == 500
    assert resp.json() == {"status_code": 500, "detail": "Internal Server Error"}
    [bug] = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert bug.getMessage() == f"unhandled error POST {URL}"
    assert bug.exc_info is not None and bug.exc_info[0] is RuntimeError

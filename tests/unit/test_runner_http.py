"""The http task's call (dispatcher.http_task): secrets substituted last, where it may go, how much
it reads, and what its failures say. Against a small HTTP server on loopback; DNS is stubbed where
a test needs a "public" host."""

from __future__ import annotations

import asyncio
import gzip
import ipaddress
import json
import re
import time
import tracemalloc
import zlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from temporalio.exceptions import ApplicationError

from bridge import templates
from bridge.config import BridgeConfig, parse_config
from dispatcher import http_task
from dispatcher.contract import HttpCall

ENV = {"HOOK_KEY": "k3y-in-the-query", "HOOK_TOKEN": "t0ken-in-a-header"}


@dataclass
class Received:
    method: str
    target: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Server:
    """Answers every request with ``status``/``body`` (after ``delay`` s); records what it got."""

    status: int = 200
    body: bytes = b'{"ok": true}'
    chunked: bool = False
    delay: float = 0.0
    encoding: bytes = b""  # its Content-Encoding, when set (the body is sent as it is)
    got: list[Received] = field(default_factory=list)
    port: int = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
        method, target, _ = head[0].split(" ", 2)
        headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in head[1:] if line)}
        body = await reader.readexactly(int(headers.get("content-length", "0")))
        self.got.append(Received(method, target, headers, body))
        await asyncio.sleep(self.delay)
        if self.chunked:
            chunks = b"".join(
                b"%x\r\n%s\r\n" % (len(c), c) for c in (self.body[i : i + 4096] for i in range(0, len(self.body), 4096))
            )
            writer.write(b"HTTP/1.1 %d X\r\nTransfer-Encoding: chunked\r\n\r\n%s0\r\n\r\n" % (self.status, chunks))
        else:
            coding = b"Content-Encoding: %s\r\n" % self.encoding if self.encoding else b""
            head = b"HTTP/1.1 %d X\r\n%sContent-Length: %d\r\n\r\n" % (self.status, coding, len(self.body))
            writer.write(head + self.body)
        await writer.drain()
        writer.close()


@pytest.fixture
async def server() -> AsyncIterator[Server]:
    srv = Server()
    listener = await asyncio.start_server(srv.handle, "127.0.0.1", 0)
    srv.port = listener.sockets[0].getsockname()[1]
    async with listener:
        yield srv


def config(url: str, runner: dict[str, Any] | None = None, **task: Any) -> BridgeConfig:
    http = {"url": url, "headers": {"Authorization": "Bearer ${HOOK_TOKEN}"}, **task}
    return parse_config(
        {
            "project": "shop",
            "runner": runner or {},
            "workflows": [{"id": "w", "triggers": [{"name": "a"}], "tasks": [{"id": "call", "config": http}]}],
        }
    )


def call(**trigger: Any) -> HttpCall:
    return HttpCall(workflow_id="w", task_id="call", context={"trigger": trigger}, timeout_seconds=30.0)


def allow(srv: Server) -> dict[str, Any]:
    return {"allow_hosts": [f"127.0.0.1:{srv.port}"]}


async def test_templates_render_first_then_the_environment_is_put_in(server: Server) -> None:
    """A payload value is encoded into one segment, and its ``${HOOK_TOKEN}`` stays text."""
    cfg = config(
        f"http://127.0.0.1:{server.port}/orders/{{{{ .trigger.id }}}}?key=${{HOOK_KEY}}",
        allow(server),
        body={"note": "{{ .trigger.note }}", "signed": "${HOOK_TOKEN}"},
    )
    result = await http_task.run(cfg, call(id="../../admin?x=", note="${HOOK_TOKEN}"), env=ENV)
    assert result == {"status": 200, "body": {"ok": True}}
    [got] = server.got
    assert got.method == "POST"
    assert got.target == "/orders/..%2F..%2Fadmin%3Fx%3D?key=k3y-in-the-query"
    assert got.headers["authorization"] == "Bearer t0ken-in-a-header"
    assert json.loads(got.body) == {"note": "${HOOK_TOKEN}", "signed": "t0ken-in-a-header"}


@pytest.mark.parametrize(("status", "retried"), [(500, True), (429, True), (404, False), (400, False)])
async def test_a_failure_names_the_task_and_its_redacted_url_and_no_secret(
    server: Server, status: int, retried: bool
) -> None:
    server.status = status
    cfg = config(f"http://user:pw@127.0.0.1:{server.port}/h/{{{{ .trigger.id }}}}?key=${{HOOK_KEY}}", allow(server))
    with pytest.raises(ApplicationError) as info:
        await http_task.run(cfg, call(id="o-1"), env=ENV)
    message = info.value.message
    assert message.startswith(f"http task 'call' of 'w': POST http://***@127.0.0.1:{server.port}/h/")
    assert f"answered {status}" in message and "?***" in message
    assert not any(s in message for s in [*ENV.values(), "user:pw", "o-1"])
    assert info.value.non_retryable is not retried


async def test_an_answer_over_max_response_bytes_is_refused_declared_or_streamed(server: Server) -> None:
    server.body = b"x" * 50_000
    cfg = config(f"http://127.0.0.1:{server.port}/", {**allow(server), "max_response_bytes": 40_000})
    with pytest.raises(ApplicationError, match=r"50000 bytes, over runner\.max_response_bytes") as info:
        await http_task.run(cfg, call(), env=ENV)
    assert info.value.non_retryable and info.value.type == "Refused"
    server.chunked = True  # no Content-Length: counted while read
    with pytest.raises(ApplicationError, match=r"over runner.max_response_bytes \(40000\)"):
        await http_task.run(cfg, call(), env=ENV)
    assert (await http_task.run(config(f"http://127.0.0.1:{server.port}/", allow(server)), call(), env=ENV))[
        "body"
    ] == "x" * 50_000


@pytest.mark.parametrize(("runner_timeout", "task_timeout"), [(0.3, None), (30, 0.3)])
async def test_the_whole_call_is_bounded_by_the_least_timeout(
    server: Server, runner_timeout: float, task_timeout: float | None
) -> None:
    server.delay = 5
    cfg = config(
        f"http://127.0.0.1:{server.port}/",
        {**allow(server), "timeout_seconds": runner_timeout},
        timeout_seconds=task_timeout,
    )
    start = time.monotonic()
    with pytest.raises(ApplicationError, match=r"no answer within 0.3 s") as info:
        await http_task.run(cfg, call(), env=ENV)
    assert time.monotonic() - start < 2
    assert info.value.type == "Timeout" and not info.value.non_retryable


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "[::1]", "169.254.169.254", "10.1.2.3"])
async def test_without_allow_hosts_private_addresses_are_refused(host: str) -> None:
    with pytest.raises(ApplicationError, match="loopback, private, link-local or reserved") as info:
        await http_task.run(config(f"http://{host}:1/"), call(), env=ENV)
    assert info.value.non_retryable


async def test_without_allow_hosts_the_call_goes_to_the_address_that_was_checked(server: Server) -> None:
    """DNS answers once; the connection is made to that address (no second lookup to rebind)."""
    lookups: list[str] = []

    async def resolver(host: str, port: int) -> list[str]:
        lookups.append(host)
        return ["127.0.0.1"]

    cfg = config(f"http://api.shop.test:{server.port}/x")
    await http_task.run(cfg, call(), env=ENV, resolver=resolver, public=lambda ip: True)
    assert lookups == ["api.shop.test"]
    assert server.got[0].headers["host"] == f"api.shop.test:{server.port}"

    async def mixed(host: str, port: int) -> list[str]:
        return ["93.184.216.34", "127.0.0.1"]

    with pytest.raises(ApplicationError, match="resolves to a loopback"):
        await http_task.run(cfg, call(), env=ENV, resolver=mixed)


@pytest.mark.parametrize(
    ("allowed", "ok"),
    [(["127.0.0.1"], True), (["127.0.0.1:{port}"], True), (["127.0.0.1:1"], False), (["other.test"], False)],
)
async def test_allow_hosts_names_host_and_optionally_port(server: Server, allowed: list[str], ok: bool) -> None:
    cfg = config(f"http://127.0.0.1:{server.port}/", {"allow_hosts": [a.format(port=server.port) for a in allowed]})
    if ok:
        assert (await http_task.run(cfg, call(), env=ENV))["status"] == 200
    else:
        with pytest.raises(ApplicationError, match=r"not in runner\.allow_hosts") as info:
            await http_task.run(cfg, call(), env=ENV)
        assert info.value.non_retryable and server.got == []


@pytest.mark.parametrize(
    ("task", "trigger", "message"),
    [
        ({}, {"h": "a\r\nX-Forged: 1"}, "a header value would hold a line break"),
        ({"url": "ftp://127.0.0.1/"}, {}, "must be http:// or https://"),
        ({"method": "GET /x"}, {}, "is not an HTTP method"),
        ({"url": "http://127.0.0.1/${UNSET_HERE}"}, {}, "environment variable UNSET_HERE is not set"),
        ({}, {"h": "José"}, "not ASCII"),  # httpx raised UnicodeEncodeError, retried every attempt
    ],
)
async def test_requests_that_cannot_be_made_are_refused_for_good(
    task: dict[str, Any], trigger: dict[str, Any], message: str
) -> None:
    url = task.pop("url", "http://127.0.0.1:1/")
    cfg = config(url, {"allow_hosts": ["127.0.0.1"]}, headers={"X-H": "{{ .trigger.h }}"}, **task)
    with pytest.raises(ApplicationError, match=message) as info:
        await http_task.run(cfg, call(**trigger), env=ENV)
    assert info.value.non_retryable


async def test_a_task_gone_from_the_config_is_not_retried() -> None:
    with pytest.raises(ApplicationError, match="has no http task 'gone'") as info:
        await http_task.run(config("http://x/"), HttpCall("w", "gone", {}, 5.0))
    assert info.value.non_retryable and info.value.type == "TaskMissing"


@pytest.mark.parametrize(
    ("url", "redacted"),
    [
        ("https://u:p@hooks.test/a/b?token=x#f", "https://***@hooks.test/a/b?***"),
        ("https://hooks.test/a", "https://hooks.test/a"),
        ("${BASE}/orders/{{ .trigger.id }}?k=${KEY}", "${BASE}/orders/{{ .trigger.id }}?***"),
    ],
)
def test_redact_url(url: str, redacted: str) -> None:
    assert http_task.redact_url(url) == redacted


@pytest.mark.parametrize(
    ("address", "public"),
    [
        ("93.184.216.34", True),
        ("2606:2800:220:1:248:1893:25c8:1946", True),
        ("127.0.0.1", False),
        ("10.0.0.1", False),
        ("172.16.0.1", False),
        ("192.168.1.1", False),
        ("169.254.169.254", False),
        ("100.64.0.1", False),
        ("0.0.0.0", False),
        ("224.0.0.1", False),
        ("::1", False),
        ("fe80::1", False),
        ("fc00::1", False),
        ("::ffff:127.0.0.1", False),
        # IPv6 that carries an IPv4 address: judged by it (a NAT64 gateway reaches 10.0.0.5)
        ("64:ff9b::a00:5", False),
        ("64:ff9b::5db8:d822", True),  # NAT64 of 93.184.216.34
        ("2002:a00:5::1", False),  # 6to4 of 10.0.0.5
        ("2002:5db8:d822::1", True),
        ("::7f00:1", False),  # IPv4-compatible 127.0.0.1
        ("64:ff9b:1::a00:5", False),  # local-use NAT64
        ("2001:0:4136:e378:8000:63bf:3fff:fdd2", False),  # Teredo
        ("fec0::5", False),  # site-local: the old private range, which Python calls global
        ("::ffff:0:a00:5", False),  # IPv4-translated 10.0.0.5 (SIIT)
        ("5f00::1", False),  # reserved by the IETF
        ("::ffff:93.184.216.34", True),  # IPv4-mapped: judged by the IPv4 address
    ],
)
def test_is_public(address: str, public: bool) -> None:
    assert http_task.is_public(ipaddress.ip_address(address)) is public


async def test_an_answer_nested_deeper_than_the_stack_is_kept_as_text(server: Server) -> None:
    server.body = b"[" * 100_000 + b"]" * 100_000
    result = await http_task.run(config(f"http://127.0.0.1:{server.port}/", allow(server)), call(), env=ENV)
    assert result["status"] == 200 and result["body"] == server.body.decode()


async def test_a_tasks_marked_templates_do_not_fill_the_shared_cache(server: Server) -> None:
    """The environment's values stand behind markers of a token new each call, so the marked
    text is new each call: kept in the cache, each pushed out templates the dispatcher renders
    in workflow code (compiling there tripped Temporal's deadlock detector). It is not kept."""
    cfg = config(f"http://127.0.0.1:{server.port}/o/{{{{ .trigger.id }}}}?key=${{HOOK_KEY}}", allow(server))
    kept = templates._url_template.cache_info().currsize, templates._compiled.cache_info().currsize
    for i in range(4):
        await http_task.run(cfg, call(id=f"o-{i}"), env=ENV)
    assert (templates._url_template.cache_info().currsize, templates._compiled.cache_info().currsize) == kept
    assert [g.target for g in server.got] == [f"/o/o-{i}?key=k3y-in-the-query" for i in range(4)]


MARKER = re.compile(r"@@[0-9a-fA-F]{6}")


async def test_a_template_error_quotes_no_marker_of_the_environments_values() -> None:
    cfg = config("http://127.0.0.1:1/{{ .trigger.id ${HOOK_KEY}", {"allow_hosts": ["127.0.0.1"]})
    with pytest.raises(ApplicationError, match="does not parse") as info:
        await http_task.run(cfg, call(id="o-1"), env=ENV)
    assert not MARKER.search(info.value.message) and "k3y-in-the-query" not in info.value.message


async def test_a_filter_that_changes_an_environment_values_marker_sends_nothing(server: Server) -> None:
    """``{{ '${HOOK_TOKEN}' | urlencode }}`` turned the marker into %40%40<token>.0%40%40, which the
    value is not put back into: the request went out with the marker instead of the value."""
    body = {"form": "token={{ '${HOOK_TOKEN}' | urlencode }}&text={{ .trigger.text }}"}
    cfg = config(f"http://127.0.0.1:{server.port}/", allow(server), body=body)
    with pytest.raises(ApplicationError, match="a template changed a") as info:
        await http_task.run(cfg, call(text="hi"), env=ENV)
    assert info.value.non_retryable and server.got == []
    assert not MARKER.search(info.value.message)


async def test_a_marker_in_the_event_is_sent_as_the_text_it_is(server: Server) -> None:
    """A marker another call used (the token learned from a request a filter changed) is not
    this call's: the event's text is sent as it is, never the environment's value."""
    cfg = config(f"http://127.0.0.1:{server.port}/", allow(server), body={"text": "{{ .trigger.text }}"})
    forged = "@@" + "ab" * 16 + ".0@@"
    await http_task.run(cfg, call(text=forged), env=ENV)
    [got] = server.got
    assert json.loads(got.body) == {"text": forged}


async def test_a_compressed_answer_is_read_decoded_and_its_coding_asked_for(server: Server) -> None:
    for coding, body in [
        (b"gzip", gzip.compress(b'{"ok": "gzip"}')),
        (b"deflate", zlib.compress(b'{"ok": "zlib"}')),
        (b"deflate", zlib.compress(b'{"ok": "raw"}', wbits=-zlib.MAX_WBITS)),  # as some servers send it
        (b"gzip", gzip.compress(b'{"ok": ') + gzip.compress(b'"two members"}')),
    ]:
        server.encoding, server.body = coding, body
        result = await http_task.run(config(f"http://127.0.0.1:{server.port}/", allow(server)), call(), env=ENV)
        assert result["status"] == 200 and result["body"]["ok"], result
    assert {g.headers["accept-encoding"] for g in server.got} == {"gzip, deflate"}


@pytest.mark.parametrize(
    ("coding", "layers", "refusal"),
    [(b"gzip", 1, "over runner.max_response_bytes"), (b"gzip, gzip", 2, "encoded 2 times"), (b"br", 0, "'br'")],
    ids=["bomb", "two-layers", "a-coding-not-asked-for"],
)
async def test_an_answer_that_decodes_past_the_cap_is_refused_as_it_decodes(
    server: Server, coding: bytes, layers: int, refusal: str
) -> None:
    """httpx decoded each chunk whole, every coding the answer named, before the cap was looked
    at: 3 KB as ``gzip, gzip`` made 2 GiB and held the event loop for 14 s, then was retried."""
    body = b"\0" * (64 * 1024 * 1024 if layers else 1024)
    for _ in range(layers):
        body = gzip.compress(body, 1)
    server.encoding, server.body = coding, body
    tracemalloc.start()
    try:
        with pytest.raises(ApplicationError, match=refusal) as info:
            await http_task.run(config(f"http://127.0.0.1:{server.port}/", allow(server)), call(), env=ENV)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert info.value.type == "Refused" and info.value.non_retryable
    assert peak < 16 * 1024 * 1024, f"{peak:,} bytes"


@pytest.mark.parametrize("tail", [" ", "\t", "\x0c", "\x01"])
async def test_a_header_value_h11_would_refuse_is_refused_without_quoting_it(server: Server, tail: str) -> None:
    """h11 refused a trailing space or a control character, and its message quoted the value as a
    bytes repr: a secret in it with a quote or a backslash came out escaped, which the masking did
    not find, in a failure Temporal kept and retried five times."""
    secret = "s3cr\\et-'\"-value"
    cfg = config(
        f"http://127.0.0.1:{server.port}/",
        allow(server),
        headers={"Authorization": "Bearer ${HOOK_TOKEN} {{ .trigger.id }}"},
    )
    with pytest.raises(ApplicationError) as info:
        await http_task.run(cfg, call(id="42" + tail), env={"HOOK_TOKEN": secret})
    assert info.value.type == "Refused" and info.value.non_retryable
    assert "s3cr" not in info.value.message and "Bearer" not in info.value.message
    assert server.got == []


@pytest.mark.parametrize("label", ["xn--a-", "xn--zz-"])
async def test_a_host_an_event_names_that_idna_cannot_read_is_refused_not_an_unhandled_error(label: str) -> None:
    """``xn--a-`` raised idna's IDNAError out of the activity (retried, and its text not masked),
    and a valid one a UnicodeEncodeError from the Host header."""

    async def loopback(host: str, port: int) -> list[str]:
        assert host.isascii(), host
        return ["127.0.0.1"]

    cfg = config("http://{{ .trigger.tenant }}.api.example/x")
    with pytest.raises(ApplicationError) as info:
        await http_task.run(cfg, call(tenant=label), env=ENV, resolver=loopback)
    assert info.value.type == "Refused" and info.value.non_retryable


async def test_a_host_of_a_label_idna_reads_is_sent_in_its_ascii_form(server: Server) -> None:
    """Its Host header was the Unicode form: UnicodeEncodeError, out of the activity, retried."""

    async def here(host: str, port: int) -> list[str]:
        return ["127.0.0.1"]

    cfg = config(f"http://{{{{ .trigger.tenant }}}}.api.example:{server.port}/x")
    result = await http_task.run(cfg, call(tenant="xn--bcher-kva"), env=ENV, resolver=here, public=lambda ip: True)
    assert result["status"] == 200
    assert server.got[0].headers["host"] == f"xn--bcher-kva.api.example:{server.port}"


@pytest.mark.parametrize(
    ("status", "coding", "body", "answer"),
    [
        (503, b"br", b"\x8b\x02\x80", "HttpStatus"),  # a server ignoring Accept-Encoding: its status decides
        (502, b"gzip", b"<html>bad gateway</html>", "HttpStatus"),  # a proxy's page, labelled gzip
        (200, b"br", b"", 200),  # an empty body has no coding to read
        (200, b"gzip", gzip.compress(b'{"ok": 1}') + b"\0" * 8, 200),  # what follows the member: ignored
    ],
    ids=["5xx-in-a-coding-not-read", "5xx-mislabelled", "empty-body", "gzip-then-padding"],
)
async def test_an_answers_status_decides_before_its_body_is_decoded(
    server: Server, status: int, coding: bytes, body: bytes, answer: Any
) -> None:
    """Decoded first, a 503 in a coding the runner does not read failed its run for good (refused),
    where it was retried as any 5xx; an empty body or padding after a gzip member was refused."""
    server.status, server.encoding, server.body = status, coding, body
    cfg = config(f"http://127.0.0.1:{server.port}/", allow(server))
    if answer == "HttpStatus":
        with pytest.raises(ApplicationError) as info:
            await http_task.run(cfg, call(), env=ENV)
        assert info.value.type == "HttpStatus" and not info.value.non_retryable
    else:
        assert (await http_task.run(cfg, call(), env=ENV))["status"] == answer

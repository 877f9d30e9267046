"""The compiled config snapshot: built once, swapped whole on reload, kept when the new file is bad."""

from __future__ import annotations

import asyncio
import builtins
import logging
import os
import pathlib
from pathlib import Path
from typing import Any

import pydantic
import pytest
import yaml
from litestar.testing import AsyncTestClient

from adapters.http import create_app
from bridge import snapshot
from bridge.errors import ConfigError, Unavailable
from bridge.event import EventSignal
from bridge.pipeline import Pipeline
from bridge.runtime import app
from bridge.runtime.app import Bridge
from bridge.snapshot import Snapshot, SnapshotSource, load, parse
from tests.fakes import FakeSink
from tests.helpers import assert_eventually

TOKEN_A = "token-a-0123456789"
TOKEN_B = "token-b-0123456789"


def data(*names: str, tokens: tuple[Any, ...] = (TOKEN_A,), **extra: Any) -> dict[str, Any]:
    return {
        "project": "snap",
        "temporal": {"address": "127.0.0.1:1"},
        "http": {"port": 18080, "auth": {"tokens": list(tokens)}},
        "webhooks": [{"slug": "open", "verify": {"kind": "none"}, "events": [{"name": "hook.in"}]}],
        "workflows": [{"id": "w", "workflow_type": "W", "triggers": [{"name": n} for n in names]}],
        **extra,
    }


def write(path: Path, content: dict[str, Any] | str | bytes) -> None:
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content if isinstance(content, str) else yaml.safe_dump(content))
    stamp = path.stat().st_mtime + 1  # a new mtime even within one clock tick
    os.utime(path, (stamp, stamp))


def event(name: str, event_id: str = "e1") -> EventSignal:
    return EventSignal(id=event_id, name=name, payload={}, source="http:test")


def test_one_load_compiles_routes_webhooks_and_tokens(tmp_path: Path) -> None:
    path = tmp_path / "bridge.yaml"
    write(path, data("a.created"))
    snap = load(path)
    assert snap.origin == str(path)
    assert snap.routes.is_routable("a.created") and not snap.routes.is_routable("b.created")
    assert list(snap.webhooks) == ["open"]
    assert snap.tokens.match(f"Bearer {TOKEN_A}") == "token-1"
    assert snap.tokens.match(f"Bearer {TOKEN_B}") is None


def test_a_snapshot_cannot_be_changed_in_place() -> None:
    snap = parse(data("a"))
    with pytest.raises(pydantic.ValidationError):
        snap.config.http.port = 1  # type: ignore[misc]
    with pytest.raises(TypeError):
        snap.webhooks["new"] = snap.webhooks["open"]  # type: ignore[index]


def test_reload_swaps_the_whole_snapshot(tmp_path: Path) -> None:
    path = tmp_path / "bridge.yaml"
    write(path, data("a"))
    source = SnapshotSource(load(path), path)
    before = source.current
    assert not source.changed()
    write(path, data("a", "b"))
    assert not source.changed()  # seen changed once: it may still be being written
    assert source.changed()  # as it was at the last look: settled
    assert source.reload() is True
    assert source.current is not before
    assert source.current.routes.is_routable("b") and not before.routes.is_routable("b")
    assert not source.changed()


def test_a_file_rewritten_while_it_is_read_is_not_swapped_in(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A file caught half-written can still be valid YAML with fewer workflows: swapped in, the
    events of the missing ones were refused, skipped, or found unroutable by the dispatcher."""
    path = tmp_path / "bridge.yaml"
    write(path, data("a", "b"))
    source = SnapshotSource(load(path), path)
    read = snapshot.read_config

    def torn(at: Any, env: Any = None) -> Any:
        config = read(at, env)  # what was there when it was read: "a" only
        write(path, data("a", "b", "c"))  # the writer goes on
        return config

    write(path, data("a"))
    monkeypatch.setattr(snapshot, "read_config", torn)
    assert source.reload() is False
    assert source.current.routes.is_routable("b")  # the old snapshot stays
    monkeypatch.setattr(snapshot, "read_config", read)
    assert source.changed() or source.changed()
    assert source.reload() is True
    assert source.current.routes.is_routable("c")


@pytest.mark.parametrize(
    "bad",
    [
        "project: [unclosed",  # not YAML
        {**data("a"), "workflows": [{"id": "w", "workflow_type": "W", "trigers": []}]},  # unknown key
        {**data("a"), "workflows": [{"id": "w", "workflow_type": "W", "triggers": [{"name": "a", "filter": "(("}]}]},
        {**data("a"), "webhooks": [{"slug": "gh", "verify": {"kind": "github"}, "events": [{"name": "x"}]}]},
        b"project: caf\xe9\n",  # not UTF-8: UnicodeDecodeError, no OSError
        "[" * 2000,  # RecursionError in the YAML parser
    ],
    ids=["not-yaml", "unknown-key", "filter-does-not-compile", "webhook-without-secret", "not-utf8", "nested-deep"],
)
def test_a_bad_file_is_refused_and_the_old_snapshot_stays(
    tmp_path: Path, bad: Any, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "bridge.yaml"
    write(path, data("a"))
    source = SnapshotSource(load(path), path)
    before = source.current
    write(path, bad)
    with caplog.at_level(logging.ERROR, logger="bridge.snapshot"):
        assert source.reload() is False
    assert source.current is before
    assert "config reload refused, keeping the previous one" in caplog.text
    assert not source.changed(), "the same bad file is not retried on every watcher tick"


async def test_events_never_touch_the_filesystem(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "bridge.yaml"
    write(path, data("a"))
    source = SnapshotSource(load(path), path)
    sink = FakeSink()
    pipeline = Pipeline(lambda: source.current.routes, sink)

    def no_io(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("filesystem access on the event path")

    monkeypatch.setattr(pathlib.Path, "stat", no_io)
    monkeypatch.setattr(builtins, "open", no_io)
    outcomes = await pipeline.submit([event("a", "1"), event("nope", "2")], "http")
    assert [o.accepted for o in outcomes] == [True, False]
    assert [e.id for e in sink.events] == ["1"]


async def test_a_token_removed_from_the_file_stops_working_on_reload(tmp_path: Path) -> None:
    path = tmp_path / "bridge.yaml"
    write(path, data("a", tokens=(TOKEN_A, {"name": "b", "token": TOKEN_B})))
    source = SnapshotSource(load(path), path)
    sink = FakeSink()
    app = create_app(Pipeline(lambda: source.current.routes, sink), source)

    async def post(token: str, key: str) -> int:
        resp = await client.post(
            "/api/v1/events",
            json={"name": "a", "payload": {}},
            headers={"Authorization": f"Bearer {token}", "Idempotency-Key": key},
        )
        return resp.status_code

    async with AsyncTestClient(app) as client:
        assert await post(TOKEN_A, "1") == 202
        assert await post(TOKEN_B, "2") == 202
        write(path, data("a", tokens=({"name": "b", "token": TOKEN_B},)))
        assert source.reload()
        assert await post(TOKEN_A, "3") == 401
        assert await post(TOKEN_B, "4") == 202


def test_bridge_reload_keeps_what_the_process_was_started_with(tmp_path: Path) -> None:
    """Listener, project and Temporal come from the start (and the environment's overrides)."""
    path = tmp_path / "bridge.yaml"
    write(path, data("a"))
    started = Snapshot.compile(load(path).config.model_copy(update={"project": "snap"}))
    bridge = Bridge(started, config_path=path, watch=False)
    changed = data("a", "b")
    changed["project"] = "other"
    changed["http"] = {"port": 9999, "host": "0.0.0.0", "auth": {"tokens": [TOKEN_B]}}
    write(path, changed)
    assert bridge.source.reload()
    now = bridge.source.current
    assert now.routes.is_routable("b")
    assert (now.config.project, now.config.http.port, now.config.http.host) == ("snap", 18080, "127.0.0.1")
    assert now.tokens.match(f"Bearer {TOKEN_B}") == "token-1"  # tokens do reload


def test_what_the_servers_and_consumers_read_at_start_stays_and_a_change_is_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """uvicorn takes max_concurrent_requests and trusted_proxies once, at start. A reload changed
    the snapshot's alone: the unsigned webhook requests' room (half the snapshot's limit) then
    outgrew uvicorn's, was never full, and a few addresses trickling bodies held every
    connection; a proxy removed from the file stayed trusted, and the log said nothing."""
    path = tmp_path / "bridge.yaml"
    first = data("a", dispatcher={"shards": 2})
    first["http"] = {**first["http"], "max_concurrent_requests": 100, "trusted_proxies": ["10.0.0.0/8"]}
    write(path, first)
    bridge = Bridge(load(path), config_path=path, watch=False)
    changed = data("a", "b", dispatcher={"shards": 4}, tracing={"enabled": True})
    changed["http"] = {**changed["http"], "max_concurrent_requests": 10_000, "trusted_proxies": []}
    changed["kafka"] = [{"bootstrap_servers": "127.0.0.1:9092", "topics": ["orders"]}]
    write(path, changed)
    with caplog.at_level(logging.WARNING, logger="bridge.runtime.app"):
        assert bridge.source.reload()
    now = bridge.source.current.config
    assert bridge.source.current.routes.is_routable("b")  # the rest reloads
    assert (now.http.max_concurrent_requests, now.http.trusted_proxies) == (100, ["10.0.0.0/8"])
    assert (now.dispatcher.shards, now.kafka, now.tracing.enabled) == (2, [], False)
    [line] = [r.getMessage() for r in caplog.records if "after a restart" in r.getMessage()]
    for name in ("dispatcher.shards", "kafka", "tracing", "http.max_concurrent_requests", "http.trusted_proxies"):
        assert name in line
    assert "project" not in line and "amqp" not in line


def test_a_reload_that_drops_every_token_is_refused_as_the_start_would_refuse_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The start refuses a process that takes events without a bearer token (unless insecure). A
    reload accepted it: every request was then answered 401 with /readyz green, or, insecure, the
    events API and /metrics were open to anyone."""
    path = tmp_path / "bridge.yaml"
    write(path, data("a"))
    bridge = Bridge(load(path), config_path=path, watch=False)
    write(path, data("a", "b", tokens=()))
    assert not bridge.source.reload()
    assert bridge.source.current.tokens.match(f"Bearer {TOKEN_A}") == "token-1"
    assert any("no bearer token under http.auth.tokens" in r.getMessage() for r in caplog.records)
    worker = Bridge(load(path), config_path=path, watch=False, role="worker")  # takes no events: no token needed
    assert worker.source.reload()
    insecure = Bridge(load(path), config_path=path, watch=False, insecure=True)
    write(path, data("a", "c", tokens=()))
    assert insecure.source.reload()
    assert any("insecure mode after reload" in r.getMessage() for r in caplog.records)


def test_a_self_holding_yaml_alias_is_a_refused_reload_tried_once(tmp_path: Path) -> None:
    """``a: &x [*x]`` passed the YAML parser and recursed for ever in the interpolation: the
    RecursionError escaped the reload, and the watcher tried the same file every tick."""
    path = tmp_path / "bridge.yaml"
    write(path, data("a"))
    source = SnapshotSource(load(path), path)
    path.write_text(path.read_text() + "\nextra: &x [*x]\n")
    assert not source.reload()
    assert not source.changed()  # not tried again until the file changes


async def test_a_reload_the_dispatcher_did_not_hear_of_is_told_again_by_the_watcher(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The new config is in force once swapped; if telling the dispatcher then failed (Temporal out
    of reach), it kept its old routes until its next continue-as-new: a removed entry went on
    starting. The watcher tells it again until it hears."""
    path = tmp_path / "bridge.yaml"
    write(path, data("a"))
    bridge = Bridge(load(path), config_path=path, watch=False)

    class Dispatcher:
        def __init__(self) -> None:
            self.calls = 0

        async def reload(self) -> None:
            self.calls += 1
            if self.calls == 1:
                raise Unavailable("Temporal is out of reach")

    dispatcher = bridge.dispatcher = Dispatcher()  # type: ignore[assignment]
    monkeypatch.setattr(app, "WATCH_INTERVAL", 0.01)
    write(path, data("a", "b"))
    watcher = asyncio.create_task(bridge._watch())
    try:
        await assert_eventually(lambda: dispatcher.calls == 2, timeout=5, interval=0.01, what="told again")
        await asyncio.sleep(0.1)
    finally:
        watcher.cancel()
    assert bridge.source.current.routes.is_routable("b") and dispatcher.calls == 2  # once heard, no more


async def test_a_watcher_told_no_again_and_again_logs_one_traceback_then_a_line_a_minute(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """While Temporal was out of reach, every tick's retry logged a traceback (every 2 s, for
    as long as the outage lasted)."""
    path = tmp_path / "bridge.yaml"
    write(path, data("a"))
    bridge = Bridge(load(path), config_path=path, watch=False)

    class Dispatcher:
        calls = 0

        async def reload(self) -> None:
            self.calls += 1
            if self.calls > 60:  # then another kind of error: a new failure, with its traceback
                raise AttributeError("a bug")
            raise Unavailable("Temporal is out of reach")

    dispatcher = bridge.dispatcher = Dispatcher()  # type: ignore[assignment]
    monkeypatch.setattr(app, "WATCH_INTERVAL", 0.001)
    write(path, data("a", "b"))
    watcher = asyncio.create_task(bridge._watch())
    try:
        await assert_eventually(lambda: dispatcher.calls >= 120, timeout=5, interval=0.01, what="told again")
    finally:
        watcher.cancel()
    failed = [r for r in caplog.records if "config reload" in r.getMessage() and "fail" in r.getMessage()]
    assert [r.exc_info is not None and type(r.exc_info[1]) for r in failed] == [Unavailable, AttributeError]


async def test_a_reload_swapped_while_the_dispatcher_was_being_told_is_told_again(tmp_path: Path) -> None:
    """A SIGHUP's reload and the watcher's overlap: the first telling ends after the second swap,
    whose own telling failed. The dispatcher may have loaded the first file's routes: it is told
    again, not taken to have heard."""
    path = tmp_path / "bridge.yaml"
    write(path, data("a"))
    bridge = Bridge(load(path), config_path=path, watch=False)
    first_sent, release = asyncio.Event(), asyncio.Event()

    class Dispatcher:
        calls = 0

        async def reload(self) -> None:
            self.calls += 1
            if self.calls == 1:
                first_sent.set()
                await release.wait()
            elif self.calls == 2:
                raise Unavailable("Temporal is out of reach")

    bridge.dispatcher = Dispatcher()  # type: ignore[assignment]
    write(path, data("a", "b"))
    first = asyncio.create_task(bridge.reload())
    await first_sent.wait()
    write(path, data("a", "b", "c"))
    with pytest.raises(Unavailable):
        await bridge.reload()
    release.set()
    assert await first
    assert bridge._tell_dispatcher, "the second swap was never heard of"


async def test_the_pipelines_limits_follow_a_reloaded_config(tmp_path: Path) -> None:
    path = tmp_path / "bridge.yaml"
    write(path, data("a"))
    bridge = Bridge(load(path), config_path=path, watch=False)
    bridge.pipeline = Pipeline(lambda: bridge.source.current.routes, FakeSink(), max_pending=10_000, retry_after=5)
    write(path, data("a", dispatcher={"max_pending_events": 3}, http={**data()["http"], "retry_after_seconds": 9}))
    assert await bridge.reload()
    assert (bridge.pipeline.max_pending, bridge.pipeline.retry_after) == (3, 9)


def test_no_token_refuses_to_start_and_insecure_mode_warns(caplog: pytest.LogCaptureFixture) -> None:
    open_config = parse(data("a", tokens=())).config
    with pytest.raises(ConfigError, match="no bearer token configured"):
        Bridge(open_config, watch=False).check_auth()
    with caplog.at_level(logging.WARNING, logger="bridge.runtime.app"):
        Bridge(open_config, insecure=True, watch=False).check_auth()
    assert "insecure mode: POST /api/v1/events accepts events from anyone" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="bridge.runtime.app"):
        Bridge(parse(data("a")).config, insecure=True, watch=False).check_auth()
    assert "insecure" not in caplog.text, "with tokens configured, --insecure changes nothing"


def test_a_token_keeps_its_name_whatever_is_added_or_removed_around_it() -> None:
    """Plain tokens were named by their place: tokens [A, B] with A revoked made B ``token-1``,
    A's scope (its events' ids, its look-ups) and B's own events' retries a new scope. A config
    has at most one plain token now, ``token-1`` wherever it stands."""
    named_b = {"name": "ci", "token": TOKEN_B}
    for tokens in ([TOKEN_A, named_b], [TOKEN_A]):
        snap = parse({**data("a"), "http": {"auth": {"tokens": tokens}}})
        assert snap.tokens.match(f"Bearer {TOKEN_A}") == "token-1"
        assert snap.tokens.match(f"Bearer {TOKEN_B}") == ("ci" if named_b in tokens else None)
    # Refused, not renamed: a config that loaded before either keeps every name or fails to load.
    for tokens in ([TOKEN_A, TOKEN_B], [named_b, TOKEN_A]):  # the plain one was token-2
        with pytest.raises(ConfigError, match="give each bearer token a name when there are several"):
            parse({**data("a"), "http": {"auth": {"tokens": tokens}}})
    with pytest.raises(ConfigError, match="would make them one client"):
        parse({**data("a"), "http": {"auth": {"tokens": [TOKEN_A, {"name": "token-1", "token": TOKEN_B}]}}})


def test_two_tokens_of_one_name_are_one_client_so_a_token_can_be_rotated() -> None:
    tokens = [{"name": "ci", "token": TOKEN_A}, {"name": "ci", "token": TOKEN_B}]
    snap = parse({**data("a"), "http": {"auth": {"tokens": tokens}}})
    assert snap.tokens.match(f"Bearer {TOKEN_A}") == snap.tokens.match(f"Bearer {TOKEN_B}") == "ci"


async def test_readyz_requests_at_once_share_one_ping_of_temporal_and_a_second_reuses_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``/readyz`` needs no token: each request pinged Temporal, so a flood of them became as many
    calls to Temporal, out of the budget the submissions need."""
    path = tmp_path / "bridge.yaml"
    write(path, data("a"))
    bridge = Bridge(load(path), config_path=path, watch=False, role="ingress")
    answer = asyncio.Event()

    class Dispatcher:
        pings = 0
        down = False  # the client holds Temporal down: it refuses every event

        async def ping(self) -> bool:
            self.pings += 1
            await answer.wait()
            return True

    dispatcher = bridge.dispatcher = Dispatcher()  # type: ignore[assignment]
    waiting = [asyncio.create_task(bridge.ready()) for _ in range(50)]
    await asyncio.sleep(0.01)
    answer.set()
    assert all(c["temporal"] for c in await asyncio.gather(*waiting))
    assert (await bridge.ready())["temporal"] and dispatcher.pings == 1
    monkeypatch.setattr(app, "READY_PING_EVERY", 0.0)  # past it: asked again
    assert (await bridge.ready())["temporal"] and dispatcher.pings == 2
    # Temporal answers /readyz's ping (2 s) but not the client's probe (1 s): events are refused,
    # and /readyz said ready.
    dispatcher.down = True
    assert not (await bridge.ready())["temporal"]


async def test_each_reload_is_counted_and_a_refused_file_is_shown_until_one_applies(tmp_path: Path) -> None:
    """A refused reload was one ERROR line: nothing an alert could watch for."""
    path = tmp_path / "bridge.yaml"
    write(path, data("a"))
    bridge = Bridge(load(path), config_path=path, watch=False)
    metrics = bridge.metrics

    def counted(result: str) -> float:
        return metrics.child(metrics.config_reloads, result)._value.get()

    write(path, "project: [unclosed")
    assert not await bridge.reload()
    assert (counted("applied"), counted("refused"), metrics.config_refused._value.get()) == (0, 1, 1)
    write(path, data("a", "b"))
    assert await bridge.reload()
    assert (counted("applied"), counted("refused"), metrics.config_refused._value.get()) == (1, 1, 0)

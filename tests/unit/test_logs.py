"""Logs for machines (bridge/runtime/logs.py): ``--log-format json`` is one JSON object per line,
with the event's fields where they are known; ``text`` is one format for every logger; workflow
lines carry their ids as fields, not the SDK's info dict."""

from __future__ import annotations

import io
import json
import logging
import re
import subprocess
import sys
import threading
import uuid
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import temporalio.activity
import temporalio.workflow
import uvicorn
from temporalio import activity, workflow
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker
from temporalio.worker.workflow_sandbox import SandboxedWorkflowRunner, SandboxRestrictions

from bridge.event import EventSignal
from bridge.runtime import cli, logs
from bridge.runtime.settings import Settings
from dispatcher.worker import PASSTHROUGH
from tests.helpers import temporal_test_server
from tests.unit.test_settle import POISON, Msg, settler

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = str(ROOT / "examples" / "shop.yaml")
FORWARD_SDK_CORE = logs.forward_sdk_core  # the fixture stubs it
TEXT_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR|CRITICAL) \S+ .*$")
EVENT = {"event_id": "e-1", "event_name": "order.created", "event_source": "kafka:orders", "adapter": "kafka"}


@pytest.fixture(autouse=True)
def restore_logging(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """configure() is process-wide: put back what it changes (pytest's own handlers included)."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    routed = {name: (logging.getLogger(name).handlers[:], logging.getLogger(name).propagate) for name in logs.ROUTED}
    monkeypatch.setattr(sys, "excepthook", sys.excepthook)
    monkeypatch.setattr(sys, "unraisablehook", sys.unraisablehook)
    monkeypatch.setattr(threading, "excepthook", threading.excepthook)
    for adapter, attr in (
        (temporalio.workflow.logger, "workflow_info_on_message"),
        (temporalio.workflow.logger, "workflow_info_on_extra"),
        (temporalio.activity.logger, "activity_info_on_message"),
        (temporalio.activity.logger, "activity_info_on_extra"),
    ):
        monkeypatch.setattr(adapter, attr, getattr(adapter, attr))
    # The SDK's default runtime is shared by every test in the process: leave it alone here
    # (test_sdk_core_is_forwarded_once checks forward_sdk_core itself).
    monkeypatch.setattr(logs, "forward_sdk_core", lambda: None)
    yield
    logging.captureWarnings(False)
    for handler in root.handlers[:]:
        root.removeHandler(handler)
    for handler in handlers:
        root.addHandler(handler)
    root.setLevel(level)
    for name, (kept, propagate) in routed.items():
        logger = logging.getLogger(name)
        logger.handlers[:] = kept
        logger.propagate = propagate


def configured(fmt: str, level: str = "DEBUG") -> io.StringIO:
    stream = io.StringIO()
    logs.configure(level, fmt, stream=stream)
    return stream


def json_lines(stream: io.StringIO) -> list[dict[str, Any]]:
    """Every line, each parsed on its own: the issue's "JSON logs parse line by line"."""
    return [json.loads(line) for line in stream.getvalue().splitlines()]


# --- json ----------------------------------------------------------------------------------------


def test_json_is_one_object_per_line_with_the_event_fields() -> None:
    stream = configured("json")
    log = logging.getLogger("bridge.test")
    log.info("plain %s", "line")
    log.warning("event rejected reason=%s", "unroutable", extra=EVENT)
    log.info("only some known", extra={"adapter": "http", "event_id": None})
    lines = json_lines(stream)
    assert len(lines) == 3 == stream.getvalue().count("\n")
    plain, rejected, partial = lines
    assert set(plain) == {"time", "level", "logger", "message"}
    assert plain["level"] == "INFO" and plain["logger"] == "bridge.test" and plain["message"] == "plain line"
    assert plain["time"].endswith("Z")
    assert abs(datetime.fromisoformat(plain["time"]).timestamp() - datetime.now().timestamp()) < 60
    assert rejected == {**rejected, **EVENT, "level": "WARNING", "message": "event rejected reason=unroutable"}
    assert set(partial) == {"time", "level", "logger", "message", "adapter"}  # None: left out


def test_a_message_with_newlines_and_control_characters_stays_one_line() -> None:
    stream = configured("json")
    forged = 'evil\n{"level": "INFO", "message": "forged"}\r\x1b[31m\x00\u2028'
    logging.getLogger("bridge.test").warning("got %s", forged, extra={"event_name": "a\nb"})
    [line] = json_lines(stream)
    assert line["message"] == f"got {forged}"
    assert line["event_name"] == "a\\nb"  # a sender's value: escaped and bounded as in text lines


def test_long_event_fields_are_cut() -> None:
    stream = configured("json")
    logging.getLogger("bridge.test").info("x", extra={"event_name": "n" * 100_000})
    [line] = json_lines(stream)
    assert len(line["event_name"]) < 300 and line["event_name"].endswith("…(+99800)")


def test_a_lone_surrogate_does_not_fail_the_line() -> None:
    stream = configured("json")
    logging.getLogger("bridge.test").info("bad %s", "\udcff")
    [line] = json_lines(stream)
    assert line["message"] == "bad \udcff"
    assert "\\udcff" in stream.getvalue()


def test_an_exception_is_one_string_field() -> None:
    stream = configured("json")
    try:
        raise ValueError("broken\nacross lines")
    except ValueError:
        logging.getLogger("bridge.test").exception("it failed", extra={"event_id": "e-9"})
    [line] = json_lines(stream)
    assert line["level"] == "ERROR" and line["message"] == "it failed" and line["event_id"] == "e-9"
    assert line["exception"].startswith("Traceback") and "ValueError: broken\nacross lines" in line["exception"]


def test_uncaught_exceptions_and_warnings_are_lines_too() -> None:
    stream = configured("json")
    try:
        raise RuntimeError("a bug")
    except RuntimeError as exc:
        sys.excepthook(type(exc), exc, exc.__traceback__)
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.warn("careful", UserWarning, stacklevel=1)
    thread = threading.Thread(target=lambda: 1 / 0, name="worker-thread")
    thread.start()
    thread.join()

    async def never_awaited() -> None: ...

    coro = never_awaited()
    sys.unraisablehook(_Unraisable(ValueError, ValueError("in __del__"), None, "Exception ignored in", coro))
    coro.close()
    crash, warned, in_thread, ignored = json_lines(stream)
    assert crash["level"] == "CRITICAL" and "RuntimeError: a bug" in crash["exception"]
    assert warned["logger"] == "py.warnings" and "careful" in warned["message"]
    assert in_thread["message"] == "uncaught exception in thread worker-thread"
    assert "ZeroDivisionError" in in_thread["exception"]
    assert ignored["message"].startswith("Exception ignored in: <coroutine object")
    assert "ValueError: in __del__" in ignored["exception"]


@dataclass
class _Unraisable:
    """What Python hands sys.unraisablehook."""

    exc_type: type[BaseException]
    exc_value: BaseException | None
    exc_traceback: Any
    err_msg: str | None
    object: object


async def test_the_settle_path_puts_the_event_on_its_lines() -> None:
    stream = configured("json")
    s = settler(on_unroutable="skip")
    await s.settle([POISON["typo"][0], POISON["schema"][0], Msg("bad-json", b"{oops")])
    settle_lines = {line["event_id"]: line for line in json_lines(stream) if line["logger"] == "bridge.settle"}
    assert settle_lines["typo"]["message"].startswith("fake message skipped")
    assert settle_lines["typo"]["event_name"] == "order.typo"
    assert settle_lines["typo"]["event_source"] == "fake:q" and settle_lines["typo"]["adapter"] == "fake"
    assert settle_lines["schema"]["message"].startswith("fake message dead-lettered")
    assert settle_lines["schema"]["event_name"] == "order.created"
    # Not decoded: the transport's id, the adapter, and no name or source.
    assert "event_name" not in settle_lines["bad-json"] and settle_lines["bad-json"]["adapter"] == "fake"


async def test_the_pipelines_rejections_carry_the_event() -> None:
    stream = configured("json")
    s = settler()
    await s.settle([POISON["typo"][0]])  # one refusal: one line with the event
    await s.pipeline.submit(
        [EventSignal(id=f"e-{i}", name="nope", payload={}, source="fake:q") for i in range(2)], "fake"
    )
    one, *each, batch = [line for line in json_lines(stream) if line["logger"] == "bridge.pipeline"]
    assert one["message"].startswith("event rejected adapter=fake reason=unroutable")
    assert {k: one.get(k) for k in EVENT} == {
        "event_id": "typo",
        "event_name": "order.typo",
        "event_source": "fake:q",
        "adapter": "fake",
    }
    assert [(line["level"], line["event_id"], line["event_name"]) for line in each] == [
        ("DEBUG", "e-0", "nope"),
        ("DEBUG", "e-1", "nope"),
    ]
    assert batch["message"].startswith("events rejected adapter=fake count=2")  # a batch: one line
    assert batch["adapter"] == "fake" and "event_id" not in batch


# --- text ----------------------------------------------------------------------------------------


def test_text_is_one_format_for_every_logger_uvicorn_included() -> None:
    stream = configured("text")
    # As bridge/runtime/app.py configures uvicorn: log_config=None leaves its loggers to the root.
    uvicorn.Config(app=lambda *a: None, log_config=None, log_level="warning", access_log=False)
    names = ["bridge.pipeline", "uvicorn.error", "uvicorn", "litestar", "temporalio.worker", "aiokafka", "aio_pika"]
    for name in names:
        logging.getLogger(name).warning("hello from %s", name)
    lines = stream.getvalue().splitlines()
    assert len(lines) == len(names)
    for name, line in zip(names, lines, strict=True):
        assert TEXT_LINE.match(line) and line.endswith(f" WARNING {name} hello from {name}"), line


def test_text_keeps_todays_format() -> None:
    stream = configured("text", "INFO")
    logging.getLogger("bridge.test").debug("not shown")
    logging.getLogger("bridge.test").info("shown", extra=EVENT)
    [line] = stream.getvalue().splitlines()
    assert TEXT_LINE.match(line) and line.endswith(" INFO bridge.test shown")


# --- workflow lines ------------------------------------------------------------------------------


@activity.defn(name="log-something")
async def log_something(what: str) -> None:
    activity.logger.info("activity says %s", what)


@workflow.defn(name="LogsSomething")
class LogsSomething:
    @workflow.run
    async def run(self, what: str) -> None:
        workflow.logger.info("workflow says %s", what)
        await workflow.execute_activity(log_something, what, start_to_close_timeout=timedelta(seconds=10))


async def _run_logging_workflow(workflow_id: str) -> str:
    server = temporal_test_server()
    env = await WorkflowEnvironment.start_time_skipping(test_server_existing_path=str(server))
    try:
        sandbox = SandboxedWorkflowRunner(
            restrictions=SandboxRestrictions.default.with_passthrough_modules(*PASSTHROUGH, "tests")
        )
        queue = f"logs-{uuid.uuid4().hex[:8]}"
        async with Worker(
            env.client, task_queue=queue, workflows=[LogsSomething], activities=[log_something], workflow_runner=sandbox
        ):
            handle = await env.client.start_workflow(LogsSomething.run, "hi", id=workflow_id, task_queue=queue)
            await handle.result()
            return (await handle.describe()).run_id
    finally:
        await env.shutdown()


async def test_workflow_lines_carry_ids_not_the_info_dict() -> None:
    stream = configured("json", "INFO")
    run_id = await _run_logging_workflow("logs-json")
    lines = [line for line in json_lines(stream) if "says" in line["message"]]
    assert [line["message"] for line in lines] == ["workflow says hi", "activity says hi"]
    for line in lines:
        assert line["workflow_id"] == "logs-json" and line["run_id"] == run_id
    assert not [line for line in json_lines(stream) if "'attempt'" in line["message"]]


async def test_text_workflow_lines_end_with_the_ids() -> None:
    stream = configured("text", "INFO")
    run_id = await _run_logging_workflow("logs-text")
    [line] = [line for line in stream.getvalue().splitlines() if "workflow says" in line]
    assert TEXT_LINE.match(line)
    assert line.endswith(f" INFO temporalio.workflow workflow says hi workflow_id=logs-text run_id={run_id}")
    assert "'attempt'" not in stream.getvalue() and "'namespace'" not in stream.getvalue()


# --- wiring --------------------------------------------------------------------------------------


def test_sdk_core_is_forwarded_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """The SDK's Rust core writes its own lines to stderr unless its runtime forwards them (the
    integration test sees them as JSON during an outage); here with Runtime.set_default stubbed."""
    set_default: list[Any] = []
    monkeypatch.setattr(logs, "_sdk_core_forwarded", False)
    monkeypatch.setattr(logs.Runtime, "set_default", lambda runtime, **kw: set_default.append((runtime, kw)))
    FORWARD_SDK_CORE()
    FORWARD_SDK_CORE()
    [(runtime, kw)] = set_default
    assert isinstance(runtime, logs.Runtime) and kw == {"error_if_already_set": False}


def test_the_format_comes_from_the_option_or_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    assert Settings.from_env({}).log_format == "text"
    assert Settings.from_env({"SIGNAL_BRIDGE_LOG_FORMAT": " JSON "}).log_format == "json"
    monkeypatch.setenv("SIGNAL_BRIDGE_LOG_FORMAT", "json")
    assert cli.main(["routes", EXAMPLE]) == 0
    assert isinstance(logging.getLogger().handlers[0].formatter, logs.JsonFormatter)
    assert cli.main(["--log-format", "text", "routes", EXAMPLE]) == 0
    assert isinstance(logging.getLogger().handlers[0].formatter, logs.TextFormatter)
    monkeypatch.setenv("SIGNAL_BRIDGE_LOG_FORMAT", "yaml")
    with pytest.raises(SystemExit) as exit_:
        cli.main(["routes", EXAMPLE])
    assert exit_.value.code == 2
    with pytest.raises(ValueError, match="log format"):
        logs.configure("INFO", "xml")


CORE_SCRIPT = """
import asyncio, logging, os, sys
from bridge.runtime import logs

logs.configure("INFO", "json")
from temporalio import activity
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

@activity.defn
async def noop() -> None: ...

async def main() -> None:
    env = await WorkflowEnvironment.start_time_skipping(test_server_existing_path=sys.argv[1])
    async with Worker(env.client, task_queue="q", activities=[noop]):
        await asyncio.sleep(1)  # the core's forwarded lines are buffered for a moment
    await env.shutdown()

asyncio.run(main())
logging.shutdown()
os._exit(0)
"""


def test_the_sdk_cores_own_lines_are_json_too() -> None:
    """The Rust core warns on the test server (an old server version); without forwarding that line
    is written to stderr by the core itself, in a format (and colours) of its own."""
    server = temporal_test_server()
    done = subprocess.run(
        [sys.executable, "-c", CORE_SCRIPT, str(server)], capture_output=True, text=True, timeout=60, cwd=ROOT
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [json.loads(line) for line in done.stderr.splitlines()]
    assert done.stdout == ""
    assert any(line["logger"] == logs.SDK_CORE_LOGGER and line["level"] == "WARNING" for line in lines), lines


def test_a_librarys_line_quoting_a_senders_value_stays_one_line() -> None:
    """The bridge's own lines escape what senders chose; a library's did not: OpenTelemetry logs a
    tracestate it cannot read as it is, so a producer's newline wrote a line of its choosing."""
    stream = configured("text")
    forged = "2030-01-01 00:00:00,000 ERROR bridge.auth token accepted for admin"
    logging.getLogger("opentelemetry.trace.span").warning("Invalid key/value pair (%s) found.", f"x\n{forged}\x1b[2J")
    try:
        raise ValueError("boom")
    except ValueError:
        logging.getLogger("bridge.test").exception("failed")
    lines = stream.getvalue().splitlines()
    assert lines[0].endswith(f"Invalid key/value pair (x\\n{forged}\\x1b[2J) found.")
    assert TEXT_LINE.match(lines[1]) and lines[1].endswith("failed")
    assert lines[2] == "Traceback (most recent call last):"  # a traceback keeps its lines
    assert lines[-1] == "ValueError: boom"
    assert not any(line.startswith("2030-") for line in lines)

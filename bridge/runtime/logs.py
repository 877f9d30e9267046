"""Process-wide logging: one handler on the root logger, one format for every line.

``text`` (the default) is ``%(asctime)s %(levelname)s %(name)s %(message)s``; ``json`` is one JSON
object per line: ``time`` (ISO 8601, UTC), ``level``, ``logger``, ``message``, the event fields a
record carries (``extra={"event_id": …, "event_name": …, "event_source": …, "adapter": …}``),
``workflow_id`` and ``run_id`` on the lines of workflow and activity code, and ``exception`` (the
traceback as one string) when there is one. JSON escapes newlines and control characters, so a
line is always one line.

Everything logs through that one handler: uvicorn's, litestar's, aiokafka's and aio-pika's
loggers propagate to the root; the Temporal SDK's Rust core, which otherwise writes lines of its
own (to stdout), is forwarded to the ``temporalio.sdk_core`` logger; Python warnings, uncaught
exceptions (in threads too) and unraisable ones (``Exception ignored in: …``) are logged. The
SDK's workflow and activity loggers no longer append their info dict to each message
(``({'attempt': 1, 'namespace': …})``): the ids are fields instead.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
from collections.abc import Mapping
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, TextIO

import temporalio.activity
import temporalio.workflow
from temporalio.runtime import LogForwardingConfig, LoggingConfig, Runtime, TelemetryConfig, TelemetryFilter

from bridge.logsafe import printable, safe

FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"
# Set with ``log.warning(..., extra={...})``; a None value is left out.
EVENT_FIELDS = ("event_id", "event_name", "event_source", "adapter")
# Libraries that may install handlers of their own: their lines go through the root's handler.
# (uvicorn installs its own again from its default log_config: bridge/runtime/app.py passes None.)
ROUTED = (
    "uvicorn",
    "uvicorn.error",
    "uvicorn.access",
    "uvicorn.asgi",
    "litestar",
    "temporalio",
    "aiokafka",
    "aio_pika",
    "aiormq",
    "py.warnings",
)
SDK_CORE_LOGGER = "temporalio.sdk_core"

# Characters JSON does not escape that str.splitlines() (and other readers) take for line breaks.
_LINE_BREAKS = str.maketrans({"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})

_sdk_core_forwarded = False
_lock = threading.Lock()


def configure(level: str | int = "INFO", fmt: str = "text", *, stream: TextIO | None = None) -> logging.Handler:
    """Set up the root logger (replacing its handlers) to write ``fmt`` lines to ``stream`` (stderr).

    Process-wide and idempotent: called once by the CLI for every role (``serve``, ``worker``,
    ``ingress`` and the one-shot commands). Raises ValueError for an unknown format or level.
    """
    if fmt not in FORMATS:
        raise ValueError(f"log format must be one of {', '.join(FORMATS)}, not {fmt!r}")
    handler = logging.StreamHandler(sys.stderr if stream is None else stream)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.setLevel(level.upper() if isinstance(level, str) else level)
    for old in root.handlers[:]:
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    for name in ROUTED:
        logger = logging.getLogger(name)
        for old in logger.handlers[:]:
            logger.removeHandler(old)
        logger.propagate = True
    logging.captureWarnings(True)
    sys.excepthook = _log_uncaught
    sys.unraisablehook = _log_unraisable
    threading.excepthook = _log_thread_exception
    quiet_temporal_info()
    forward_sdk_core()
    return handler


def quiet_temporal_info() -> None:
    """The SDK's workflow and activity loggers: no info dict appended to the message, the info as
    the record's ``temporal_workflow`` / ``temporal_activity`` attribute (read by the formatters).

    Process-wide: the workflow sandbox passes ``temporalio`` through, so sandboxed workflow code
    logs through these same adapters.
    """
    temporalio.workflow.logger.workflow_info_on_message = False
    temporalio.workflow.logger.workflow_info_on_extra = True
    temporalio.activity.logger.activity_info_on_message = False
    temporalio.activity.logger.activity_info_on_extra = True


def forward_sdk_core() -> None:
    """Make the SDK's default runtime forward its Rust core's log lines (WARN and up) to the
    ``temporalio.sdk_core`` logger instead of writing them itself (to stdout, coloured, in a format
    of its own).

    Once per process, before the first client connects: clients and workers take the default
    runtime when they are created.
    """
    global _sdk_core_forwarded
    with _lock:
        if _sdk_core_forwarded:
            return
        forwarding = LogForwardingConfig(logger=logging.getLogger(SDK_CORE_LOGGER), append_target_to_name=False)
        telemetry = TelemetryConfig(
            logging=LoggingConfig(filter=TelemetryFilter(core_level="WARN", other_level="ERROR"), forwarding=forwarding)
        )
        Runtime.set_default(Runtime(telemetry=telemetry), error_if_already_set=False)
        _sdk_core_forwarded = True


def _log_uncaught(kind: type[BaseException], value: BaseException, tb: TracebackType | None) -> None:
    if issubclass(kind, KeyboardInterrupt):
        sys.__excepthook__(kind, value, tb)
        return
    logging.getLogger(__name__).critical("uncaught exception", exc_info=(kind, value, tb))


def _log_unraisable(unraisable: Any) -> None:
    """What Python would print as ``Exception ignored in: …`` (e.g. a coroutine closed at exit)."""
    exc = unraisable.exc_value
    logging.getLogger(__name__).error(
        "%s: %r",
        unraisable.err_msg or "Exception ignored in",
        unraisable.object,
        exc_info=(unraisable.exc_type, exc, unraisable.exc_traceback) if exc is not None else None,
    )


def _log_thread_exception(args: threading.ExceptHookArgs) -> None:
    if issubclass(args.exc_type, SystemExit):
        return
    name = args.thread.name if args.thread is not None else "?"
    exc = args.exc_value if args.exc_value is not None else args.exc_type()
    logging.getLogger(__name__).error("uncaught exception in thread %s", name, exc_info=exc)


def workflow_fields(record: logging.LogRecord) -> dict[str, str]:
    """``workflow_id`` and ``run_id`` of a line logged by workflow or activity code, else empty."""
    info: Any = getattr(record, "temporal_workflow", None)
    run_key = "run_id"
    if not isinstance(info, Mapping):
        info, run_key = getattr(record, "temporal_activity", None), "workflow_run_id"
        if not isinstance(info, Mapping):
            return {}
    out = {}
    if info.get("workflow_id") is not None:
        out["workflow_id"] = str(info["workflow_id"])
    if info.get(run_key) is not None:
        out["run_id"] = str(info[run_key])
    return out


def iso_utc(created: float) -> str:
    """``2026-01-31T12:00:00.123Z``."""
    return datetime.fromtimestamp(created, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class TextFormatter(logging.Formatter):
    """``TEXT_FORMAT``; a workflow's line ends with `` workflow_id=… run_id=…``."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def formatMessage(self, record: logging.LogRecord) -> str:
        """The record's line, control characters escaped whoever logged it (its traceback, added
        after, keeps its lines): the bridge's own lines escape what senders chose (``safe``), but
        a library's may quote it raw (OpenTelemetry logs a ``tracestate`` it cannot read as it is)."""
        line = super().formatMessage(record)
        fields = workflow_fields(record)
        line = line + "".join(f" {k}={v}" for k, v in fields.items()) if fields else line
        return line if line.isprintable() else printable(line)


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": iso_utc(record.created),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key in EVENT_FIELDS:
            value = getattr(record, key, None)
            if value is not None:
                out[key] = safe(value)  # sender values: bounded, as in the text lines
        out.update(workflow_fields(record))
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            out["exception"] = record.exc_text
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        line = json.dumps(out, ensure_ascii=False, default=str)
        if not line.isascii():
            line = line.translate(_LINE_BREAKS)  # JSON leaves them raw; some readers split lines on them
            try:
                line.encode("utf-8")
            except UnicodeEncodeError:  # a lone surrogate: escape it rather than fail the write
                line = json.dumps(out, ensure_ascii=True, default=str)
        return line

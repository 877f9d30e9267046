"""``signal-bridge``: serve, worker, ingress, validate, routes, send."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import uuid
from collections.abc import Callable
from typing import Any, NoReturn

from bridge import snapshot
from bridge.config import read_config
from bridge.errors import BridgeError
from bridge.runtime import logs
from bridge.runtime.settings import Settings


def _load(path: str, settings: Settings) -> snapshot.Snapshot:
    return snapshot.Snapshot.compile(settings.apply(read_config(path)), origin=path)


def _serve(args: argparse.Namespace, role: str) -> int:
    from bridge.runtime.app import Bridge, run_until_signalled

    settings = Settings.from_env()
    if args.http_port is not None:
        settings.http_port = args.http_port
    config = _load(args.config or settings.config, settings)
    bridge = Bridge(
        config,
        config_path=args.config or settings.config,
        role=role,  # type: ignore[arg-type]
        insecure=args.insecure or settings.insecure,
        data_dir=settings.data_dir,
        # A worker serves its probes only when its command line gives a port: SIGNAL_BRIDGE_HTTP_PORT,
        # set for ingress and worker alike in a shared environment, would clash on one host.
        worker_http=args.http_port is not None,
    )
    asyncio.run(run_until_signalled(bridge))
    return 0


def _validate(args: argparse.Namespace) -> int:
    snapshot.load(args.file)
    print(f"{args.file}: ok")
    return 0


def _routes(args: argparse.Namespace) -> int:
    for name, workflows in snapshot.load(args.file).routes.names().items():
        print(f"{name} -> {', '.join(workflows)}")
    return 0


def _send(args: argparse.Namespace) -> int:
    import httpx

    settings = Settings.from_env()
    try:
        payload: Any = json.loads(args.payload)
    except json.JSONDecodeError as exc:
        print(f"--payload is not JSON: {exc}", file=sys.stderr)
        return 2
    token = args.token or settings.token
    headers = {"Idempotency-Key": args.id or str(uuid.uuid4())}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    url = (args.url or settings.url).rstrip("/") + "/api/v1/events"
    try:
        resp = httpx.post(url, json={"name": args.name, "payload": payload}, headers=headers, timeout=30)
    except httpx.HTTPError as exc:
        print(f"cannot reach {url}: {exc}", file=sys.stderr)
        return 1
    print(f"{resp.status_code} {resp.text}")
    return 0 if resp.status_code == 202 else 1


def _replay(args: argparse.Namespace) -> int:
    from bridge.runtime import replay

    settings = Settings.from_env()
    return replay.main(args, _load(args.config or settings.config, settings))


def _at_least(least: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
        if value < least:
            raise argparse.ArgumentTypeError(f"must be at least {least}: {value}")
        return value

    return parse


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds: {text}")
    return value


def _replay_parsers(sub: Any) -> None:
    """``replay kafka|amqp|runs`` (docs/replay.md); the work is bridge.runtime.replay's."""
    p = sub.add_parser("replay", help="re-send dead letters, or the events of past runs")
    kinds = p.add_subparsers(dest="replay", required=True)
    k = kinds.add_parser("kafka", help="replay a Kafka dead-letter topic")
    k.add_argument("--topic", required=True, help="the dead-letter topic")
    k.add_argument("--group", default=None, help="consumer group (default: signal-bridge-replay-{project})")
    k.add_argument("--bootstrap-servers", default=None, help="default: the entry that dead-letters to --topic")
    k.add_argument("--batch", type=_at_least(1), default=500)
    a = kinds.add_parser("amqp", help="replay a RabbitMQ dead-letter queue")
    a.add_argument("--queue", required=True, help="the queue bound to the dead-letter exchange")
    a.add_argument("--url", default=None, help="default: the first amqp entry's url")
    a.add_argument("--batch", type=_at_least(1), default=200)
    r = kinds.add_parser("runs", help="send the events of past target runs again, as new events")
    r.add_argument("--query", required=True, help="a Temporal visibility query selecting target runs")
    r.add_argument("--to", default=None, metavar="ENTRY", help="only this workflow entry (default: every match)")
    r.add_argument("--replay-number", type=_at_least(0), default=None, help="n of replay:{n}:{id} (default: Unix time)")
    r.add_argument("--yes", "-y", action="store_true", help="do not ask before replaying more than 100 events")
    for kind in (k, a, r):
        kind.add_argument("--config", "-c", default=None, help="config file (or SIGNAL_BRIDGE_CONFIG)")
        kind.add_argument("--dry-run", action="store_true", help="decode and check only; change nothing")
        kind.add_argument("--give-up-after", type=_seconds, default=120.0, help="seconds Temporal may refuse")
        kind.set_defaults(func=_replay)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="signal-bridge", description=__doc__)
    p.add_argument("--log-level", default=None, help="DEBUG, INFO (default), WARNING")
    p.add_argument(
        "--log-format", choices=logs.FORMATS, default=None, help="text (default) or json: one object per line"
    )
    sub = p.add_subparsers(dest="command", required=True)
    for name, help_ in (
        ("serve", "worker, HTTP adapter and queue adapters in one process"),
        ("worker", "only the Temporal worker (dispatcher and task runner)"),
        ("ingress", "only the adapters (HTTP, Kafka, RabbitMQ)"),
    ):
        s = sub.add_parser(name, help=help_)
        s.add_argument("--config", "-c", default=None, help="config file (or SIGNAL_BRIDGE_CONFIG)")
        s.add_argument("--http-port", type=int, default=None)
        s.add_argument("--insecure", action="store_true", help="accept events without a bearer token")
        s.set_defaults(func=lambda a, role=name: _serve(a, "all" if role == "serve" else role))
    v = sub.add_parser("validate", help="check a config file; exit 1 with the error")
    v.add_argument("file")
    v.set_defaults(func=_validate)
    r = sub.add_parser("routes", help="print event name -> workflows")
    r.add_argument("file")
    r.set_defaults(func=_routes)
    s = sub.add_parser("send", help="send one event to a running bridge")
    s.add_argument("name")
    s.add_argument("--payload", default="{}")
    s.add_argument("--url", default=None)
    s.add_argument("--token", default=None)
    s.add_argument("--id", default=None, help="event id (Idempotency-Key); default a new UUID")
    s.set_defaults(func=_send)
    _replay_parsers(sub)
    from bridge.runtime import events_cli

    events_cli.add_parsers(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    settings = Settings.from_env()
    log_format = args.log_format or settings.log_format
    if log_format not in logs.FORMATS:
        p.error(f"SIGNAL_BRIDGE_LOG_FORMAT must be one of {', '.join(logs.FORMATS)}, not {log_format!r}")
    logs.configure(args.log_level or settings.log_level, log_format)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        return int(args.func(args))
    except BridgeError as exc:
        if log_format == "json":  # every line on stderr stays one JSON object
            logging.getLogger("bridge.runtime.cli").error("%s", exc)
        else:
            print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except Exception:  # a broker down at start, say: reported, and entry() still leaves by os._exit
        logging.getLogger("bridge.runtime.cli").exception("signal-bridge failed")
        return 1


def entry() -> NoReturn:
    """The ``signal-bridge`` command: :func:`main`, then leave without interpreter finalization.

    Once a Temporal client existed, the SDK's native threads may still touch the GIL while Python
    finalizes, which aborts the process (SIGABRT) after it finished cleanly: a supervisor would
    count a crash (temporalio/sdk-python#300). Everything is flushed first.
    """
    code = main()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    entry()

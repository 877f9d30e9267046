"""Start the services by hand, or around one command.

    python -m tests.services up [--services temporal,kafka,amqp]
    python -m tests.services run [--services temporal,kafka,amqp] -- CMD...

``up`` prints the endpoints and runs until Ctrl-C. ``run`` starts the services, runs CMD with
``TEMPORAL_ADDRESS``, ``KAFKA_BOOTSTRAP_SERVERS`` and ``AMQP_URL`` in its environment, stops the
services after and exits with CMD's status. An endpoint already in the environment is passed on
as it is, without starting anything.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import threading

from tests.services.endpoints import ENDPOINTS
from tests.services.process import ServiceUnavailable, shutdown_all


def endpoints(names: list[str]) -> dict[str, str]:
    """Environment variable → endpoint for each named service; raises ServiceUnavailable."""
    found = {}
    for name in names:
        env_var, provide = ENDPOINTS[name]
        found[env_var] = provide()
    return found


def up(names: list[str]) -> int:
    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    for key, value in endpoints(names).items():
        print(f"{key}={value}", flush=True)
    print("# running; Ctrl-C to stop", flush=True)
    # Poll: the signal may land on one of the Temporal client's native threads, which would not
    # wake a main thread blocked in an untimed wait.
    while not stop.wait(0.5):
        pass
    return 0


def run(names: list[str], cmd: list[str]) -> int:
    found = endpoints(names)
    for key, value in found.items():
        print(f"# tests.services: {key}={value}", file=sys.stderr, flush=True)
    proc = subprocess.Popen(cmd, env={**os.environ, **found})
    # Ctrl-C reaches the command too (same foreground group): wait for it to finish, then clean up.
    signal.signal(signal.SIGINT, lambda *_: None)
    signal.signal(signal.SIGTERM, lambda *_: proc.send_signal(signal.SIGTERM))
    while True:  # polled, for the same reason as in up()
        try:
            code = proc.wait(0.5)
            break
        except subprocess.TimeoutExpired:
            pass
    return code if code >= 0 else 128 - code


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.services", description="Start the services by hand, or around one command."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    for name in ("up", "run"):
        sub = commands.add_parser(name)
        sub.add_argument("--services", default=",".join(ENDPOINTS), help="default: %(default)s")
        if name == "run":
            sub.add_argument("cmd", nargs=argparse.REMAINDER, help="-- CMD [ARG...]")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.services.split(",") if n.strip()]
    unknown = sorted(set(names) - set(ENDPOINTS))
    if unknown:
        parser.error(f"unknown service(s) {', '.join(unknown)}; known: {', '.join(ENDPOINTS)}")
    cmd = list(getattr(args, "cmd", []))
    if cmd[:1] == ["--"]:
        cmd = cmd[1:]
    if args.command == "run" and not cmd:
        parser.error("run needs a command: python -m tests.services run -- CMD [ARG...]")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        return up(names) if args.command == "up" else run(names, cmd)
    except ServiceUnavailable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        shutdown_all()


if __name__ == "__main__":
    sys.exit(main())

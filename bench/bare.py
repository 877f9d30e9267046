"""The bare endpoint the burst compares the bridge with: litestar parses the JSON body, answers 202.

    python -m bench.bare --port PORT

Served by uvicorn with the options ``bridge/runtime/app.py`` uses for the bridge's HTTP adapter
(same host default, ``log_level="warning"``, ``lifespan="on"``, ``timeout_graceful_shutdown=30``,
uvicorn's default loop and HTTP implementation), each in its own process, so the difference
between the two rows is what the bridge does with an event, not the server around it.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import uvicorn
from litestar import Litestar, Request, Response, post


@post("/api/v1/events", status_code=202)
async def events(request: Request[Any, Any, Any]) -> Response[dict[str, Any]]:
    body = json.loads(await request.body())
    count = len(body) if isinstance(body, list) else 1
    return Response({"status": "accepted", "events": count}, status_code=202)


app = Litestar([events], openapi_config=None, logging_config=None)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.bare", description=__doc__)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    args = p.parse_args(argv)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", lifespan="on", timeout_graceful_shutdown=30)


if __name__ == "__main__":
    main()

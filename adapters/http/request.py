"""Reading a request the way the events API and webhooks need it: the raw body bytes, under the
size limit of the current config, and the headers an event keeps.

Handlers read the body themselves (litestar parses nothing): signatures are checked over the raw
bytes, and a CloudEvent in binary mode is a body plus headers.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping
from typing import Any

from litestar import Request
from litestar.exceptions import InternalServerException

from adapters.http.state import HttpState
from bridge.decode import MAX_KEPT_VALUE
from bridge.errors import EventRejected
from bridge.snapshot import Snapshot

KEPT_HEADERS = ("traceparent", "tracestate", "x-request-id", "x-correlation-id", "user-agent")
"""The headers an event keeps in ``metadata.headers``: one value each (the first), so at most five."""
# A kept header's value is at most MAX_KEPT_VALUE (512) characters, as on every adapter (W3C asks
# that ``tracestate`` be kept up to 512); a longer one is left out, not cut: a cut trace header is
# no trace header. The events of a batch share the request's one copy in memory; encoded, each
# carries at most ~3.5 KB of it in ASCII, six times that in Latin-1 escaped as \u00XX (what the
# request's charge of http.max_parsed_bytes grows by, as its events are encoded).
_MAX_LENGTH_DIGITS = 18


async def read_body(
    request: Request[Any, Any, Any],
    http: HttpState,
    snap: Snapshot,
    adapter: str,
    received: Mapping[str, str] | None = None,
) -> bytes:
    """The whole body, or ``too_large`` as soon as the announced or received length is over
    ``http.max_body_bytes`` (a chunked body is cut off as soon as it passes the limit), or
    ``too_slow`` when it has not all come within ``http.body_timeout_seconds``.
    ``received``: the request's :func:`headers`, when the caller has them already."""
    seconds = snap.config.http.body_timeout_seconds
    try:
        async with asyncio.timeout(seconds):
            return await _read_body(request, http, snap, adapter, received)
    except TimeoutError:
        rejected = EventRejected("too_slow", f"the body did not arrive within {seconds:g} s")
        raise http.refuse(adapter, rejected) from None
    except InternalServerException:  # litestar's "client disconnected prematurely": no one to answer
        rejected = EventRejected("malformed", "the client went away before its body was complete")
        raise http.refuse(adapter, rejected) from None


async def _read_body(
    request: Request[Any, Any, Any],
    http: HttpState,
    snap: Snapshot,
    adapter: str,
    received: Mapping[str, str] | None,
) -> bytes:
    limit = snap.config.http.max_body_bytes
    hdrs = request.headers if received is None else received
    length = hdrs.get("content-length") or ""
    announced = length.isascii() and length.isdigit()
    if announced and (len(length) > _MAX_LENGTH_DIGITS or int(length) > limit):
        raise _too_large(http, adapter, limit)
    if announced and hdrs.get("transfer-encoding") is None:
        # Framed by its Content-Length, within the limit: the server delivers no more than that.
        body = await request.body()
    else:
        body = await _read_limited(request, limit, http, adapter)
    if len(body) > limit:
        raise _too_large(http, adapter, limit)
    return body


async def _read_limited(request: Request[Any, Any, Any], limit: int, http: HttpState, adapter: str) -> bytes:
    """A body of unannounced length (chunked), cut off as soon as it passes ``limit``."""
    data = bytearray()
    async with contextlib.aclosing(request.stream()) as chunks:
        async for chunk in chunks:
            data += chunk
            if len(data) > limit:
                raise _too_large(http, adapter, limit)
    return bytes(data)


def _too_large(http: HttpState, adapter: str, limit: int) -> EventRejected:
    return http.refuse(adapter, EventRejected("too_large", f"body exceeds http.max_body_bytes ({limit} bytes)"))


def headers(request: Request[Any, Any, Any]) -> dict[str, str]:
    """Lower-cased names; the first of repeated headers. Read once per request from the ASGI
    scope's raw headers (Latin-1, as litestar decodes them): every lookup after that is a dict's."""
    out: dict[str, str] = {}
    for name, value in request.scope["headers"]:
        key = name.decode("latin-1").lower()
        if key not in out:
            out[key] = value.decode("latin-1")
    return out


def trace_metadata(received: Mapping[str, str]) -> dict[str, Any]:
    """An event's metadata: the tracing and correlation headers (:data:`KEPT_HEADERS`, each at
    most :data:`MAX_KEPT_VALUE` characters), never credentials. ``received``: :func:`headers`."""
    kept = {h: v for h in KEPT_HEADERS if (v := received.get(h)) is not None and len(v) <= MAX_KEPT_VALUE}
    meta: dict[str, Any] = {"headers": kept}
    if "x-correlation-id" in kept:
        meta["correlation_id"] = kept["x-correlation-id"]
    if "traceparent" in kept:
        meta["traceparent"] = kept["traceparent"]
    return meta

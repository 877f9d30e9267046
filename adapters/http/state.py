"""What the HTTP adapter's handlers share, injected into each of them by litestar.

:class:`HttpState` holds the pipeline and the source of the current config snapshot; a handler
reads the snapshot once per request, so a reload changes tokens, webhooks and limits for the next
request and never in the middle of one. Rate-limit buckets outlive a reload when their limit did
not change. Rate limits, tokens and reloads: docs/http-api.md and docs/webhooks.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import math
import time
import weakref
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from typing import Any, cast

from litestar.background_tasks import BackgroundTask
from litestar.connection import ASGIConnection
from litestar.di import NamedDependency
from litestar.enums import MediaType
from litestar.handlers.base import BaseRouteHandler
from litestar.response import Response, Stream
from litestar.serialization import encode_json

from adapters.http.problems import Problem
from bridge.adapter import ConsumerReadiness
from bridge.config import RateLimit
from bridge.decode import HIDDEN, encoded_weight, parsed_weight
from bridge.errors import EventRejected, PartlyHeld, PartlyRefused, Reason, SenderOverloaded, Unavailable
from bridge.event import EventSignal
from bridge.logsafe import safe
from bridge.pipeline import Outcome, Pipeline, past_room
from bridge.ratelimit import RateLimiter, TokenBucket, default_burst, retry_after
from bridge.snapshot import Snapshot

log = logging.getLogger(__name__)

HTTP_ADAPTER = "http"
"""The events API: its metrics label and the ``source`` of the events it builds."""
WEBHOOK_ADAPTER = "webhook"
"""Webhook deliveries: their metrics label."""
ANONYMOUS = "anonymous"
"""The token name of every request when no token is configured and ``insecure`` is set."""

HTTP_STATE = "http"
"""Where the app's :class:`HttpState` is kept in the app's ``state``."""

NEEDS_TOKEN = "needs_token"
"""The opt (``opt={NEEDS_TOKEN: True}``) of handlers and routers that only token holders may read."""

Ready = Callable[[], Awaitable[dict[str, bool]]]
EventLookup = Callable[[str, str], Awaitable[list[Any]]]
"""(event id, source) → the runs it started, as :class:`adapters.http.answers.RunInfo` dicts;
raises :class:`bridge.errors.Unavailable` when Temporal does not answer."""
Consumers = Callable[[], list[ConsumerReadiness]]
"""The Kafka consumers running beside the adapter, as ``/readyz`` shows them to token holders."""


CUT_LOG_SECONDS = 10.0
"""At most one log line in this long for the webhook requests cut short (a sender may cause many)."""


class LogEvery:
    """One INFO line per ``seconds`` for a kind of thing that may happen as often as a sender
    likes: the first at once, then how many more there were, with the last one's detail."""

    def __init__(self, what: str, seconds: float) -> None:
        self.what, self.seconds = what, seconds
        self._last = -math.inf
        self._more = 0

    def note(self, detail: str) -> None:
        now = time.monotonic()
        self._more += 1
        if now - self._last >= self.seconds:
            log.info("%s: %d in the last %.0f s; the last: %s", self.what, self._more, self.seconds, detail)
            self._last, self._more = now, 0


def _oldest(held: dict[object, tuple[float, asyncio.Timeout]]) -> float:
    return next(iter(held.values()))[0]


def address_key(host: str) -> str:
    """The address whose share a request before its signature is checked counts in: the host,
    or for IPv6 its /64 network (one subscriber's prefix holds 2**64 addresses); the IPv4 address
    of a client seen through IPv4-mapped or NAT64 (``64:ff9b::/96``) addresses."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return host
    if isinstance(ip, ipaddress.IPv6Address) and not ip.is_loopback:
        if (v4 := ip.ipv4_mapped or _nat64(ip)) is not None:
            return str(v4)
        prefix = 48 if ip in _SIX_TO_FOUR else 64  # 6to4 gives each IPv4 address a /48
        return str(ipaddress.IPv6Network((ip, prefix), strict=False))
    return str(ip)


_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_SIX_TO_FOUR = ipaddress.IPv6Network("2002::/16")


def _nat64(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 client behind the well-known NAT64 prefix, whose /64 all such clients share."""
    return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF) if ip in _NAT64 else None


class Limits:
    """The rate-limit buckets for one snapshot's config: one limiter over the bearer tokens, one
    bucket per webhook. A new snapshot keeps each limiter or bucket whose rate and burst are
    unchanged, so a reload neither refills nor empties it."""

    def __init__(self) -> None:
        self._seen: Snapshot | None = None
        self.tokens: RateLimiter | None = None
        self.webhooks: dict[str, TokenBucket] = {}

    def of(self, snap: Snapshot) -> Limits:
        if snap is not self._seen:
            self.tokens = self._token_limiter(snap.config.http.rate_limit.per_token)
            self.webhooks = self._webhook_buckets(snap)
            self._seen = snap
        return self

    def _token_limiter(self, limit: RateLimit | None) -> RateLimiter | None:
        if limit is None:
            return None
        old = self.tokens
        if old is not None and (old.rate, old.burst) == (limit.rate, limit.burst or default_burst(limit.rate)):
            return old
        return RateLimiter(limit.rate, limit.burst)

    def _webhook_buckets(self, snap: Snapshot) -> dict[str, TokenBucket]:
        buckets = {}
        for hook in snap.config.webhooks:
            limit = hook.rate_limit or snap.config.http.rate_limit.per_webhook
            if limit is None:
                continue
            burst = limit.burst or default_burst(limit.rate)
            old = self.webhooks.get(hook.slug)
            same = old is not None and (old.rate, old.burst) == (limit.rate, burst)
            buckets[hook.slug] = old if same and old is not None else TokenBucket(limit.rate, burst)
        return buckets


ANSWER_CHUNK = 64 * 1024
"""Bytes of an answer handed to the server at a time (:meth:`Weighed.answer`)."""


class _Release(BackgroundTask):
    """What gives an answer's charge back once it is sent (:meth:`Weighed.answer`), watched for
    being dropped: the response that is sent (not the handler's, which litestar converts and drops
    first) holds it until it is done, sent whole or not."""

    __slots__ = ("__weakref__",)


class Weighed:
    """One request's charge of ``http.max_parsed_bytes`` (:meth:`HttpState.parsing`): the larger
    of its body's weight with the JSON it hid, and the body with its events' encodings."""

    def __init__(self, state: HttpState, snap: Snapshot, adapter: str, sender: str, body: int) -> None:
        self.state, self.snap, self.adapter, self.sender = state, snap, adapter, sender
        self.weight = 0  # charged now
        self._body = body
        self._first = 0  # the body's weight before it was parsed
        self._hidden = 0
        self._encoded = 0
        self.kept = 0  # of the weight, what its answer holds until it is sent (:meth:`answer`)

    def _grow(self) -> None:
        self.state._grow(self, max(self._first + self._hidden, self._body + self._encoded))

    def first(self, weight: int) -> None:
        """The body's weight, before it is parsed."""
        self._first = weight
        self._grow()

    def hidden(self, raw: bytes) -> None:
        """JSON the body held out of sight (:data:`bridge.decode.HIDDEN`), before it is parsed."""
        self._hidden += parsed_weight(raw, 1)
        self._grow()

    def encoded(self, data: bytes) -> None:
        """One of its events, encoded: what the encodings so far show they hold."""
        self._encoded += encoded_weight(data)
        self._grow()

    def answer(self, content: Any, status_code: int) -> Response[Any]:
        """``content`` encoded now, and its bytes kept charged until the client has read nearly all
        of them (or left). A batch's answer holds each event's id: 1,000 small events, sent
        with an ``Idempotency-Key`` of 4 KiB, are answered in 4 MB; given back as the handler
        returned, each answer a client read slowly held that much past ``http.max_parsed_bytes``.
        Never refused: the events are held already."""
        data = encode_json(content)
        release = self.state._keep(self, len(data))

        async def give_back() -> None:  # async: litestar runs a plain function in a thread
            release()

        task = _Release(give_back)
        weakref.finalize(task, release)  # a response not sent whole (the client left) gives it back too
        if len(data) <= ANSWER_CHUNK:  # one piece either way: a plain response costs a seventh of a stream
            return Response(data, status_code=status_code, media_type=MediaType.JSON, background=task)

        async def chunks() -> AsyncIterator[bytes]:
            # In pieces: uvicorn's send returns once a piece is handed to the socket's buffer, and
            # waits for that buffer to drain before the next; the last (empty) one returns once the
            # client has read nearly all, and only then is the charge given back.
            for start in range(0, len(data), ANSWER_CHUNK):
                yield data[start : start + ANSWER_CHUNK]

        headers = {"content-length": str(len(data))}
        return Stream(chunks(), status_code=status_code, media_type=MediaType.JSON, headers=headers, background=task)


class HttpState:
    """The pipeline, the current snapshot, readiness and the rate limits of one HTTP adapter."""

    def __init__(
        self,
        pipeline: Pipeline,
        current: Callable[[], Snapshot],
        *,
        insecure: bool = False,
        ready: Ready | None = None,
        lookup: EventLookup | None = None,
        consumers: Consumers | None = None,
    ) -> None:
        self.pipeline = pipeline
        self.lookup = lookup
        self.consumers = consumers
        self.metrics = pipeline.metrics
        self.current = current
        self.insecure = insecure
        self.ready = ready
        self._limits = Limits()
        self._open: Counter[str] = Counter()  # requests in flight per key (held)
        # Unsigned webhook requests reading their bodies, per address and the oldest first: when
        # each began, and the deadline that cuts it short.
        self._unverified: dict[str, dict[object, tuple[float, asyncio.Timeout]]] = {}
        self._cut = LogEvery("webhook requests cut short to make room for others", CUT_LOG_SECONDS)
        # The estimated parsed size of the bodies in flight (http.max_parsed_bytes), and each sender's.
        self._parsed = 0
        self._parsed_of: Counter[str] = Counter()
        self._full = LogEvery("requests refused: their bodies would hold too much memory parsed", CUT_LOG_SECONDS)

    def limits(self) -> Limits:
        """The buckets of the current snapshot. A request that began before a reload is charged
        at the new limits too: building them again for its older snapshot would make new buckets
        each time requests of the two snapshots alternate, and refill them for the next."""
        return self._limits.of(self.current())

    async def submit(
        self,
        snap: Snapshot,
        events: Sequence[EventSignal],
        adapter: str,
        unavailable: str,
        *,
        sender: str,
        weighed: Weighed | None = None,
        **ids: Any,
    ) -> list[Outcome]:
        """Submit through the pipeline as ``sender`` (``http:<token name>``, ``webhook:<slug>``);
        a refusal of the whole becomes its :class:`Problem` (``unavailable``/``overloaded`` with
        ``Retry-After``, ``rate_limited`` when the sender already has its share of the events
        waiting, or the rejection), with ``ids`` (the event id, the delivery id) in the answer. A
        batch Temporal took part of comes back as outcomes, the rest refused as ``unavailable``:
        a retry of it whole would start the held events again if they have no ids of their own."""
        try:
            # Checked against the request's snapshot, which made its events (its webhook's mapping).
            weigh = weighed.encoded if weighed is not None else None
            return await self.pipeline.submit(events, adapter, routes=snap.routes, sender=sender, weigh=weigh)
        except PartlyHeld as exc:  # a batch: which are held and which to send again (a 207)
            return list(exc.outcomes)
        except PartlyRefused as exc:  # likewise, and those too large for the server alone
            self.metrics.child(self.metrics.accepted, adapter).inc(len(exc.held))
            self.refuse_items(adapter, [*exc.refused.values()])
            if len(exc.held) + len(exc.refused) < len(events):  # some to send again, as for PartlyHeld
                self.metrics.child(self.metrics.unavailable, adapter).inc()
            log.warning(
                "events held in part adapter=%s held=%d too_large=%d events=%d: %s",
                adapter,
                len(exc.held),
                len(exc.refused),
                len(events),
                safe(exc.message),
            )
            return list(exc.outcomes)
        except SenderOverloaded as exc:  # this sender's doing, not the process's: the others go on
            retry = max(1, snap.config.http.retry_after_seconds)
            raise Problem(
                "rate_limited", f"{exc}; retry after the Retry-After delay", retry_after=retry, **ids
            ) from None
        except Unavailable as exc:
            retry = snap.config.http.retry_after_seconds
            raise Problem.unavailable(exc, retry, unavailable, **ids) from None
        except EventRejected as exc:  # Temporal refused the request's signal: too large for it
            self.refuse_items(adapter, [exc] * len(events))
            log.warning(
                "events refused adapter=%s reason=%s events=%d: %s", adapter, exc.reason, len(events), safe(exc.message)
            )
            raise Problem.of(exc, **ids) from None

    def token_name(self, snap: Snapshot, authorization: str | None) -> str | None:
        """The name of the bearer token the header carries (``token-1``, …; ``anonymous`` when no
        token is configured and the adapter is insecure), or None. The name, never the token,
        keys rate limits and logs."""
        if self.insecure and not snap.tokens:
            return ANONYMOUS
        return snap.tokens.match(authorization)

    def guard(self, connection: ASGIConnection[Any, Any, Any, Any], handler: BaseRouteHandler) -> None:
        """What :func:`needs_token` checks: a handler (or router) with the opt :data:`NEEDS_TOKEN`
        (``/metrics``, ``/schema``) answers only the events API's bearer token; in insecure mode
        without tokens, anyone, as the events API. Why: docs/operations.md, "Exposure"."""
        if (
            handler.opt.get(NEEDS_TOKEN)
            and self.token_name(self.current(), connection.headers.get("authorization")) is None
        ):
            raise self.deny(HTTP_ADAPTER, "unauthorized", "a valid bearer token is required")

    def refuse(self, adapter: str, exc: EventRejected) -> EventRejected:
        """Count and log a body refused before anything was submitted; returned, to be raised."""
        self.pipeline.reject(adapter, None, None, exc)
        return exc

    def refuse_items(self, adapter: str, refused: list[EventRejected]) -> None:
        """Count the items of a batch refused before anything was submitted; the batch's one log
        line says how many of each reason, so a large batch of bad items costs no log flood."""
        for exc in refused:
            self.metrics.child(self.metrics.rejected, adapter, exc.reason).inc()

    def deny(self, adapter: str, reason: Reason, message: str, *, retry_after: int | None = None) -> Problem:
        """Count a request refused before its body was looked at; returned, to be raised."""
        self.metrics.child(self.metrics.rejected, adapter, reason).inc()
        return Problem(reason, message, retry_after=retry_after)

    @contextlib.contextmanager
    def held(
        self, adapter: str, key: str, most: int | None = None, what: str = "requests of this sender"
    ) -> Iterator[None]:
        """One request under ``key`` in flight for the block; 429 (``Retry-After: 1``) when ``key``
        already has ``most`` (by default ``http.max_requests_per_source``): a token holder, or one
        address on a webhook's path, that opens requests and trickles their bodies holds at most
        that many of the process's ``max_concurrent_requests``, never all."""
        if most is None:
            most = self.current().config.http.max_requests_per_source
        if self._open[key] >= most:
            raise self.deny(adapter, "rate_limited", f"too many {what} at once; retry shortly", retry_after=1)
        self._open[key] += 1
        try:
            yield
        finally:
            self._open[key] -= 1
            if not self._open[key]:
                del self._open[key]

    @contextlib.contextmanager
    def parsing(self, snap: Snapshot, adapter: str, sender: str, body: bytes) -> Iterator[Weighed]:
        """Room for ``body`` to be parsed and its events held until they are answered, within
        ``http.max_parsed_bytes``: charged before it is parsed (:func:`bridge.decode.parsed_weight`),
        raised by JSON it held out of sight as that is decoded (a CloudEvent's ``data_base64``:
        :meth:`Weighed.hidden`), and raised as its events are encoded (:meth:`Weighed.encoded`) to
        what the encodings show they hold, where the body did not: headers and keys each event
        keeps, percent-encoded data. A sender past a quarter of the room, when the others would be left less
        than a quarter, is refused ``429 rate_limited``; a request past all of it ``503
        overloaded``; each with ``Retry-After``, counted as overloaded, and nothing of it taken.
        One request alone (of the process, of a sender) always goes. Without it, the requests in
        flight held up to 21 GiB parsed while Temporal was slow."""
        weighed = Weighed(self, snap, adapter, sender, len(body))
        weighed.first(parsed_weight(body, snap.config.http.max_batch_events))
        told = HIDDEN.set(weighed.hidden)
        try:
            yield weighed
        finally:
            HIDDEN.reset(told)
            self._release(sender, weighed.weight - weighed.kept)

    def _release(self, sender: str, weight: int) -> None:
        self._parsed -= weight
        self._parsed_of[sender] -= weight
        if not self._parsed_of[sender]:
            del self._parsed_of[sender]

    def _keep(self, weighed: Weighed, size: int) -> Callable[[], None]:
        """Keep ``size`` bytes of ``weighed`` charged past its request's handler (charged more if
        it has less, without refusal); what gives them back, once, however often it is called."""
        if size > weighed.weight:
            self._charge(weighed, size)
        weighed.kept += size
        sender, given = weighed.sender, False

        def release() -> None:
            nonlocal given
            if not given:
                given = True
                self._release(sender, size)

        return release

    def _grow(self, weighed: Weighed, weight: int) -> None:
        """Charge ``weighed`` up to ``weight``, or refuse it (429, 503) and charge nothing more."""
        more = weight - weighed.weight
        if more <= 0:
            return
        http = weighed.snap.config.http
        budget, sender, adapter = http.max_parsed_bytes, weighed.sender, weighed.adapter
        share, retry = max(1, budget // 4), max(1, http.retry_after_seconds)
        mine = self._parsed_of[sender] - weighed.weight  # of the sender's other requests
        past = past_room(self._parsed, weighed.weight, mine, more, budget, share)
        if past == "sender":
            self.metrics.child(self.metrics.overloaded, adapter).inc()
            self._full.note(f"{safe(sender)} holds {mine} bytes of {self._parsed} (a sender's share: {share})")
            message = f"this sender's requests in flight hold their share of memory ({share} bytes); retry shortly"
            raise Problem("rate_limited", message, retry_after=retry)
        if past == "process":
            self.metrics.child(self.metrics.overloaded, adapter).inc()
            self._full.note(f"{self._parsed} bytes held, {more} more asked (http.max_parsed_bytes: {budget})")
            message = "the requests in flight hold as much memory as this process allows; retry shortly"
            raise Problem("overloaded", message, retry_after=retry)
        self._charge(weighed, weight)

    def _charge(self, weighed: Weighed, weight: int) -> None:
        """Raise ``weighed``'s charge to ``weight``."""
        more = weight - weighed.weight
        self._parsed += more
        self._parsed_of[weighed.sender] += more
        weighed.weight = weight

    @contextlib.asynccontextmanager
    async def unverified(self, snap: Snapshot, address: str) -> AsyncIterator[None]:
        """Room for one webhook request from ``address`` (:func:`address_key`) to read its body
        before its signature is checked: half of ``http.max_concurrent_requests`` for all such
        requests, so that they cannot take every request the process handles from the events API
        (a connection answered 429 or 408 still counts in uvicorn's limit until it closes).

        When the room is full, the address that holds the most of it (of two that hold as much,
        the one whose body has been arriving longest) gives up its oldest request, cut short with
        408 ``too_slow``; if that is the newcomer's own address, the newcomer is refused, 429.
        So requests that trickle bodies from a few addresses, or churn there, cannot hold out a
        provider's deliveries from another address: before, a few addresses held every request
        the process takes, and every other request got 503s."""
        room = max(1, snap.config.http.max_concurrent_requests // 2)
        loop = asyncio.get_running_loop()
        if sum(map(len, self._unverified.values())) >= room:
            top = max(self._unverified, key=lambda a: (len(self._unverified[a]), -_oldest(self._unverified[a])))
            mine = self._unverified.get(address, {})
            if len(mine) >= len(self._unverified[top]):
                message = "too many unsigned webhook requests at once; retry shortly"
                raise self.deny(WEBHOOK_ADAPTER, "rate_limited", message, retry_after=1)
            victims = self._unverified[top]
            _began, theirs = victims.pop(next(iter(victims)))
            if not victims:
                del self._unverified[top]
            theirs.reschedule(loop.time())  # it ends with a TimeoutError in its own task, below
        entry, began = object(), loop.time()
        try:
            async with asyncio.timeout(None) as deadline:
                self._unverified.setdefault(address, {})[entry] = (began, deadline)
                yield
        except TimeoutError:
            if not deadline.expired():
                raise
            waited = loop.time() - began
            self._cut.note(f"its body was still arriving after {waited:.1f} s from {safe(address)}")
            message = f"the body was still arriving after {waited:.1f} s when its place was needed"
            raise self.deny(WEBHOOK_ADAPTER, "too_slow", message) from None
        finally:
            held = self._unverified.get(address)
            if held is not None and held.pop(entry, None) is not None and not held:
                del self._unverified[address]

    def charge(self, token: str, cost: int, *, take: bool = True) -> None:
        """Take ``cost`` events from the token's rate limit, or raise 429 and take nothing (with
        ``take=False``, only check that one is there)."""
        limiter = self.limits().tokens
        if limiter is None:
            return
        wait = limiter.take(token, cost) if take else limiter.due(token)
        if wait:
            needs = f"; this request holds {cost} events" if cost > 1 else ""
            raise self.deny(
                HTTP_ADAPTER,
                "rate_limited",
                f"rate limit of this token exceeded{needs}; retry after the Retry-After delay",
                retry_after=retry_after(wait),
            )

    @staticmethod
    def of(connection: ASGIConnection[Any, Any, Any, Any]) -> HttpState:
        """The app's state, for a handler that takes no injected dependency (the events API)."""
        return cast(HttpState, connection.app.state[HTTP_STATE])

    def provide(self) -> HttpState:
        """The litestar dependency ``http``."""
        return self


async def needs_token(connection: ASGIConnection[Any, Any, Any, Any], handler: BaseRouteHandler) -> None:
    """The guard of the handlers and routers with the opt :data:`NEEDS_TOKEN` (``/metrics``, the
    ``/schema`` router): :meth:`HttpState.guard`. Set on them rather than on the app, since
    litestar copies the handler for each guard on every request it guards, which would cost the
    events API a sixth of its time; :func:`adapters.http.create_app` refuses to build an app in
    which a handler with the opt lacks it. A coroutine function, although it never waits: litestar
    runs a plain function guard in a worker thread."""
    HttpState.of(connection).guard(connection, handler)


def current_snapshot(http: NamedDependency[HttpState]) -> Snapshot:
    """The litestar dependency ``snapshot``: read once per request, shared by its dependencies."""
    return http.current()
